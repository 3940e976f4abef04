"""Probe: the fp16 prefill GEMMs of LLaMA-2-7B at 100-500 prompt tokens, cuBLAS formulations side by side.

Why (issue 12): the 7B prefill at 200 tokens takes ~6.9 ms at the executor against a floor of ~3.5 (2 x params x
tokens at the card's measured matmul rate); the TTFT target is 1.3x + 0.3 ms. The prefill is four cuBLAS GEMMs a
layer (`projections.matmul`: out [T, N] = x [T, K] @ W^T, the residual ones as addmm_). This times each projection
at each prompt length over `layers` distinct weights a CUDA graph (so the weights come from HBM, as in a step), in
the step's formulation and in others that compute the same product:

- `mm`: torch.mm(x, W.t(), out) (the step's; `addmm` for o and down: out += x @ W^T);
- `swap`: torch.mm(W, x.t(), out_t) into a [N, T] buffer (tokens as the GEMM's N: other tiles for a small T);
- `lt`: `mm` with torch's preferred BLAS library set to cuBLASLt (its heuristics, not cuBLAS's);
- `pad`: `mm` on T rounded up to a multiple of 64 (tile-aligned M).

Prints ms and TFLOP/s per (projection, tokens, variant), the whole layer's sum, and the prefill floor's share.

    python -m bench.probes.prefill_gemm [--tokens 100,200,300,500] [--layers 16]
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
RESIDUAL = ("o", "down")  # addmm_ into the residual stream in the step


def timed_graph(fn, reps: int) -> float:
    """Median ms of a CUDA graph of fn() over `reps` replays (after two eager warm-ups)."""
    from bench.probes.verify_plan import graphed
    from graph_executor.graphs import median_event_ms

    return median_event_ms(graphed(fn).replay, reps)


def cublas_layer_ms(x: torch.Tensor, out: torch.Tensor, weights: list[torch.Tensor], accumulate: bool,
                    reps: int) -> tuple[float, float]:
    """(cuBLAS, cuBLASLt) ms per weight of the step's product out [T, N] (+)= x [T, K] @ W^T over `weights` in one
    graph: the baselines of the Triton GEMM probes (prefill_splitk, prefill_tma)."""
    def step() -> None:
        for w in weights:
            if accumulate:
                out.addmm_(x, w.t())
            else:
                torch.mm(x, w.t(), out=out)
    mm = timed_graph(step, reps) / len(weights)
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return mm, timed_graph(step, reps) / len(weights)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def reference_case(t: int, n: int, k: int, accumulate: bool,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [T, K], W [N, K], out's start [T, N], the float64 result) of one seeded check of a Triton GEMM probe."""
    g = torch.Generator(device=device).manual_seed(t * 7 + n)
    x = torch.randn(t, k, device=device, dtype=torch.float16, generator=g)
    w = torch.randn(n, k, device=device, dtype=torch.float16, generator=g) * 0.02
    base = torch.randn(t, n, device=device, dtype=torch.float16, generator=g)
    return x, w, base, x.double() @ w.double().t() + (base.double() if accumulate else 0)


def print_layer_sums(sums: dict[tuple[int, str], float], ours: str) -> None:
    """The Triton GEMM probes' last table: per prompt length a layer's ms under cuBLAS ("mm"), cuBLASLt ("lt") and
    the probe's best config per projection ("ours", labelled `ours`)."""
    print(f"\n| rows | mm layer ms | lt layer ms | {ours} layer ms (best per projection) | x32 layers: mm -> best |")
    print("|---|---|---|---|---|")
    for t in sorted({t for t, _ in sums}):
        mm, lt, best = (sums[(t, v)] for v in ("mm", "lt", "ours"))
        print(f"| {t} | {mm:.4f} | {lt:.4f} | {best:.4f} | {32 * mm:.3f} -> {32 * min(mm, lt, best):.3f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="100,200,300,500")
    ap.add_argument("--layers", type=int, default=16, help="distinct weights a graph (each read from HBM)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variants", default="mm,swap,lt,pad")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    variants = args.variants.split(",")
    print(f"{torch.cuda.get_device_name()}: fp16 prefill GEMMs of LLaMA-2-7B, {args.layers} distinct weights a graph, "
          f"ms per layer (median of {args.reps} replays / layers)")
    print("| projection | tokens | " + " | ".join(f"{v} ms | {v} TFLOP/s" for v in variants) + " |")
    print("|---|---|" + "---|---|" * len(variants))
    sums = {}
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device=device, dtype=torch.float16, generator=g) * 0.02
                   for _ in range(args.layers)]
        for t in (int(v) for v in args.tokens.split(",")):
            row = []
            for v in variants:
                rows = -(-t // 64) * 64 if v == "pad" else t
                x = torch.randn(rows, k, device=device, dtype=torch.float16, generator=g)
                out = torch.zeros(rows, n, device=device, dtype=torch.float16)
                out_t = torch.zeros(n, rows, device=device, dtype=torch.float16)

                def step(v=v, x=x, out=out, out_t=out_t, weights=weights) -> None:
                    for w in weights:
                        if v == "swap":
                            torch.mm(w, x.t(), out=out_t)
                        elif name in RESIDUAL:
                            out.addmm_(x, w.t())
                        else:
                            torch.mm(x, w.t(), out=out)
                previous = torch.backends.cuda.preferred_blas_library()
                if v == "lt":
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                try:
                    ms = timed_graph(step, args.reps) / args.layers
                finally:
                    torch.backends.cuda.preferred_blas_library(previous)
                row.append(ms)
                sums[(t, v)] = sums.get((t, v), 0.0) + ms
            flops = 2.0 * n * k * t
            print(f"| {name} | {t} | " + " | ".join(f"{ms:.4f} | {flops / ms / 1e9:.0f}" for ms in row) + " |",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    params = sum(n * k for n, k in SHAPES.values())
    print("\n| tokens | " + " | ".join(f"{v} layer ms" for v in variants) + " | x32 layers (best) | FLOP floor at 758 "
          "TFLOP/s (32 layers) |")
    print("|---|" + "---|" * len(variants) + "---|---|")
    for t in sorted({t for t, _ in sums}):
        best = min(sums[(t, v)] for v in variants)
        print(f"| {t} | " + " | ".join(f"{sums[(t, v)]:.4f}" for v in variants)
              + f" | {32 * best:.3f} | {32 * 2.0 * params * t / 758e12 * 1e3:.3f} |")


if __name__ == "__main__":
    main()
