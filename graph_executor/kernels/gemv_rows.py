"""GEMVs over a few token rows at once (T <= 16: a speculative verify step's k + 1 tokens) with the decode step's
fusions, so that a verify step reads each weight once, as a decode step does, in the same 7 launches per layer:

- `rmsnorm_gemv_rows`:  out[t] = W @ (rmsnorm(x[t]) * norm_w) [+ bias]
- `gemv_residual_rows`: x[t] += W @ a[t]
- `silu_gemv_residual_rows`: x[t] += W @ (silu(g[t]) * u[t]), [g, u] = gate_up[t]

Why not cuBLAS (what the prefill step uses): at 5 rows its GEMMs read the weights well below the decode GEMVs'
rate and leave RMSNorm, SwiGLU and the residual to separate kernels; on an H200 a verify of 5 tokens on
LLaMA-2-7B took 1.19x a decode step that way, and on SmolLM2-135M 1.3x (bench/NOTES.md, issue 11).

Each program owns BLOCK_N weight rows and walks K in BLOCK_K chunks; the tile is multiplied by all token rows
at once on the tensor cores, the weights as the dot's left operand (BLOCK_N rows x BLOCK_K) and the tokens,
padded to 16, as its right one, accumulating [BLOCK_N, 16] in float32. Activations enter the dot in the weights'
dtype (as cuBLAS's do); float32 weights use exact (IEEE) products, never TF32. The RMSNorm's sum of squares is
gathered per token in the same loop, its scale applied to the accumulator at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.pdl import launch_options, wait_for_prior

MAX_ROWS = 16  # token rows per call: the dot's N


@dataclass(frozen=True)
class RowsConfig:
    block_n: int = 32  # weight rows per program (the dot's M: >= 16)
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1) or self.block_k < 16 or \
                self.block_k & (self.block_k - 1):
            raise ValueError(f"RowsConfig needs power-of-two block_n >= 16 and block_k >= 16, got {self}")


DEFAULT = RowsConfig()

RMSNORM, RESIDUAL, SILU_RESIDUAL = 0, 1, 2  # the kernel's MODE


@triton.jit
def _gemv_rows_kernel(w_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, T, N, K, stride_a, stride_out, eps,
                      MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tokens = tl.arange(0, ROWS)
    token_ok = tokens < T
    acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    ss = tl.zeros([ROWS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = token_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + tokens[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:  # RMSNorm: scale by norm_w now, by 1 / rms (known after the loop) at the end
            ss += tl.sum(a * a, axis=1)
            a = a * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if MODE == 2:  # a_ptr rows hold [gate (K), up (K)]
            up = tl.load(a_ptr + tokens[:, None] * stride_a + K + cols[None, :], mask=mask, other=0.0)
            a = a / (1.0 + tl.exp(-a)) * up.to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(w, tl.trans(a.to(w.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(a.to(w.dtype)))
    if MODE == 0:
        acc = acc * (1.0 / tl.sqrt(ss / K + eps))[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + tokens[None, :] * stride_out + rows[:, None]  # [BLOCK_N, ROWS]: out[t, row]
    ok = row_ok[:, None] & token_ok[None, :]
    if MODE != 0:  # the residual stream: x[t] += W @ a[t]
        acc += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(mode: int, w: torch.Tensor, a: torch.Tensor, nw: torch.Tensor | None, bias: torch.Tensor | None,
            out: torch.Tensor, eps: float, cfg: RowsConfig) -> torch.Tensor:
    n, k = w.shape
    t = a.shape[0]
    width = 2 * k if mode == SILU_RESIDUAL else k
    if not 1 <= t <= MAX_ROWS or a.shape[1] != width or out.shape != (t, n):
        raise ValueError(f"gemv_rows: w {tuple(w.shape)} needs a [T <= {MAX_ROWS}, {width}] and out [T, {n}]; "
                         f"got a {tuple(a.shape)}, out {tuple(out.shape)}")
    if a.stride(1) != 1 or out.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("gemv_rows: w, and each row of a and out, must be contiguous")
    _gemv_rows_kernel[(triton.cdiv(n, cfg.block_n),)](
        w, a, nw if nw is not None else w, bias if bias is not None else w, out, t, n, k, a.stride(0),
        out.stride(0), eps, MODE=mode, HAS_BIAS=bias is not None, IEEE=w.dtype == torch.float32,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ROWS=MAX_ROWS, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, PDL=cfg.pdl, **launch_options(cfg.pdl))
    return out


def rmsnorm_gemv_rows(w: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                      bias: torch.Tensor | None = None, cfg: RowsConfig = DEFAULT) -> torch.Tensor:
    """w [N, K], x [T, K], norm_w [K], bias [N] or None -> out [T, N] (any float dtype: logits may be float32)."""
    return _launch(RMSNORM, w, x, norm_w, bias, out, eps, cfg)


def gemv_residual_rows(w: torch.Tensor, a: torch.Tensor, x: torch.Tensor, cfg: RowsConfig = DEFAULT) -> torch.Tensor:
    """x [T, N] += a [T, K] @ w [N, K]^T, in place."""
    return _launch(RESIDUAL, w, a, None, None, x, 0.0, cfg)


def silu_gemv_residual_rows(w: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor,
                            cfg: RowsConfig = DEFAULT) -> torch.Tensor:
    """x [T, N] += (silu(gate_up[:, :K]) * gate_up[:, K:]) @ w [N, K]^T, in place."""
    return _launch(SILU_RESIDUAL, w, gate_up, None, None, x, 0.0, cfg)
