"""Prefill GEMMs over FP8 weights (`Fp8Rows`) on the FP8 tensor cores, with each activation as two e4m3 digits
(issue 10: prompts with packed weights; not on the serving path until measured on the card).

Today a prompt of DEQUANTIZE_ROWS+ rows dequantizes each FP8 weight to fp16 (a pass that reads 1 and writes 2 bytes a
weight) and multiplies in fp16 (reading those 2 bytes again). Here the weights stay FP8 and `torch._scaled_mm` reads
them once, at twice fp16's tensor rate. The activations must be FP8 too, and one e4m3 digit (3 mantissa bits, a
relative error up to 2**-4) costs quality: SmolLM2-135M's perplexity 1.0177x dense on the FP8 prefill path against
1.0073x with fp16 activations (bench/NOTES.md, sixteenth session). Two digits do not:

    s = max |x_t| / 448 per token row,  h = e4m3(x / s),  l = e4m3(x / s - h),  x ~= s (h + l)

(1.0075x: l carries the next 3-4 bits; an element's error is below 2**-8 of itself, or 2**-10 s where h is
subnormal). One GEMM over the stacked rows [h; l] (2T rows, row scales [s; s], the weight's row scales) does fp16's
tensor-core work and reads W once; `out = Y[:T] + Y[T:]` adds the digits' products.
"""

from __future__ import annotations

import torch

from graph_executor.quant.formats import FP8_MAX, Fp8Rows

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TINY = 1e-30  # a row of zeros keeps scale TINY: its digits are all 0


def split_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (float16/bfloat16/float32) -> (digits [2T, K] float8_e4m3fn: the h rows, then the l rows;
    scales [2T, 1] float32: each row's s, twice), with x[t] ~= s[t] * (h[t] + l[t])."""
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(f"split_digits: x must be a 2-D float16/bfloat16/float32 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    xf = x.float()
    s = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(TINY)  # [T, 1]
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX)  # |q| <= 448 up to rounding: clamped, as e4m3fn has no inf (NaN past it)
    h = q.to(torch.float8_e4m3fn)
    low = (q - h.float()).to(torch.float8_e4m3fn)  # |q - h| <= half an e4m3 step of h: always in range
    return torch.cat([h, low]), torch.cat([s, s])


def matmul(x: torch.Tensor, w: Fp8Rows, out: torch.Tensor, bias: torch.Tensor | None = None,
           accumulate: bool = False, gemm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out [T, N] = x [T, K] @ W^T (+ bias), or out += x @ W^T, W = w's codes times its row scales. `gemm_dtype`:
    the GEMM's output dtype (default out's; `_scaled_mm` with row scales takes only bfloat16 on some builds)."""
    t, k = x.shape
    n, wk = w.shape
    if wk != k or tuple(out.shape) != (t, n) or out.dtype not in ACT_DTYPES:
        raise ValueError(f"fp8_prefill.matmul: x {tuple(x.shape)}, W {tuple(w.shape)} and out {tuple(out.shape)} "
                         f"{out.dtype} do not fit out [T, N] = x [T, K] @ W^T")
    digits, scales = split_digits(x)  # [2T, K], [2T, 1]
    y = torch._scaled_mm(digits, w.codes.t(), scale_a=scales, scale_b=w.scale[None, :],
                         out_dtype=gemm_dtype or out.dtype)  # [2T, N]: h's products, then l's
    if accumulate:
        return out.add_(y[:t]).add_(y[t:])
    torch.add(y[:t], y[t:], out=out)
    return out if bias is None else out.add_(bias)
