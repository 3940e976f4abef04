"""Probe: how fast can kernels that only read a decode step's weights go, one kernel per projection as the step
launches them? The ceiling of any design that keeps one GEMV kernel per projection (issue 10's int4 target of
1.5 ms on LLaMA-2-7B, issue 12's fp16 1.15x), measured on the card rather than assumed from the peak.

    python -m bench.probes.read_ceiling [--shapes int4-7b,fp16-7b] [--layers 32] [--blocks 2048,4096,8192]
        [--warps 4,8] [--tiny 0,1]

Each read kernel is one-shot: program p reads BLOCK int32 words (as 16-byte loads) of its projection's buffer and
stores their xor (so nothing is optimised away). Launched with programmatic dependent launch, as the step's
kernels are. Three timings per shape, each a CUDA graph replay over `layers` distinct copies of a layer (no L2
reuse between calls):
- per projection: `layers` back-to-back kernels over that projection's size (TB/s);
- the layer sequence: the step's order (qkv, o, gate_up, down per layer) as one kernel per projection, optionally
  each followed by a tiny kernel (`--tiny 1`: one program that reads 16 bytes, the place of a split-K reduce or an
  attention kernel at the latency floor): the per-projection design's floor for the whole step's weights, in ms;
- one kernel reading every layer's bytes (no boundaries at all): the card's ceiling on the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton
import triton.language as tl

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor.kernels.pdl import launch_options, wait_for_prior


@dataclasses.dataclass(frozen=True)
class Shape:
    """One layer's projection sizes in bytes, in the order the step reads them."""
    name: str
    sizes: tuple[tuple[str, int], ...]


def _int4(n: int, k: int) -> int:
    return n * k // 2 + n * (k // 32) * 4  # codes + fp16 scale and offset per group of 32


# LLaMA-2-7B: qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008
SHAPES = {
    "int4-7b": Shape("int4-7b", (("qkv", _int4(12288, 4096)), ("o", _int4(4096, 4096)),
                                 ("gate_up", _int4(22016, 4096)), ("down", _int4(4096, 11008)))),
    "int8-7b": Shape("int8-7b", (("qkv", 12288 * 4096 * 17 // 16), ("o", 4096 * 4096 * 17 // 16),
                                 ("gate_up", 22016 * 4096 * 17 // 16), ("down", 4096 * 11008 * 17 // 16))),
    "fp16-7b": Shape("fp16-7b", (("qkv", 12288 * 4096 * 2), ("o", 4096 * 4096 * 2),
                                 ("gate_up", 22016 * 4096 * 2), ("down", 4096 * 11008 * 2))),
}


@triton.jit
def _read_kernel(src, out, n_words, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(words, axis=0))


@triton.jit
def _tile_kernel(codes, scale, offset, out, KW, GROUPS, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 TILED: tl.constexpr, PDL: tl.constexpr):
    """The loads of one int4 split-K GEMV program (gemv_splitk._splitk_kernel, 32 x 128 words): BLOCK_N rows x
    BLOCK_KW words of codes, and the [BLOCK_N, BLOCK_KW / 4] fp16 scales and offsets of their groups of 32; TILED:
    the same bytes with each program's codes, scales and offsets contiguous (a tile-major layout), else the
    row-major layout the step uses (rows KW words apart, scales and offsets as [N, GROUPS] arrays)."""
    wait_for_prior(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_KW // 4
    r = tl.arange(0, BLOCK_N)[:, None]
    if TILED:
        tile = pid_n.to(tl.int64) * tl.num_programs(1) + pid_k
        w = tl.load(codes + tile * (BLOCK_N * BLOCK_KW) + r * BLOCK_KW + tl.arange(0, BLOCK_KW)[None, :])
        at = tile * (BLOCK_N * NG) + r * NG + tl.arange(0, NG)[None, :]
    else:
        rows = pid_n * BLOCK_N + r
        w = tl.load(codes + rows.to(tl.int64) * KW + pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)[None, :])
        at = rows.to(tl.int64) * GROUPS + pid_k * NG + tl.arange(0, NG)[None, :]
    s = tl.load(scale + at).to(tl.float32)
    o = tl.load(offset + at).to(tl.float32)
    bits = tl.xor_sum(tl.xor_sum(w, axis=1), axis=0)
    tl.store(out + pid_n * tl.num_programs(1) + pid_k, bits.to(tl.float32) + tl.sum(tl.sum(s * o, axis=1), axis=0))


@triton.jit
def _tiny_kernel(src, out, PDL: tl.constexpr):
    wait_for_prior(PDL)
    tl.store(out + tl.arange(0, 4), tl.load(src + tl.arange(0, 4)))


def read(buf: torch.Tensor, out: torch.Tensor, block: int, warps: int) -> None:
    n = buf.numel()
    _read_kernel[(triton.cdiv(n, block),)](buf, out, n, BLOCK=block, PDL=True, num_warps=warps,
                                           **launch_options(True))


def tiny(buf: torch.Tensor, out: torch.Tensor) -> None:
    _tiny_kernel[(1,)](buf, out, PDL=True, num_warps=1, **launch_options(True))


# LLaMA-2-7B's projections as (name, N, K), for the int4 tile loads
INT4_7B_MATRICES = (("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008))


def tile_loads(layers: int, block_n: int, block_kw: int, device: torch.device) -> None:
    """Per projection of LLaMA-2-7B in int4: `layers` calls of the split-K program's loads alone, row-major (the
    step's layout) against tile-major, in TB/s of the bytes the programs read."""
    print(f"\n### int4-7b split-K loads, {block_n} rows x {block_kw} words a program, row-major vs tile-major")
    print("| projection | layout | ms | TB/s |")
    print("|---|---|---|---|")
    for name, n, k in INT4_7B_MATRICES:
        kw, groups = k // 8, k // 32
        split = kw // block_kw  # whole slices only (down's last partial slice is left out)
        grid = (n // block_n, split)
        nbytes = grid[0] * grid[1] * block_n * block_kw * 6  # 4 bytes of codes + 2 x 2 of scale and offset a word
        mats = [(torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device=device),
                 torch.rand(n, groups, device=device).half(), torch.rand(n, groups, device=device).half())
                for _ in range(layers)]
        out = torch.empty(grid[0] * grid[1], device=device)
        for tiled in (False, True):
            def calls(tiled=tiled) -> None:
                for codes, scale, offset in mats:
                    _tile_kernel[grid](codes, scale, offset, out, kw, groups, BLOCK_N=block_n, BLOCK_KW=block_kw,
                                       TILED=tiled, PDL=True, num_warps=4, **launch_options(True))
            ms = time_gpu(graphed(calls).replay, device) * 1e3
            print(f"| {name} x{layers} | {'tile-major' if tiled else 'row-major'} | {ms:.3f} | "
                  f"{nbytes * layers / ms / 1e9:.2f} |", flush=True)
        mats.clear()
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="int4-7b,fp16-7b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--layers", type=int, default=32, help="distinct copies of a layer (the step's layer count)")
    ap.add_argument("--blocks", default="2048,4096,8192", help="comma list of int32 words a program reads")
    ap.add_argument("--warps", default="4,8", help="comma list of warps a program")
    ap.add_argument("--tiny", default="0,1", help="layer sequence without (0) and with (1) a tiny kernel after each")
    ap.add_argument("--tiles", default="32x128,32x64", help="int4 split-K program shapes (rows x words) whose loads "
                    "are timed row-major and tile-major; '' for none")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    for tile in filter(None, args.tiles.split(",")):
        block_n, block_kw = (int(v) for v in tile.split("x"))
        tile_loads(args.layers, block_n, block_kw, device)
    configs = [(int(b), int(w)) for b in args.blocks.split(",") for w in args.warps.split(",")]
    print(f"read-only kernels on {torch.cuda.get_device_name()}, PDL, CUDA graph replays, {args.layers} layers")
    for shape in (SHAPES[s] for s in args.shapes.split(",")):
        layer_words = [size // 4 for _, size in shape.sizes]
        total_words = sum(layer_words) * args.layers
        flat = torch.randint(-2**31, 2**31 - 1, (total_words,), dtype=torch.int32, device=device)
        bufs, at = [], 0  # bufs[layer][projection]: views of one allocation, in the step's order
        for _ in range(args.layers):
            row = []
            for words in layer_words:
                row.append(flat[at:at + words])
                at += words
            bufs.append(row)
        out = torch.empty(triton.cdiv(total_words, min(b for b, _ in configs)), dtype=torch.int32, device=device)
        nbytes = total_words * 4
        print(f"\n### {shape.name}: {nbytes / 1e9:.3f} GB over {args.layers} layers "
              f"({', '.join(f'{n} {s / 1e6:.1f} MB' for n, s in shape.sizes)})")
        print("| what | block words | warps | ms | TB/s |")
        print("|---|---|---|---|---|")
        best: dict[str, tuple[float, int, int]] = {}
        for j, (name, size) in enumerate(shape.sizes):
            for block, warps in configs:
                graph = graphed(lambda b=block, w=warps, j=j: [read(bufs[i][j], out, b, w)
                                                               for i in range(args.layers)])
                ms = time_gpu(graph.replay, device) * 1e3
                tbs = size * args.layers / ms / 1e9
                print(f"| {name} x{args.layers} | {block} | {warps} | {ms:.3f} | {tbs:.2f} |", flush=True)
                if name not in best or ms < best[name][0]:
                    best[name] = (ms, block, warps)
        for with_tiny in (int(t) for t in args.tiny.split(",")):
            def sequence(with_tiny=with_tiny) -> None:
                for i in range(args.layers):
                    for j, (name, _) in enumerate(shape.sizes):
                        read(bufs[i][j], out, best[name][1], best[name][2])
                        if with_tiny:
                            tiny(bufs[i][j], out)
            ms = time_gpu(graphed(sequence).replay, device) * 1e3
            what = "layer sequence, best config each" + (", tiny kernel after each" if with_tiny else "")
            print(f"| {what} | - | - | {ms:.3f} | {nbytes / ms / 1e9:.2f} |", flush=True)
        for block, warps in configs:
            graph = graphed(lambda b=block, w=warps: read(flat, out, b, w))
            ms = time_gpu(graph.replay, device) * 1e3
            print(f"| one kernel, every layer | {block} | {warps} | {ms:.3f} | {nbytes / ms / 1e9:.2f} |", flush=True)
        flat = bufs = out = None  # noqa: F841 (freed before the next shape's)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
