"""Probe: the split-K decode GEMV (gemv_splitk._splitk_kernel with its reduce kernel) over LLaMA-2-7B's four
projections, int4 (or int8: `--bits 8`) weights stored row-major against tile-major (`Int4Groups.tiled`: each
program's codes, scales and offsets one contiguous run; bench.probes.read_ceiling measures what the layout alone
does to plain reads), for each block config in `--configs` (the tiles follow the block: `quant.tiles.tiles_for`).
Each projection in its step's mode (qkv and gate_up with the RMSNorm, o with the residual, down with SwiGLU and the
residual), `layers` distinct weights a graph, PDL; whether each layout's outputs equal the first config's row-major
ones bit for bit (on a GPU they may differ in the order of sums).

    python -m bench.probes.tiled_int4 [--bits 4] [--configs 32x128x4,64x64x4] [--projections qkv,o] [--layers 32]
        [--rounds 5]
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
from graph_executor.quant.formats import Int4Groups, Int8Groups
from graph_executor.quant.tiles import tiles_for

MATRICES = (("qkv", 12288, 4096, 0), ("o", 4096, 4096, 1), ("gate_up", 22016, 4096, 0), ("down", 4096, 11008, 2))


def random_packed(bits: int, n: int, k: int, device: torch.device) -> Int4Groups | Int8Groups:
    """Random codes with groups of 32 and an offset (int4's q4_1-like, int8's Q5_1-like layout)."""
    scale = (torch.rand(n, k // 32, device=device) * 0.02).half()
    if bits == 4:
        return Int4Groups(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device), scale, -8 * scale, 32)
    return Int8Groups(torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device), scale, scale * 0.5, 32)


def launch(w: Int4Groups | Int8Groups, a: torch.Tensor, nw: torch.Tensor, out: torch.Tensor, mode: int,
           scratch: SplitKScratch, cfg: SplitKConfig) -> None:
    """The step's call for `mode` (0: out = W @ rmsnorm(a) * nw; 1: out += W @ a; 2: out += W @ SwiGLU(a)) over w,
    stored as it is (row-major, or tile-major: `w.tiled`)."""
    if mode == 0:
        gemv_splitk.rmsnorm_gemv(w, a, nw, 1e-5, out, scratch, cfg=cfg)
    elif mode == 1:
        gemv_splitk.gemv_residual(w, a, out, scratch, cfg)
    else:
        gemv_splitk.silu_gemv_residual(w, a, out, scratch, cfg)


def parse_config(text: str) -> SplitKConfig:
    """`32x128x4`: block_n x block_kw x num_warps, with PDL and the reduce kernel (the step's)."""
    n, kw, warps = (int(v) for v in text.split("x"))
    return SplitKConfig(n, kw, warps, pdl=True, reduce_kernel=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4, help="int4 or int8 codes")
    ap.add_argument("--configs", default="32x128x4", help="comma-separated block configs, block_n x block_kw "
                    "(32-bit words of codes) x warps; the first is the baseline")
    ap.add_argument("--projections", default=",".join(m[0] for m in MATRICES), help="which of qkv,o,gate_up,down")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the configs and layouts")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    configs = [parse_config(c) for c in args.configs.split(",")]
    wanted = args.projections.split(",")
    if unknown := set(wanted) - {m[0] for m in MATRICES}:
        raise SystemExit(f"--projections: unknown {sorted(unknown)}")
    print(f"int{args.bits} split-K GEMVs on {torch.cuda.get_device_name()}, {args.layers} layers a graph, reduce "
          f"kernel, PDL; median of {args.rounds} alternating rounds")
    print("| projection | block | layout | ms | TB/s | vs first | outputs equal |")
    print("|---|---|---|---|---|---|---|")
    for name, n, k, mode in MATRICES:
        if name not in wanted:
            continue
        weights = [random_packed(args.bits, n, k, device) for _ in range(args.layers)]
        nbytes = weights[0].nbytes * args.layers
        a = torch.randn(2 * k if mode == 2 else k, device=device).half()
        nw = torch.rand(k, device=device).half()
        init = torch.randn(n, device=device).half()  # the residual each replay starts from (modes 1 and 2)
        variants = {}  # label -> (graph, its weights, out)
        for cfg in configs:
            block = f"{cfg.block_n}x{cfg.block_kw}x{cfg.num_warps}"
            tiles = tiles_for(weights[0], cfg.block_n, cfg.block_kw)
            scratch = SplitKScratch.zeros(scratch_floats(weights[0], cfg), triton.cdiv(n, cfg.block_n), device)
            for t in (None, tiles) if tiles is not None else (None,):
                stored = [w if t is None else w.tiled(t) for w in weights]
                out = torch.zeros(n, device=device).half()

                def calls(stored=stored, out=out, cfg=cfg, scratch=scratch) -> None:
                    out.copy_(init)
                    for w in stored:
                        launch(w, a, nw, out, mode, scratch, cfg)
                label = (block, "row-major" if t is None else f"tile-major {t[0]}x{t[1]}")
                variants[label] = (graphed(calls), stored, out)
        times: dict[tuple[str, str], list[float]] = {label: [] for label in variants}
        for _ in range(args.rounds):
            for label, (graph, _, _) in variants.items():
                times[label].append(time_gpu(graph.replay, device) * 1e3)
        first, reference = None, None
        for label, (graph, _, out) in variants.items():
            graph.replay()
            torch.cuda.synchronize()
            ms = statistics.median(times[label])
            first = first or ms
            reference = out.clone() if reference is None else reference
            print(f"| {name} x{args.layers} | {label[0]} | {label[1]} | {ms:.3f} | {nbytes / ms / 1e9:.2f} | "
                  f"{ms / first:.3f} | {torch.equal(out, reference)} |", flush=True)
        variants.clear()
        weights.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
