"""FP8 prefill GEMMs per projection of a dummy preset (issue 10: TTFT with packed weights): today's FP8 path for long
prompts (dequantize the codes to fp16, then cuBLAS) against the two-digit `_scaled_mm` of `kernels/fp8_prefill.py`,
with fp16 weights' cuBLAS GEMM beside them, per prompt length.

Prediction (LLaMA-2-7B, 500 tokens): the dequantize pass reads 1 and writes 2 bytes a weight, then cuBLAS reads 2:
~5 bytes a weight against fp16's 2, ~5 ms over fp16 in a whole prefill; the two-digit GEMM does fp16's tensor work
on 2T rows at twice the rate, reads 1 byte a weight, and adds one pass over the [2T, N] output: within ~10-20% of
fp16's GEMM, so the FP8 prefill's TTFT at 500 tokens ~13 ms against 17 today (fp16 11.2; bench/NOTES.md).

Each variant runs as a CUDA graph over `--layers` copies of the projection (distinct weights, so that L2 holds none),
median of `--replays`; the table gives ms per layer and the ratio to fp16. The GEMM's output dtype: float16 where
this build's `_scaled_mm` takes it with row scales, else bfloat16 (printed). Errors: max relative to float64 over
the last layer's output (elementwise, against max(|ref|, rms(ref))).

    python -m bench.probes.fp8_prefill [--model llama-2-7b] [--tokens 128,500,2000] [--layers 8]
"""

from __future__ import annotations

import argparse

import torch

from bench.floors import time_gpu
from bench.probes.dense_splitk import shapes
from bench.probes.verify_plan import graphed
from graph_executor.kernels import fp8_prefill, gemm_lowbit
from graph_executor.quant.formats import quantize_fp8


def _gemm_dtype(device: torch.device) -> torch.dtype:
    """float16 if this build's `_scaled_mm` takes it with row scales, else bfloat16."""
    w = quantize_fp8(torch.randn(32, 64, device=device))
    try:
        fp8_prefill.matmul(torch.randn(16, 64, device=device, dtype=torch.float16), w,
                           torch.empty(16, 32, device=device, dtype=torch.float16))
        torch.cuda.synchronize(device)
        return torch.float16
    except RuntimeError as e:
        print(f"_scaled_mm refused a float16 output with row scales ({str(e).splitlines()[0][:120]}): bfloat16")
        return torch.bfloat16


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    floor = ref.pow(2).mean().sqrt()
    return float(((out - ref).abs() / torch.maximum(ref.abs(), floor)).max())


def measure(model: str, names: list[str], tokens: list[int], layers: int, replays: int) -> None:
    device = torch.device("cuda")
    gemm = _gemm_dtype(device)
    print(f"GEMM output dtype of the two-digit path: {gemm}")
    print("| projection | tokens | fp16 mm | dequantize + mm | two-digit FP8 | two-digit / fp16 | dequantize / fp16 | "
          "error two-digit | error dequantize |")
    print("|---|---|---|---|---|---|---|---|---|")
    for index, name in enumerate(names):
        n, k = shapes(model)[name]
        g = torch.Generator(device=device).manual_seed(index)
        dense = [torch.randn(n, k, device=device, dtype=torch.float16, generator=g) * 0.02 for _ in range(layers)]
        fp8 = [quantize_fp8(w) for w in dense]
        scratch = torch.empty(n, k, device=device, dtype=torch.float16)  # the dequantized copy (one, as the model)
        for t in tokens:
            x = torch.randn(t, k, device=device, dtype=torch.float16, generator=g)
            outs = [torch.empty(t, n, device=device, dtype=torch.float16) for _ in range(3)]

            def fp16() -> None:
                for w in dense:
                    torch.mm(x, w.t(), out=outs[0])

            def dequantized() -> None:
                for w in fp8:
                    torch.mm(x, gemm_lowbit.dequantize(w, scratch).t(), out=outs[1])

            def two_digit() -> None:
                for w in fp8:
                    fp8_prefill.matmul(x, w, outs[2], gemm_dtype=gemm)

            ms = []
            for fn in (fp16, dequantized, two_digit):
                graph = graphed(fn)
                ms.append(time_gpu(graph.replay, device, repeats=replays) * 1e3 / layers)
                del graph
            w0 = fp8[-1].codes.double() * fp8[-1].scale.double()[:, None]
            ref = x.double() @ w0.t()
            print(f"| {name} | {t} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[2]:.3f} | {ms[2] / ms[0]:.2f} | "
                  f"{ms[1] / ms[0]:.2f} | {_error(outs[2], ref):.1e} | {_error(outs[1], ref):.1e} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="the dummy preset whose projection shapes are measured")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down", help="comma list of qkv, o, gate_up, down")
    ap.add_argument("--tokens", default="128,500,2000", help="comma list of prompt lengths")
    ap.add_argument("--layers", type=int, default=8, help="distinct weight copies per graph (default 8)")
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    measure(args.model, args.shapes.split(","), [int(t) for t in args.tokens.split(",")], args.layers, args.replays)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
