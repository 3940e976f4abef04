"""Prefill projections over FP8 weights (`Fp8Rows`) on the FP8 tensor cores: out [T, N] = x [T, K] @ W^T with x
quantized per token row to float8 e4m3 (one float32 scale a row: its largest |value| / 448) and `torch._scaled_mm`
applying both scales (the rows' and the weight's per-output-row scale) in its epilogue: W8A8, as vLLM's dynamic FP8.

Why: long prompts over packed weights otherwise dequantize each projection whole to fp16 and call cuBLAS, which
writes and reads back the fp16 weight (on LLaMA-2-7B +5 ms of TTFT at 100 tokens, H200); here the weight is read as
it is stored (1 byte a weight) and the GEMM runs at FP8 rate. The cost is the activations' rounding to e4m3 (3
mantissa bits: up to 2^-4 of each value), a few 1e-2 of an output's rms, where the fp16 path rounds to 2^-11; the
decode GEMVs keep fp16 activations. On SmolLM2-135M that rounding costs 1.8% of perplexity (W8A16: 0.75%; the
issue's FP8 target is 1%; bench/NOTES.md), so it is an opt-in: off unless a prefill step is given
`fp8_scaled_mm_rows`.

Row-wise scaling on CUDA wants bfloat16 output: the product comes out in bfloat16 (8 mantissa bits, under the
activations' rounding above) and is added or copied into `out` in out's dtype.
"""

from __future__ import annotations

import torch

from graph_executor.quant.formats import Fp8Rows

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
TINY = 1e-12  # an all-zero row's amax: its scale stays finite and its codes 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (float16, bfloat16 or float32) -> (codes [T, K] float8_e4m3fn, scale [T, 1] float32), x ~= codes *
    scale row by row; each row's largest |value| maps to 448."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(TINY) / E4M3_MAX  # [T, 1]
    codes = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # [T, K]
    return codes, scale


def matmul(x: torch.Tensor, w: Fp8Rows, out: torch.Tensor, bias: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
    """out [T, N] = x [T, K] @ W^T (+ bias [N]), or out += x @ W^T, on FP8 tensor cores (module doc)."""
    if not isinstance(w, Fp8Rows):
        raise TypeError(f"fp8_scaled_mm.matmul: an Fp8Rows weight, got {type(w).__name__}")
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k or tuple(out.shape) != (x.shape[0], n):
        raise ValueError(f"fp8_scaled_mm.matmul: x [T, {k}] and out [T, {n}], got x {tuple(x.shape)}, out "
                         f"{tuple(out.shape)}")
    codes, scale = quantize_rows(x)
    product_dtype = torch.bfloat16 if x.is_cuda else torch.float32
    # w.codes [N, K] row-major, so its transpose [K, N] is column-major: the layout _scaled_mm wants for its B
    y = torch._scaled_mm(codes, w.codes.t(), scale_a=scale, scale_b=w.scale.view(1, n),
                         out_dtype=product_dtype)  # [T, N]
    if accumulate:
        return out.add_(y)
    if bias is not None:
        return torch.add(y, bias, out=out)
    return out.copy_(y)
