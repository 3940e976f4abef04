"""RoPE on T tokens' Q and K, with K and V written into the KV cache at positions read from device memory.

Grid (T, head blocks): a program takes BLOCK_H heads of one token, query heads (rotated into `q_out`) or key heads
(rotated, and their value heads copied, into the cache slot of the token's position). Rotate-half (HF) layout;
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
                        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                        SLOTS: tl.constexpr, PDL: tl.constexpr):
    """Program (token, j): query heads j * BLOCK_H.. for j < QB (the query blocks), else key/value heads
    (j - QB) * BLOCK_H.."""
    wait_for_prior(PDL)
    token = tl.program_id(0)
    block = tl.program_id(1)
    QB: tl.constexpr = (NUM_HEADS + BLOCK_H - 1) // BLOCK_H
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, half)[None, :]
    pos = tl.load(pos_ptr + token)
    if SLOTS:  # the token's own KV slot: its caches lie stride_slot elements apart
        k_ptr += tl.load(slot_ptr + token) * stride_slot
        v_ptr += tl.load(slot_ptr + token) * stride_slot
    cos = tl.load(rope_ptr + pos * 2 * HEAD_DIM + d)  # [1, half]
    sin = tl.load(rope_ptr + pos * 2 * HEAD_DIM + HEAD_DIM + d)
    row = qkv_ptr + token * stride_qkv
    if block < QB:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        ok = heads < NUM_HEADS
        src = row + heads * HEAD_DIM  # q heads, then k heads, then v heads: the qkv layout
    else:
        heads = (block - QB) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]  # kv heads
        ok = heads < NUM_KV_HEADS
        src = row + (NUM_HEADS + heads) * HEAD_DIM
    x1 = tl.load(src + d, mask=ok, other=0.0).to(tl.float32)  # [BLOCK_H, half]
    x2 = tl.load(src + half + d, mask=ok, other=0.0).to(tl.float32)
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if block < QB:
        dst = q_ptr + token * stride_q + heads * HEAD_DIM
        tl.store(dst + d, r1.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + half + d, r2.to(q_ptr.dtype.element_ty), mask=ok)
    else:
        dst = k_ptr + heads * stride_kh + pos * stride_kn
        tl.store(dst + d, r1.to(k_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + half + d, r2.to(k_ptr.dtype.element_ty), mask=ok)
        full = tl.arange(0, HEAD_DIM)[None, :]
        v_src = row + (NUM_HEADS + NUM_KV_HEADS + heads) * HEAD_DIM
        tl.store(v_ptr + heads * stride_vh + pos * stride_vn + full, tl.load(v_src + full, mask=ok), mask=ok)


def heads_per_program(tokens: int) -> int:
    """Heads a program rotates: one for a decode step (the heads' programs in parallel, as measured for the decode
    step), eight for several tokens. One head of a 200-token prefill's ~14 K programs each moved 0.25-0.5 KB,
    and the kernel took ~10 us a 7B layer for ~11 MB (bench/NOTES.md, thirty-sixth session)."""
    return 1 if tokens == 1 else 8


def rope_append(qkv: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, q_out: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int, pdl: bool = False, slots: torch.Tensor | None = None, slot_stride: int = 0,
                block_h: int | None = None) -> None:
    """qkv [T, (heads + 2 kv_heads) * hd] (or 1-D for T = 1); positions [T] int64; rope [C, 2, hd] float32;
    q_out [T, heads, hd] (or [heads, hd]); k/v_cache [kv_heads, C, hd] (one layer's views; with `slots`, slot 0's).
    `slots` [T] int64: token t's KV slot, whose caches lie slot_stride elements after slot 0's (a batched decode).
    `pdl`: launched with programmatic dependent launch (kernels/pdl.py). `block_h`: heads a program (a power of
    two; None: `heads_per_program`)."""
    tokens = positions.shape[0]
    block_h = heads_per_program(tokens) if block_h is None else block_h
    if block_h < 1 or block_h & (block_h - 1):
        raise ValueError(f"rope_append: block_h must be a power of two, got {block_h}")
    qkv2, q2 = qkv.view(tokens, -1), q_out.view(tokens, -1)
    blocks = triton.cdiv(num_heads, block_h) + triton.cdiv(num_kv_heads, block_h)
    _rope_append_kernel[(tokens, blocks)](
        qkv2, positions, slots if slots is not None else positions, rope, q2, k_cache, v_cache, qkv2.stride(0),
        q2.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), slot_stride,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, SLOTS=slots is not None,
        PDL=pdl, **launch_options(pdl))
