"""Batch-1 GEMV kernels with the decode step's small ops fused into their prologues and epilogues, so that
nothing but the weights moves through memory and a decoder layer takes 7 launches instead of ~35:

- `rmsnorm_gemv`:  out = W @ (rmsnorm(x) * norm_w) [+ bias]  (the sum of squares is gathered in the K loop)
- `gemv_residual`: x += W @ a                                  (o_proj: residual add in the epilogue)
- `silu_gemv_residual`: x += W @ (silu(g) * u), [g, u] = gu    (down_proj: SwiGLU in the prologue)

`rmsnorm_gemv` and `gemv_residual` also read a residual x that a split-K down_proj left unsettled (`PendingResidual`:
its partial sums not yet added, so that no reduce kernel runs between the layers): each program adds them to the
elements of x it reads, in the reduce kernel's order and rounding, so the bits are the same as after that kernel.

Each program owns BLOCK_N output rows and walks K in BLOCK_K chunks with a 2-D float32 accumulator, reduced
once at the end. W is [N, K] row-major (unit stride along K). W may also be FP8 (e4m3) codes with a float32
scale per row (`row_scale`, the `Fp8Rows` format): the same loop, one multiply per row at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels import l2_prefetch
from graph_executor.kernels.l2_prefetch import L2Prefetch, prefetch_l2
from graph_executor.kernels.pdl import launch_options, wait_for_prior


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)
    early: bool = False  # load the first BLOCK_K weights before waiting for the previous kernel (pdl.with_early_weights)
    # the residual GEMVs (gemv_residual, silu_gemv_residual) read their residual rows (and settle a pending residual)
    # right after the wait, not after the sums: in the sm_90 SASS of the o kernel those loads sat after the final
    # reduction's barrier, one more L2 round trip at the end of a latency-bound kernel (40th session, unmeasured)
    residual_early: bool = False


DEFAULT = GemvConfig()


@dataclass(frozen=True)
class PendingResidual:
    """A residual stream x [N] that a split-K residual GEMV left unsettled: x's value is the `splits` float32 partial
    sums partial[i * N + row] added in order from zero, plus x, rounded to x's dtype (what that GEMV's reduce kernel,
    gemv_splitk._add_partials, would have stored). The kernels that read x next add them themselves."""

    partial: torch.Tensor  # float32 [>= splits * N], on x's device
    splits: int

    def check(self, x: torch.Tensor) -> None:
        if self.partial.dtype != torch.float32 or self.partial.device != x.device or self.splits < 1 or \
                self.partial.numel() < self.splits * x.numel():
            raise ValueError(f"a pending residual needs {self.splits} float32 partials of {x.numel()} on {x.device}, "
                             f"got {self.partial.dtype} {self.partial.numel()} on {self.partial.device}")


@dataclass(frozen=True)
class GemvPlan:
    """A block config per projection of the decode step (chosen by the sweep in bench/probes/gpu_probe.py). A
    projection may instead take a `gemv_dense_splitk.DenseSplitKConfig` (kernels/projections.py dispatches on the
    config's type; not imported here: that module builds on this one)."""

    qkv: GemvConfig = DEFAULT
    o: GemvConfig = DEFAULT
    gate_up: GemvConfig = DEFAULT
    down: GemvConfig = DEFAULT  # or a DenseSplitKConfig (decode_plan.DEFAULT_PLAN's)
    lm_head: GemvConfig = DEFAULT


# This file's kernels per projection, measured on an H200 (bench/NOTES.md, probe 2): each projection over all 32
# layers of LLaMA-2-7B in one graph. Small-N projections (o_proj: 4096 rows) need more, thinner programs to keep
# enough loads in flight. The decode step's plan (`decode_plan.DEFAULT_PLAN`) starts from it.
GEMV_PLAN = GemvPlan(
    qkv=GemvConfig(16, 256, 4, 3),  # 3.93 TB/s (16x512: 3.81)
    o=GemvConfig(2, 2048, 4, 3),  # 3.00 TB/s (16x512: 2.39)
    gate_up=GemvConfig(16, 256, 4, 3),  # 3.99 TB/s
    down=GemvConfig(16, 512, 4, 3),  # 3.28 TB/s
    lm_head=GemvConfig(16, 512, 4, 2),  # 3.92 TB/s
)


@triton.jit
def _weight_tile(w_ptr, rows, row_ok, cols, K):
    """W[rows, cols] of a row-major [N, K] weight, zeros outside it."""
    return tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)


@triton.jit
def _settled(x, x_ptr, p_ptr, idx, ok, N, PENDING: tl.constexpr):
    """x (float32, the residual's elements idx as stored) plus the PENDING partials of a `PendingResidual` at
    p_ptr, added as gemv_splitk._add_partials adds them (from zero, in order, then x) and rounded to x's dtype."""
    total = tl.zeros_like(x)
    for i in tl.static_range(PENDING):
        total += tl.load(p_ptr + i * N + idx, mask=ok, other=0.0, cache_modifier=".cg")
    return (total + x).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _normed_chunk(x_ptr, nw_ptr, cols, K, p_ptr, PENDING: tl.constexpr):
    """x[cols] squared (for the sum of squares) and times the norm weight, float32 (zeros past K); PENDING > 0: x
    settled first (`_settled`)."""
    col_ok = cols < K
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if PENDING > 0:
        x = _settled(x, x_ptr, p_ptr, cols, col_ok, K, PENDING)
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return x * x, x * nw


@triton.jit
def _rmsnorm_gemv_kernel(w_ptr, x_ptr, nw_ptr, b_ptr, s_ptr, out_ptr, p_ptr, N, K, eps, pf0, pn0, pf1, pn1, pf2,
                         pn2, pf3, pn3, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, PREFETCH: tl.constexpr,
                         THREADS: tl.constexpr, PENDING: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    start = 0
    if EARLY:  # the first chunk's weights loaded before the wait (constant in a step: no race); that chunk peeled
        cols = tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, rows, row_ok, cols, K)
        wait_for_prior(PDL)
        sq, xn = _normed_chunk(x_ptr, nw_ptr, cols, K, p_ptr, PENDING)
        ss += sq
        acc += w.to(tl.float32) * xn[None, :]
        start = BLOCK_K
    else:
        wait_for_prior(PDL)
    for k0 in range(start, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        sq, xn = _normed_chunk(x_ptr, nw_ptr, cols, K, p_ptr, PENDING)
        ss += sq
        w = _weight_tile(w_ptr, rows, row_ok, cols, K)
        acc += w.to(tl.float32) * xn[None, :]
    scale = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    out = tl.sum(acc, axis=1) * scale
    if ROW_SCALE:
        out *= tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)
    if PREFETCH > 0:  # its rows done, the program asks L2 for its share of the next kernel's weights (the tail)
        prefetch_l2(pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3, tl.program_id(0), tl.num_programs(0), PREFETCH, THREADS)


@triton.jit
def _activation_chunk(a_ptr, cols, K, SWIGLU: tl.constexpr):
    """a[cols] (SWIGLU: silu(gate[cols]) * up[cols] of a_ptr = [gate (K), up (K)]), float32, zeros past K."""
    col_ok = cols < K
    a = tl.load(a_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.load(a_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
        a = a / (1.0 + tl.exp(-a)) * up
    return a


@triton.jit
def _residual_rows(x_ptr, p_ptr, rows, row_ok, N, PENDING: tl.constexpr):
    """x[rows] in float32, settled first when PENDING > 0 (this program's rows only: no other program of the kernel
    reads or writes them)."""
    residual = tl.load(x_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if PENDING > 0:
        residual = _settled(residual, x_ptr, p_ptr, rows, row_ok, N, PENDING)
    return residual


@triton.jit
def _gemv_residual_kernel(w_ptr, a_ptr, s_ptr, x_ptr, p_ptr, N, K, pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3,
                          SWIGLU: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr, EARLY: tl.constexpr, PREFETCH: tl.constexpr, THREADS: tl.constexpr,
                          PENDING: tl.constexpr, RESIDUAL_EARLY: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    start = 0
    if EARLY:  # as in _rmsnorm_gemv_kernel
        cols = tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, rows, row_ok, cols, K)
        wait_for_prior(PDL)
        if RESIDUAL_EARLY:  # GemvConfig.residual_early
            residual = _residual_rows(x_ptr, p_ptr, rows, row_ok, N, PENDING)
        acc += w.to(tl.float32) * _activation_chunk(a_ptr, cols, K, SWIGLU)[None, :]
        start = BLOCK_K
    else:
        wait_for_prior(PDL)
        if RESIDUAL_EARLY:
            residual = _residual_rows(x_ptr, p_ptr, rows, row_ok, N, PENDING)
    for k0 in range(start, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        a = _activation_chunk(a_ptr, cols, K, SWIGLU)
        w = _weight_tile(w_ptr, rows, row_ok, cols, K)
        acc += w.to(tl.float32) * a[None, :]
    out = tl.sum(acc, axis=1)
    if ROW_SCALE:
        out *= tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    if not RESIDUAL_EARLY:
        residual = _residual_rows(x_ptr, p_ptr, rows, row_ok, N, PENDING)
    tl.store(x_ptr + rows, (residual + out).to(x_ptr.dtype.element_ty), mask=row_ok)
    if PREFETCH > 0:  # as in _rmsnorm_gemv_kernel
        prefetch_l2(pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3, tl.program_id(0), tl.num_programs(0), PREFETCH, THREADS)


def _grid(n: int, cfg: GemvConfig) -> tuple[int]:
    return (triton.cdiv(n, cfg.block_n),)


def _launch(cfg: GemvConfig, regions: int) -> dict:
    return dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                PDL=cfg.pdl, EARLY=cfg.early, PREFETCH=regions, THREADS=32 * cfg.num_warps,
                **launch_options(cfg.pdl))


def _residual_launch(cfg: GemvConfig, regions: int) -> dict:
    return dict(_launch(cfg, regions), RESIDUAL_EARLY=cfg.residual_early)


def _pending_args(pending: PendingResidual | None, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(partials pointer, PENDING) of a kernel call: x itself and 0 when nothing is pending."""
    if pending is None:
        return x, 0
    pending.check(x)
    return pending.partial, pending.splits


# `prefetch` (below): weights each program asks L2 for once its rows are stored (kernels/l2_prefetch.py: the next
# kernel's, during this one's tail; values unchanged; sm_90+ only, never under the interpreter).
def rmsnorm_gemv(w: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 bias: torch.Tensor | None = None, cfg: GemvConfig = DEFAULT,
                 row_scale: torch.Tensor | None = None, prefetch: L2Prefetch | None = None,
                 pending: PendingResidual | None = None) -> torch.Tensor:
    """w [N, K], x [K], norm_w [K], bias [N] or None, row_scale [N] float32 or None -> out [N] (any float dtype:
    logits may be float32). `pending`: x is unsettled (its partials are added here; x itself is not written)."""
    n, k = w.shape
    pf_args, regions = l2_prefetch.kernel_args(prefetch, w)
    p, splits = _pending_args(pending, x)
    _rmsnorm_gemv_kernel[_grid(n, cfg)](w, x, norm_w, bias if bias is not None else w,
                                        row_scale if row_scale is not None else w, out, p, n, k, eps, *pf_args,
                                        HAS_BIAS=bias is not None, ROW_SCALE=row_scale is not None,
                                        PENDING=splits, **_launch(cfg, regions))
    return out


def gemv_residual(w: torch.Tensor, a: torch.Tensor, x: torch.Tensor, cfg: GemvConfig = DEFAULT,
                  row_scale: torch.Tensor | None = None, prefetch: L2Prefetch | None = None,
                  pending: PendingResidual | None = None) -> torch.Tensor:
    """x [N] += (w [N, K] @ a [K]) [* row_scale], in place. `pending`: x is unsettled; it is settled and stored
    with the sum (x is settled after the call)."""
    n, k = w.shape
    pf_args, regions = l2_prefetch.kernel_args(prefetch, w)
    p, splits = _pending_args(pending, x)
    _gemv_residual_kernel[_grid(n, cfg)](w, a, row_scale if row_scale is not None else w, x, p, n, k, *pf_args,
                                         SWIGLU=False, ROW_SCALE=row_scale is not None, PENDING=splits,
                                         **_residual_launch(cfg, regions))
    return x


def silu_gemv_residual(w: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor, cfg: GemvConfig = DEFAULT,
                       row_scale: torch.Tensor | None = None, prefetch: L2Prefetch | None = None) -> torch.Tensor:
    """x [N] += (w [N, K] @ (silu(gate_up[:K]) * gate_up[K:])) [* row_scale], in place."""
    n, k = w.shape
    pf_args, regions = l2_prefetch.kernel_args(prefetch, w)
    _gemv_residual_kernel[_grid(n, cfg)](w, gate_up, row_scale if row_scale is not None else w, x, x, n, k,
                                         *pf_args, SWIGLU=True, ROW_SCALE=row_scale is not None, PENDING=0,
                                         **_residual_launch(cfg, regions))
    return x
