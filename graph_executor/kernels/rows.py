"""Row-wise kernels of the prefill step: RMSNorm and SwiGLU, one launch each instead of ~7 torch ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels.pdl import launch_options, wait_for_prior


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, K, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)
    tl.store(out_ptr + row * stride_out + cols, (x * scale * w).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < K
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + K + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=ok)


def rmsnorm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor,
                 pdl: bool = False) -> torch.Tensor:
    """x [T, K] -> out [T, K] = x * rsqrt(mean(x^2) + eps) * weight (float32 inside). `pdl`: launched with
    programmatic dependent launch (kernels/pdl.py)."""
    t, k = x.shape
    _rmsnorm_kernel[(t,)](x, weight, out, x.stride(0), out.stride(0), k, eps, BLOCK=triton.next_power_of_2(k),
                          PDL=pdl, **launch_options(pdl))
    return out


def silu_mul_rows(gate_up: torch.Tensor, out: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """gate_up [T, 2I] -> out [T, I] = silu(gate) * up."""
    t, k = out.shape
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(k, block))](gate_up, out, gate_up.stride(0), out.stride(0), k, BLOCK=block,
                                                 PDL=pdl, **launch_options(pdl))
    return out
