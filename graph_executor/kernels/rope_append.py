"""RoPE on one token's Q and K, with K and V written into the KV cache at the position read from device memory.

One program per head: programs [0, heads) rotate query heads into `q_out`; programs [heads, heads + kv_heads)
rotate a key head and copy its value head into the cache. Rotate-half (HF) layout; cos/sin from the model's
float32 table [C, 2, hd] (halves duplicated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_append_kernel(qkv_ptr, pos_ptr, rope_ptr, q_ptr, k_ptr, v_ptr, stride_kh, stride_kn, stride_vh,
                        stride_vn, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    head = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, half)
    pos = tl.load(pos_ptr)
    cos = tl.load(rope_ptr + pos * 2 * HEAD_DIM + d)
    sin = tl.load(rope_ptr + pos * 2 * HEAD_DIM + HEAD_DIM + d)
    src = qkv_ptr + head * HEAD_DIM  # q heads, then k heads: the qkv layout
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + half + d).to(tl.float32)
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if head < NUM_HEADS:
        dst = q_ptr + head * HEAD_DIM
        tl.store(dst + d, r1.to(q_ptr.dtype.element_ty))
        tl.store(dst + half + d, r2.to(q_ptr.dtype.element_ty))
    else:
        kv_head = head - NUM_HEADS
        dst = k_ptr + kv_head * stride_kh + pos * stride_kn
        tl.store(dst + d, r1.to(k_ptr.dtype.element_ty))
        tl.store(dst + half + d, r2.to(k_ptr.dtype.element_ty))
        v_src = qkv_ptr + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        v_dst = v_ptr + kv_head * stride_vh + pos * stride_vn
        full = tl.arange(0, HEAD_DIM)
        tl.store(v_dst + full, tl.load(v_src + full))


def rope_append(qkv: torch.Tensor, position: torch.Tensor, rope: torch.Tensor, q_out: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> None:
    """qkv [(heads + 2 kv_heads) * hd]; position [1] int64; rope [C, 2, hd] float32; q_out [heads, hd];
    k/v_cache [kv_heads, C, hd] (one layer's views)."""
    _rope_append_kernel[(num_heads + num_kv_heads,)](
        qkv, position, rope, q_out, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
        v_cache.stride(1), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim)
