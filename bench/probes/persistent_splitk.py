"""Probe: the shipped split-K packed decode GEMV's tiles taken by a persistent grid in a pipelined loop.

Why: the split-K GEMV (gemv_splitk) gives each program one tile (BLOCK_N rows x BLOCK_KW words of K): it loads
the tile, forms its slice's activation digits, multiplies and stores its partial sums, then exits, so a program
holds its tile's bytes in flight only at its start, and the card reads at 2.8-3.0 TB/s (loads alone 3.2-3.5) where
plain one-shot reads of the same bytes reach 3.8-4.1 (bench/probes/read_ceiling.py). The streaming probe
(stream_int4) walked K inside each row block and lost 1.2-6x, but with one program per row block: 128 programs for
o and down, ~3 an SM for qkv, uneven. Here G programs (a few per SM) take the same tiles t = p, p + G, ... in one
`tl.range(num_stages=STAGES)` loop: Triton's pipeliner keeps STAGES - 1 tiles' codes, scales, offsets and
activation slices in flight (cp.async) while a tile is multiplied; every tile is balanced work, the partials and
the reduce kernel are the shipped ones (same arithmetic per tile: `load_tile` + `tile_partial`).

    python -m bench.probes.persistent_splitk [--configs 32x128x4x3x264,...] [--projections qkv,o] [--check]

A config is BLOCK_N x BLOCK_KW x warps x stages x programs (0: one per SM x 2). Each projection in its step's mode,
`layers` distinct weights a graph, PDL, against the shipped config (stream_int4.compare_to_shipped).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench.probes.stream_int4 import Candidate, compare_args, compare_to_shipped, layouts, parse
from graph_executor.kernels.gemv_splitk import (
    SplitKConfig,
    SplitKScratch,
    launch_reduce,
    load_tile,
    scratch_floats,
    store_partial,
    tile_partial,
)
from graph_executor.kernels.pdl import launch_options, wait_for_prior
from graph_executor.quant.formats import INT4_ZERO, Int4Groups, Int8Groups


@triton.jit
def _persistent_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, nw_ptr, part_ptr, N, K, T, G, MODE: tl.constexpr,
                       HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, SPLIT: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, INT4: tl.constexpr, EMULATE: tl.constexpr,
                       PDL: tl.constexpr, STAGES: tl.constexpr, TILE_N: tl.constexpr, TILE_KW: tl.constexpr):
    """Program p takes tiles p, p + G, ... of the T = row blocks x SPLIT tiles (tile t: row block t // SPLIT, K slice
    t % SPLIT) and stores each tile's partial sums as a `reduce_kernel` split-K program does."""
    wait_for_prior(PDL)
    for t in tl.range(tl.program_id(0), T, G, num_stages=STAGES):
        pid_n = t // SPLIT
        pid_k = t % SPLIT
        w, s, o, rows, row_ok = load_tile(codes_ptr, scale_ptr, offset_ptr, pid_n, pid_k, N, K, HAS_OFFSET, GROUP,
                                          BLOCK_N, BLOCK_KW, INT4, TILE_N, TILE_KW)
        partial, ss = tile_partial(w, s, o, pid_k, a_ptr, nw_ptr, K, MODE, HAS_OFFSET, ZERO, GROUP, BLOCK_N,
                                   BLOCK_KW, INT4, EMULATE)
        store_partial(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, N, MODE, SPLIT)


def persistent_gemv(w: Int4Groups | Int8Groups, a: torch.Tensor, nw: torch.Tensor | None, out: torch.Tensor,
                    mode: int, cfg: tuple[int, ...], scratch: SplitKScratch, programs: int, pdl: bool = True,
                    eps: float = 1e-5) -> torch.Tensor:
    """What gemv_splitk's call over w with SplitKConfig(block_n, block_kw, reduce_kernel=True) writes (MODE 0: out =
    W @ (rmsnorm(a) * nw); 1: out += W @ a; 2: out += W @ SwiGLU(a)), its tiles taken by `programs` programs.
    cfg = (block_n, block_kw, warps, stages)."""
    block_n, block_kw, warps, stages = cfg[:4]
    n, k = w.shape
    split = triton.cdiv(k // w.per_word, block_kw)
    tiles = triton.cdiv(n, block_n) * split
    grid = min(tiles, programs)
    int4 = isinstance(w, Int4Groups)
    pdl = pdl and w.codes.is_cuda
    layout = w.tiles or (0, 0)
    _persistent_kernel[(grid,)](
        w.codes.view(torch.int32), w.scale, w.offset if w.offset is not None else w.scale, a,
        nw if nw is not None else a, scratch.partial, n, k, tiles, grid, MODE=mode, HAS_OFFSET=w.offset is not None,
        ZERO=float(INT4_ZERO) if int4 and w.offset is None else 0.0, SPLIT=split, GROUP=w.group, BLOCK_N=block_n,
        BLOCK_KW=block_kw, INT4=int4, EMULATE=not w.codes.is_cuda, PDL=pdl, STAGES=stages, TILE_N=layout[0],
        TILE_KW=layout[1], num_warps=warps, num_stages=stages, **launch_options(pdl))
    launch_reduce(scratch, None, None, out, n, k, eps, mode, split, pdl)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = compare_args(__doc__.splitlines()[0], "32x128x4x2x0,32x128x4x3x0,32x128x4x3x396,32x128x4x4x264,"
                      "32x64x4x4x0,32x128x8x3x132",
                      "comma-separated BLOCK_N x BLOCK_KW x warps x stages x programs (0: two a SM)", "both",
                      "tile-major weights of the config's block, row-major, or both")
    args = ap.parse_args(argv)
    configs = [parse(c) for c in args.configs.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    device = torch.device("cuda")

    def candidates(weights, n, k, mode) -> list[Candidate]:
        found = []
        for cfg in configs:
            programs = cfg[4] or 2 * sms
            scratch = SplitKScratch.zeros(scratch_floats(weights[0], SplitKConfig(cfg[0], cfg[1])), 1, device)
            for suffix, ws in layouts(weights, cfg[0], cfg[1], args.layout):
                found.append(Candidate(
                    "persistent " + "x".join(str(v) for v in cfg[:4]) + f" G{programs}" + suffix, ws,
                    lambda w, a, nw, out, cfg=cfg, mode=mode, scratch=scratch, programs=programs: persistent_gemv(
                        w, a, nw, out, mode, cfg, scratch, programs)))
        return found

    compare_to_shipped(args.bits, args.projections.split(","), args.layers, args.rounds, args.check, candidates)


if __name__ == "__main__":
    main()
