"""The products of the batched decode step (M = 1..16 sequences decoded together), each weight read once for all rows,
with the batch-1 kernels' fusions (`gemv.py`) where the product is ours:

- `rmsnorm_gemm`:  out[m] = W @ (rmsnorm(x[m]) * norm_w) [+ bias]
- `gemm_residual`: x[m] += W @ a[m]
- `silu_gemm_residual`: x[m] += W @ (silu(g[m]) * u[m]), [g, u] = gate_up[m]

Two implementations per function, chosen by `BatchGemvConfig.cublas`. cuBLAS (the default plan): RMSNorm and SwiGLU
as row kernels (`rows.py`) before the product, the residual through `addmm_`'s epilogue, the product written straight
into the caller's buffer; packed weights take the low-bit GEMM there instead (`projections.matmul`: tiles unpacked
in registers, split along K for a few rows). Triton on the tensor cores (dense weights only): at M <= 16 the step is
still bound by reading W once, but the batch-1 kernels' multiply-and-sum per weight would cost M times the
arithmetic; `tl.dot` of a [BLOCK_N, BLOCK_K] weight tile by the [BLOCK_K, 16] activations (rows past M are masked
zeros) does all rows in one instruction stream, RMSNorm's per-row scale applied to the product at the end. It lost to
cuBLAS on the whole step (`BatchGemvPlan`). W is [N, K] row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.kernels.pdl import launch_options, wait_for_prior
from graph_executor.kernels.projections import matmul
from graph_executor.kernels.rows import rmsnorm_rows, silu_mul_rows
from graph_executor.quant.rows import Weight

BLOCK_M = 16  # sequences per program (the tensor core's minimum; rows past the batch are masked zeros)


@dataclass(frozen=True)
class BatchGemvConfig:
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False
    cublas: bool = False  # cuBLAS for the product, the prologue (RMSNorm, SwiGLU) as a row kernel before it


CUBLAS = BatchGemvConfig(cublas=True)


@dataclass(frozen=True)
class BatchGemvPlan:
    """A config per projection. The default runs every product on cuBLAS: the whole 7B step of 4 sequences took
    4.55 ms that way against 6.21 ms with the best tensor-core configs of the per-projection sweep (`TENSOR_CORE`)
    and 3.87 ms for the batch-1 step (H200, `bench.probes.batch_step`, bench/NOTES.md)."""

    qkv: BatchGemvConfig = CUBLAS
    o: BatchGemvConfig = CUBLAS
    gate_up: BatchGemvConfig = CUBLAS
    down: BatchGemvConfig = CUBLAS
    lm_head: BatchGemvConfig = CUBLAS


# The Triton kernels' best configs per projection from `bench.probes.batch_gemv` at M = 4 on an H200 (read TB/s; cuBLAS
# and the batch-1 GEMV in brackets): qkv 3.29 (3.68, 3.94), o 2.12 (2.61, 2.43), down 2.48 (3.38, 3.56); gate_up and
# lm_head as qkv, not swept. Kept for the probes' comparison and for hosts where cuBLAS loses.
TENSOR_CORE = BatchGemvPlan(BatchGemvConfig(64, 256, 4, 2), BatchGemvConfig(64, 256, 4, 4),
                            BatchGemvConfig(64, 256, 4, 2), BatchGemvConfig(64, 256, 4, 4),
                            BatchGemvConfig(64, 256, 4, 2))


@triton.jit
def _dot(w, a, IEEE: tl.constexpr):
    """w [BN, BK] @ a^T, a [BM, BK] -> [BN, BM] float32; float32 operands exact (tests), else the tensor cores."""
    if IEEE:
        return tl.dot(w, tl.trans(a), input_precision="ieee")
    return tl.dot(w, tl.trans(a))


@triton.jit
def _rmsnorm_gemm_kernel(w_ptr, x_ptr, nw_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_out, eps,
                         HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seqs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, seq_ok = rows < N, seqs < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + seqs[:, None] * stride_x + cols[None, :], mask=seq_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)  # [BM, BK]
        nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(w, (x * nw[None, :]).to(w.dtype), IEEE)
    out = acc * (1.0 / tl.sqrt(ss / K + eps))[None, :]  # [BN, BM]
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + seqs[None, :] * stride_out + rows[:, None], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & seq_ok[None, :])


@triton.jit
def _gemm_residual_kernel(w_ptr, a_ptr, x_ptr, M, N, K, stride_a, stride_x, SWIGLU: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          PDL: tl.constexpr):
    wait_for_prior(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seqs = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, seq_ok = rows < N, seqs < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = seq_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + seqs[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SWIGLU:  # each row of a holds [gate (K), up (K)]
            up = tl.load(a_ptr + seqs[:, None] * stride_a + K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            a = a / (1.0 + tl.exp(-a)) * up
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += _dot(w, a.to(w.dtype), IEEE)
    ptrs = x_ptr + seqs[None, :] * stride_x + rows[:, None]
    mask = row_ok[:, None] & seq_ok[None, :]
    residual = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (residual + acc).to(x_ptr.dtype.element_ty), mask=mask)


def _launch(n: int, m: int, cfg: BatchGemvConfig, w: torch.Tensor) -> tuple[tuple[int, int], dict]:
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, BLOCK_M))
    return grid, dict(IEEE=w.dtype == torch.float32, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_M=BLOCK_M,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, PDL=cfg.pdl, **launch_options(cfg.pdl))


def _check(w: Weight, cfg: BatchGemvConfig, *rows: torch.Tensor) -> None:
    if not cfg.cublas and not isinstance(w, torch.Tensor):
        raise ValueError("the Triton batched GEMVs take dense weights (packed ones take the default plan)")
    for t in rows:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"batched GEMV operands are [M, K] rows with unit stride, got {tuple(t.shape)}")


def rmsnorm_gemm(w: Weight, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 bias: torch.Tensor | None = None, cfg: BatchGemvConfig = BatchGemvConfig(),
                 scratch: SplitKScratch | None = None) -> torch.Tensor:
    """w [N, K] (dense, or packed with the default plan), x [M, K], norm_w [K], bias [N] or None -> out [M, N] (any
    float dtype). `scratch`: the low-bit GEMM's split-K partials for packed weights (`prefill_scratch`)."""
    _check(w, cfg, x, out)
    n, k = w.shape
    if cfg.cublas:
        h = rmsnorm_rows(x, norm_w, eps, torch.empty_like(x), pdl=cfg.pdl)  # [M, K]
        if out.dtype == x.dtype and out.is_contiguous():  # straight into out: no copy kernel (qkv, gate_up)
            return matmul(h, w, out, bias=bias, scratch=scratch)
        product = matmul(h, w, torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype), bias=bias,
                         scratch=scratch)  # [M, N] in the activations' dtype
        return out.copy_(product)  # lm_head: float32 logits
    grid, kw = _launch(n, x.shape[0], cfg, w)
    _rmsnorm_gemm_kernel[grid](w, x, norm_w, bias if bias is not None else w, out, x.shape[0], n, k, x.stride(0),
                               out.stride(0), eps, HAS_BIAS=bias is not None, **kw)
    return out


def gemm_residual(w: Weight, a: torch.Tensor, x: torch.Tensor, cfg: BatchGemvConfig = BatchGemvConfig(),
                  scratch: SplitKScratch | None = None) -> torch.Tensor:
    """x [M, N] += a [M, K] @ w [N, K]^T, in place."""
    _check(w, cfg, a, x)
    if cfg.cublas:
        return matmul(a, w, x, accumulate=True, scratch=scratch)
    n, k = w.shape
    grid, kw = _launch(n, a.shape[0], cfg, w)
    _gemm_residual_kernel[grid](w, a, x, a.shape[0], n, k, a.stride(0), x.stride(0), SWIGLU=False, **kw)
    return x


def silu_gemm_residual(w: Weight, gate_up: torch.Tensor, x: torch.Tensor, cfg: BatchGemvConfig = BatchGemvConfig(),
                       scratch: SplitKScratch | None = None) -> torch.Tensor:
    """x [M, N] += (silu(gate_up[:, :K]) * gate_up[:, K:]) @ w [N, K]^T, in place."""
    _check(w, cfg, gate_up, x)
    n, k = w.shape
    if cfg.cublas:
        act = silu_mul_rows(gate_up, torch.empty(gate_up.shape[0], k, device=x.device, dtype=gate_up.dtype),
                            pdl=cfg.pdl)
        return matmul(act, w, x, accumulate=True, scratch=scratch)
    grid, kw = _launch(n, gate_up.shape[0], cfg, w)
    _gemm_residual_kernel[grid](w, gate_up, x, gate_up.shape[0], n, k, gate_up.stride(0), x.stride(0), SWIGLU=True,
                                **kw)
    return x
