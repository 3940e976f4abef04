"""o_proj fed straight by the decode attention's split partials: the splits' combine in the GEMV's prologue.

In the batch-1 decode step the attention runs as flash-decoding splits (kernels/decode_attention.py); their partials
(acc, m, l per head and split) are combined into the attention output either by a reduce kernel or by the last split
program of each head (an atomic, then the combine), and o_proj (gemv.py's `gemv_residual`) reads that output. On a
small model both boundaries are whole kernel boundaries in a latency-bound step: on an H200 the SmolLM2-135M step
without its split combine took 0.89x / 0.84x the time at context 300 / 2000, without its o_proj 0.88x / 0.87x
(`bench.probes.step_variants` ablate=1 / 4, fortieth session, bench/NOTES.md).

Here each o_proj program combines every head's partials itself (the attention kernel stores them only,
`DecodeAttention(..., partials_only=True)`), rounds the combined vector to the activations' dtype as the attention
kernel would have stored it, and multiplies its rows: x[rows] += W_o[rows] @ attn. Every program repeats the whole
combine (heads x active splits x head_dim floats from L2: ~11 KB at SmolLM2's context 300, ~74 KB at 2000), so the
kernel wants a few programs of many rows (the plan's o config's block_n and warps). The weights are one
[BLOCK_N, heads, head_dim] tile (heads padded to a power of two), loaded before the PDL wait when `early`.

The combine is `decode_attention._combine`'s (the position's live splits, weights exp(m - max) where l > 0), one split
at a time with the running maximum's rescaling (flash-decoding's) instead of a pass over the maxima first: the same
values up to float32 rounding. It runs elementwise in one [heads, head_dim] layout (m and l read broadcast along
head_dim), so no reduction or layout conversion sits in it: offline for sm_90 at 16 rows x 8 warps the kernel has 5
barriers and ~1,500 instructions, against 75 and 1,752 for a first form that reduced [heads, splits] tiles (gemv.py's
o kernel: 9 and 712 at that size, 1 and 280 at SmolLM2's 2 rows x 4 warps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.gemv import GemvConfig, PendingResidual, _residual_rows
from graph_executor.kernels.pdl import launch_options, wait_for_prior

# splits combined a loop step, unrolled so that their loads go out together (SmolLM2 at 16 rows x 8 warps, sm_90
# offline: 170 registers at 8, 97 at 4, 255 at 16)
COMBINE_SB = 8
# A program holds the weights as [rows, heads, head_dim] and SB splits' [heads, head_dim] partials in registers: the
# width (heads padded to a power of two, x head_dim) is capped at what compiled without spills for sm_90 on SmolLM2's
# shape (bench.probes.sass_usage's compile_for: 16 or 32 rows on 8 warps ~170 registers; Llama-3.2-1B's 32 heads x
# 64 spilled at 4 rows on 4 warps)
MAX_WIDTH = 1024


@triton.jit
def _combine_gemv_residual_kernel(w_ptr, acc_ptr, m_ptr, l_ptr, pos_ptr, x_ptr, p_ptr, N, window,
                                  NUM_HEADS: tl.constexpr, HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                                  NUM_SPLITS: tl.constexpr, SPLIT: tl.constexpr, SB: tl.constexpr,
                                  BLOCK_N: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
                                  PENDING: tl.constexpr):
    K: tl.constexpr = NUM_HEADS * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    h = tl.arange(0, HEADS_P)
    h_ok = h < NUM_HEADS
    d = tl.arange(0, HEAD_DIM)
    w_ptrs = w_ptr + rows[:, None, None] * K + h[None, :, None] * HEAD_DIM + d[None, None, :]
    w_mask = row_ok[:, None, None] & h_ok[None, :, None]
    if EARLY:  # constant during a step: loaded before the wait (pdl.with_early_weights)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)  # [BLOCK_N, HEADS_P, HEAD_DIM]
        wait_for_prior(PDL)
    else:
        wait_for_prior(PDL)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    # the residual's rows (settled: this program's rows only, as in gemv._gemv_residual_kernel) read now, with the
    # partials: written before this kernel, they depend on nothing here (at the end they were one more L2 round trip
    # after the sums in the sm_90 SASS)
    residual = _residual_rows(x_ptr, p_ptr, rows, row_ok, N, PENDING)
    # the splits holding the keys [start, pos] are the ones the attention wrote (decode_attention._reduce_kernel)
    pos = tl.load(pos_ptr)
    s_lo = tl.maximum(pos + 1 - window, 0) // SPLIT
    s_hi = pos // SPLIT + 1
    # one split at a time in one [heads, head_dim] layout: m and l read broadcast along head_dim (each column the
    # same value), so the update is elementwise, with no reduction and no layout conversion; SB splits unrolled a
    # loop step, so their loads go out together
    total = tl.zeros([HEADS_P, HEAD_DIM], dtype=tl.float32)
    weight = tl.zeros([HEADS_P, HEAD_DIM], dtype=tl.float32)
    m_run = tl.full([HEADS_P, HEAD_DIM], -float("inf"), dtype=tl.float32)
    hd_ok = h_ok[:, None] & (d < HEAD_DIM)[None, :]  # [HEADS_P, HEAD_DIM]
    for s0 in range(s_lo, s_hi, SB):
        for j in tl.static_range(SB):
            split = s0 + j + 0 * hd_ok.to(tl.int32)  # [HEADS_P, HEAD_DIM], the split's index everywhere
            ok = hd_ok & (split < s_hi)
            part = h[:, None] * NUM_SPLITS + split
            mb = tl.load(m_ptr + part, mask=ok, other=-float("inf"), cache_modifier=".cg")
            lb = tl.load(l_ptr + part, mask=ok, other=0.0, cache_modifier=".cg")
            acc = tl.load(acc_ptr + part * HEAD_DIM + d[None, :], mask=ok, other=0.0, cache_modifier=".cg")
            m_new = tl.where(hd_ok, tl.maximum(m_run, mb), 0.0)
            scale = tl.exp(m_run - m_new)
            ws = tl.where(lb > 0, tl.exp(mb - m_new), 0.0)
            total = total * scale + acc * ws
            weight = weight * scale + lb * ws
            m_run = m_new
    denom = tl.where(hd_ok, weight, 1.0)
    # rounded as the attention kernel stores its output (the activations' dtype, x's)
    attn = (total / denom).to(x_ptr.dtype.element_ty).to(tl.float32)  # [HEADS_P, HEAD_DIM]
    out = tl.sum(tl.sum(w.to(tl.float32) * attn[None, :, :], axis=2), axis=1)  # [BLOCK_N]
    tl.store(x_ptr + rows, (residual + out).to(x_ptr.dtype.element_ty), mask=row_ok)


def fits(attention: DecodeAttention) -> bool:
    """Whether one program of this kernel can hold the attention's heads (MAX_WIDTH)."""
    return triton.next_power_of_2(attention.num_heads) * attention.head_dim <= MAX_WIDTH


def combine_gemv_residual(w: torch.Tensor, attention: DecodeAttention, position: torch.Tensor, x: torch.Tensor,
                          cfg: GemvConfig, pending: PendingResidual | None = None) -> torch.Tensor:
    """x [N] += w [N, heads * hd] @ (the attention's output at `position` [1] int64, combined here from the split
    partials that its last `partials_only` call stored), in place; `cfg`'s block_n, num_warps, pdl and early apply
    (its block_k does not: K is one tile). `pending`: x is unsettled; the call settles it (as gemv_residual)."""
    n, k = w.shape
    heads, hd = attention.num_heads, attention.head_dim
    if k != heads * hd or x.shape != (n,) or w.dtype != x.dtype or position.shape != (1,) \
            or attention.max_tokens != 1 or attention.batched or not fits(attention):
        raise ValueError(f"combine_gemv_residual: w [N, {heads} x {hd}] and x [N] of one dtype, one decode position, "
                         f"a one-token attention that `fits`; got w {w.dtype} {tuple(w.shape)}, x {x.dtype} "
                         f"{tuple(x.shape)}, position {tuple(position.shape)}")
    p, splits = (x, 0) if pending is None else (pending.partial, pending.splits)
    if pending is not None:
        pending.check(x)
    _combine_gemv_residual_kernel[(triton.cdiv(n, cfg.block_n),)](
        w, attention.acc, attention.m, attention.l, position, x, p, n, attention.window,
        NUM_HEADS=heads, HEADS_P=triton.next_power_of_2(heads), HEAD_DIM=hd, NUM_SPLITS=attention.num_splits,
        SPLIT=attention.split, SB=COMBINE_SB, BLOCK_N=cfg.block_n, PDL=cfg.pdl, EARLY=cfg.early, PENDING=splits,
        num_warps=cfg.num_warps, **launch_options(cfg.pdl))
    return x
