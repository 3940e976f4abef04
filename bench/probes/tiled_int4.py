"""Probe: the int4 split-K decode GEMV (gemv_splitk._splitk_kernel with its reduce kernel, INT4_PLAN's 32 x 128
words) over LLaMA-2-7B's four projections, its weights stored row-major (as today) against tile-major
(formats.tile_major: each program's codes, scales and offsets one contiguous run; bench.probes.read_ceiling
measures what the layout alone does to plain reads). Each projection in its step's mode (qkv and gate_up with
the RMSNorm, o with the residual, down with SwiGLU and the residual), `layers` distinct weights a graph, PDL;
the outputs of both layouts compared bit for bit.

    python -m bench.probes.tiled_int4 [--layers 32] [--rounds 5] [--down-tiles 32x32]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor.kernels.gemv_splitk import (
    SplitKConfig,
    SplitKScratch,
    _splitk_kernel,
    launch_reduce,
    scratch_floats,
)
from graph_executor.kernels.pdl import launch_options
from graph_executor.quant.formats import Int4Groups, tile_major

MATRICES = (("qkv", 12288, 4096, 0), ("o", 4096, 4096, 1), ("gate_up", 22016, 4096, 0), ("down", 4096, 11008, 2))


def random_int4(n: int, k: int, device: torch.device) -> Int4Groups:
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scale = (torch.rand(n, k // 32, device=device) * 0.02).half()
    return Int4Groups(codes, scale, -8 * scale, 32)


def stored(w: Int4Groups, tiles: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes as int32 words, scale, offset), row-major or tile-major with `tiles` = (rows, words)."""
    codes = w.codes.view(torch.int32)
    if tiles is None:
        return codes, w.scale, w.offset
    rows, words = tiles
    return tile_major(codes, rows, words), tile_major(w.scale, rows, words // 4), tile_major(w.offset, rows, words // 4)


def launch(parts: tuple[torch.Tensor, ...], n: int, k: int, tiles: tuple[int, int] | None, a: torch.Tensor,
           nw: torch.Tensor, out: torch.Tensor, mode: int, scratch: SplitKScratch, cfg: SplitKConfig) -> None:
    """gemv_splitk._launch's call (offsets present, no bias), with the storage's tiles passed to the kernel."""
    codes, scale, offset = parts
    split = triton.cdiv(k // 8, cfg.block_kw)
    _splitk_kernel[(triton.cdiv(n, cfg.block_n), split)](
        codes, scale, offset, a, nw, out, out, scratch.partial, scratch.count, n, k, 1e-5, MODE=mode,
        HAS_OFFSET=True, ZERO=0.0, HAS_BIAS=False, SPLIT=split, SPLIT_P2=triton.next_power_of_2(split), GROUP=32,
        BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw, INT4=True, EMULATE=not codes.is_cuda, num_warps=cfg.num_warps,
        num_stages=1, PDL=cfg.pdl, EARLY=False, FIXUP=False, TILE_N=tiles[0] if tiles else 0,
        TILE_KW=tiles[1] if tiles else 0, **launch_options(cfg.pdl))
    launch_reduce(scratch, None, None, out, n, k, 1e-5, mode, split, cfg.pdl)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the layouts")
    ap.add_argument("--down-tiles", default="32x32", help="down_proj's tiles (its 1,376 words a row are not whole "
                    "128-word tiles): rows x words")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    cfg = SplitKConfig(32, 128, 4, pdl=True, reduce_kernel=True)
    print(f"int4 split-K GEMVs on {torch.cuda.get_device_name()}, {args.layers} layers a graph, 32 x 128 words a "
          f"program, reduce kernel, PDL; median of {args.rounds} alternating rounds")
    print("| projection | layout | ms | TB/s | vs row-major | outputs equal |")
    print("|---|---|---|---|---|---|")
    for name, n, k, mode in MATRICES:
        tiles = tuple(int(v) for v in args.down_tiles.split("x")) if name == "down" else (32, 128)
        weights = [random_int4(n, k, device) for _ in range(args.layers)]
        nbytes = weights[0].nbytes * args.layers
        a = torch.randn(2 * k if mode == 2 else k, device=device).half()
        nw = torch.rand(k, device=device).half()
        scratch = SplitKScratch.zeros(scratch_floats(weights[0], cfg), triton.cdiv(n, 32), device)
        layouts = {"row-major": None, f"tile-major {tiles[0]}x{tiles[1]}": tiles}
        outs, graphs = {}, {}
        init = torch.randn(n, device=device).half()  # the residual each replay starts from (modes 1 and 2)
        for label, t in layouts.items():
            parts = [stored(w, t) for w in weights]
            out = torch.zeros(n, device=device).half()

            def calls(parts=parts, t=t, out=out, init=init) -> None:
                out.copy_(init)
                for p in parts:
                    launch(p, n, k, t, a, nw, out, mode, scratch, cfg)
            graphs[label] = (graphed(calls), parts)
            outs[label] = out
        times: dict[str, list[float]] = {label: [] for label in layouts}
        for _ in range(args.rounds):
            for label, (graph, _) in graphs.items():
                times[label].append(time_gpu(graph.replay, device) * 1e3)
        first = None
        for label in layouts:
            graphs[label][0].replay()
            torch.cuda.synchronize()
            ms = statistics.median(times[label])
            first = first or ms
            same = torch.equal(outs[label], outs["row-major"])
            print(f"| {name} x{args.layers} | {label} | {ms:.3f} | {nbytes / ms / 1e9:.2f} | {ms / first:.3f} | "
                  f"{same} |", flush=True)
        graphs.clear()
        weights.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
