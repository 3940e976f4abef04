"""RoPE on T tokens' Q and K, with K and V written into the KV cache at positions read from device memory.

Grid (T, heads + kv_heads): programs with head < heads rotate a query head into `q_out`; the others rotate a
key head and copy its value head into the cache slot of their token's position. Rotate-half (HF) layout;
cos/sin from the model's float32 table [C, 2, hd] (halves duplicated). Decode is T = 1. With `slots` (a batched
decode), token t's K/V go to the cache of KV slot slots[t] (read from device memory, as the positions are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels.pdl import launch_options, wait_for_prior


@triton.jit
def _rope_append_kernel(qkv_ptr, pos_ptr, slot_ptr, rope_ptr, q_ptr, k_ptr, v_ptr, stride_qkv, stride_q, stride_kh,
                        stride_kn, stride_vh, stride_vn, stride_slot, NUM_HEADS: tl.constexpr,
                        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior(PDL)
    token = tl.program_id(0)
    head = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, half)
    pos = tl.load(pos_ptr + token)
    if SLOTS:  # the token's own KV slot: its caches lie stride_slot elements apart
        k_ptr += tl.load(slot_ptr + token) * stride_slot
        v_ptr += tl.load(slot_ptr + token) * stride_slot
    cos = tl.load(rope_ptr + pos * 2 * HEAD_DIM + d)
    sin = tl.load(rope_ptr + pos * 2 * HEAD_DIM + HEAD_DIM + d)
    row = qkv_ptr + token * stride_qkv
    src = row + head * HEAD_DIM  # q heads, then k heads: the qkv layout
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + half + d).to(tl.float32)
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if head < NUM_HEADS:
        dst = q_ptr + token * stride_q + head * HEAD_DIM
        tl.store(dst + d, r1.to(q_ptr.dtype.element_ty))
        tl.store(dst + half + d, r2.to(q_ptr.dtype.element_ty))
    else:
        kv_head = head - NUM_HEADS
        dst = k_ptr + kv_head * stride_kh + pos * stride_kn
        tl.store(dst + d, r1.to(k_ptr.dtype.element_ty))
        tl.store(dst + half + d, r2.to(k_ptr.dtype.element_ty))
        v_src = row + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        v_dst = v_ptr + kv_head * stride_vh + pos * stride_vn
        full = tl.arange(0, HEAD_DIM)
        tl.store(v_dst + full, tl.load(v_src + full))


def rope_append(qkv: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, q_out: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int, pdl: bool = False, slots: torch.Tensor | None = None, slot_stride: int = 0) -> None:
    """qkv [T, (heads + 2 kv_heads) * hd] (or 1-D for T = 1); positions [T] int64; rope [C, 2, hd] float32;
    q_out [T, heads, hd] (or [heads, hd]); k/v_cache [kv_heads, C, hd] (one layer's views; with `slots`, slot 0's).
    `slots` [T] int64: token t's KV slot, whose caches lie slot_stride elements after slot 0's (a batched decode).
    `pdl`: launched with programmatic dependent launch (kernels/pdl.py)."""
    tokens = positions.shape[0]
    qkv2, q2 = qkv.view(tokens, -1), q_out.view(tokens, -1)
    _rope_append_kernel[(tokens, num_heads + num_kv_heads)](
        qkv2, positions, slots if slots is not None else positions, rope, q2, k_cache, v_cache, qkv2.stride(0),
        q2.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), slot_stride,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, SLOTS=slots is not None, PDL=pdl,
        **launch_options(pdl))
