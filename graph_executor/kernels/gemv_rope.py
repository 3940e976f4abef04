"""The decode step's QKV projection with RoPE and the KV append in its epilogue: one kernel where the batch-1 step
ran two (`gemv.rmsnorm_gemv` into a qkv buffer, then `rope_append.rope_append`), i.e. one launch and one boundary
fewer per layer (~210 launches make a SmolLM2-135M step: its time is mostly boundaries).

    q_out, K/V at the position = rope(W @ (rmsnorm(x) * norm_w) [+ bias]) (V not rotated)

RoPE in rotate-half (HF) layout pairs output row i of a head with row i + hd/2, so each program owns BLOCK_P such
pairs of one head (two row groups of W, each read once as in the plain GEMV) and rotates them in registers: rows
of query heads go to q_out, key heads rotated and value heads as they are go to the KV cache at the position read
from device memory (with `slot`, to that KV slot's cache). W is [(heads + 2 kv_heads) * hd, K] row-major, dense or
FP8 codes with a float32 scale per row (`row_scale`, as `gemv.rmsnorm_gemv`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv import DEFAULT, GemvConfig
from graph_executor.kernels.pdl import launch_options, wait_for_prior


@triton.jit
def _rmsnorm_gemv_rope_kernel(w_ptr, x_ptr, nw_ptr, b_ptr, s_ptr, pos_ptr, slot_ptr, rope_ptr, q_ptr, k_ptr, v_ptr,
                              K, eps, stride_kh, stride_kn, stride_vh, stride_vn, stride_slot,
                              NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, SLOTS: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    half: tl.constexpr = HEAD_DIM // 2
    pair0 = tl.program_id(0) * BLOCK_P  # BLOCK_P divides hd / 2: a program's pairs lie in one head
    head = pair0 // half
    d = pair0 % half + tl.arange(0, BLOCK_P)  # [BP] dims of the head's first half
    rows_a = head * HEAD_DIM + d
    rows_b = rows_a + half
    acc_a = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ss += x * x
        h = (x * nw)[None, :]
        wa = tl.load(w_ptr + rows_a[:, None] * K + cols[None, :], mask=col_ok[None, :], other=0.0)
        wb = tl.load(w_ptr + rows_b[:, None] * K + cols[None, :], mask=col_ok[None, :], other=0.0)
        acc_a += wa.to(tl.float32) * h
        acc_b += wb.to(tl.float32) * h
    scale = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    a = tl.sum(acc_a, axis=1) * scale  # [BP]: rows i of the head
    b = tl.sum(acc_b, axis=1) * scale  # [BP]: rows i + hd/2
    if ROW_SCALE:
        a *= tl.load(s_ptr + rows_a)
        b *= tl.load(s_ptr + rows_b)
    if HAS_BIAS:
        a += tl.load(b_ptr + rows_a).to(tl.float32)
        b += tl.load(b_ptr + rows_b).to(tl.float32)
    pos = tl.load(pos_ptr)
    if head < NUM_HEADS + NUM_KV_HEADS:  # queries and keys rotate; values do not
        cos = tl.load(rope_ptr + pos * 2 * HEAD_DIM + d)
        sin = tl.load(rope_ptr + pos * 2 * HEAD_DIM + HEAD_DIM + d)
        r1 = a * cos - b * sin
        r2 = b * cos + a * sin
    else:
        r1 = a
        r2 = b
    if head < NUM_HEADS:
        dst = q_ptr + head * HEAD_DIM
        tl.store(dst + d, r1.to(q_ptr.dtype.element_ty))
        tl.store(dst + half + d, r2.to(q_ptr.dtype.element_ty))
    else:
        if SLOTS:  # the KV slot's caches lie stride_slot elements after slot 0's
            k_ptr += tl.load(slot_ptr) * stride_slot
            v_ptr += tl.load(slot_ptr) * stride_slot
        if head < NUM_HEADS + NUM_KV_HEADS:
            dst = k_ptr + (head - NUM_HEADS) * stride_kh + pos * stride_kn
        else:
            dst = v_ptr + (head - NUM_HEADS - NUM_KV_HEADS) * stride_vh + pos * stride_vn
        tl.store(dst + d, r1.to(k_ptr.dtype.element_ty))
        tl.store(dst + half + d, r2.to(k_ptr.dtype.element_ty))


def fits(head_dim: int, cfg: GemvConfig) -> bool:
    """Whether a QKV config's programs can own whole rotation pairs of one head (block_n / 2 pairs dividing hd / 2)."""
    return cfg.block_n % 2 == 0 and (head_dim // 2) % (cfg.block_n // 2) == 0


def rmsnorm_gemv_rope(w: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float, position: torch.Tensor,
                      rope: torch.Tensor, q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int, bias: torch.Tensor | None = None,
                      cfg: GemvConfig = DEFAULT, row_scale: torch.Tensor | None = None,
                      slot: torch.Tensor | None = None, slot_stride: int = 0) -> None:
    """w [(heads + 2 kv_heads) * hd, K], x [K], norm_w [K], bias [N] or None; position [1] int64 and rope [C, 2, hd]
    float32 as `rope_append`'s; q_out [heads, hd]; k/v_cache [kv_heads, C, hd] (one layer's views; with `slot` [1]
    int64, slot 0's, that slot's lying slot_stride elements further). Programs own cfg.block_n / 2 pairs each."""
    n, k = w.shape
    if n != (num_heads + 2 * num_kv_heads) * head_dim or not fits(head_dim, cfg):
        raise ValueError(f"a QKV weight of {n} rows for {num_heads} + 2 x {num_kv_heads} heads of {head_dim}, "
                         f"block_n {cfg.block_n}: needs (heads + 2 kv_heads) * hd rows and block_n / 2 dividing hd / 2")
    block_p = cfg.block_n // 2
    _rmsnorm_gemv_rope_kernel[(n // 2 // block_p,)](
        w, x, norm_w, bias if bias is not None else w, row_scale if row_scale is not None else w, position,
        slot if slot is not None else position, rope, q_out, k_cache, v_cache, k, eps, k_cache.stride(0),
        k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), slot_stride, NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HAS_BIAS=bias is not None, ROW_SCALE=row_scale is not None,
        SLOTS=slot is not None, BLOCK_P=block_p, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, PDL=cfg.pdl, **launch_options(cfg.pdl))
