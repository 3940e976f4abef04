"""Probe: the int4 split-K decode GEMV (gemv_splitk._splitk_kernel with its reduce kernel, INT4_PLAN's 32 x 128
words) over LLaMA-2-7B's four projections, its weights stored row-major (as today) against tile-major
(`Int4Groups.tiled`: each program's codes, scales and offsets one contiguous run; bench.probes.read_ceiling
measures what the layout alone does to plain reads). Each projection in its step's mode (qkv and gate_up with
the RMSNorm, o with the residual, down with SwiGLU and the residual), `layers` distinct weights a graph, PDL;
whether the two layouts' outputs are equal bit for bit (on a GPU they may differ in the order of sums).

    python -m bench.probes.tiled_int4 [--layers 32] [--rounds 5] [--down-tiles 32x32]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor.kernels import gemv_splitk
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch, scratch_floats
from graph_executor.quant.formats import Int4Groups

MATRICES = (("qkv", 12288, 4096, 0), ("o", 4096, 4096, 1), ("gate_up", 22016, 4096, 0), ("down", 4096, 11008, 2))


def random_int4(n: int, k: int, device: torch.device) -> Int4Groups:
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scale = (torch.rand(n, k // 32, device=device) * 0.02).half()
    return Int4Groups(codes, scale, -8 * scale, 32)


def launch(w: Int4Groups, a: torch.Tensor, nw: torch.Tensor, out: torch.Tensor, mode: int, scratch: SplitKScratch,
           cfg: SplitKConfig) -> None:
    """The step's call for `mode` (0: out = W @ rmsnorm(a) * nw; 1: out += W @ a; 2: out += W @ SwiGLU(a)) over w,
    stored as it is (row-major, or tile-major: `w.tiled`)."""
    if mode == 0:
        gemv_splitk.rmsnorm_gemv(w, a, nw, 1e-5, out, scratch, cfg=cfg)
    elif mode == 1:
        gemv_splitk.gemv_residual(w, a, out, scratch, cfg)
    else:
        gemv_splitk.silu_gemv_residual(w, a, out, scratch, cfg)


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
            stored = [w if t is None else w.tiled(t) for w in weights]
            out = torch.zeros(n, device=device).half()

            def calls(stored=stored, out=out, init=init) -> None:
                out.copy_(init)
                for w in stored:
                    launch(w, a, nw, out, mode, scratch, cfg)
            graphs[label] = (graphed(calls), stored)
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
