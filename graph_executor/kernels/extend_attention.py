"""Prefill attention over the static KV cache for T query tokens at positions read from device memory (flash
attention, one pass, online softmax): the attention of a prompt that continues a sequence already in the cache (a
chat's next turn after prefix reuse, or the second and later chunks of a long prompt).

Why not `scaled_dot_product_attention`: a captured graph fixes the key span at capture time, so SDPA over the cache
needs a boolean mask over the whole cache length (every step then reads the full cache: 64 MB per layer for a 7B
model at 4096 positions) or a graph per span. Here each program reads the positions of its query rows and loops
over keys [lowest visible, highest position] only: one graph per prompt bucket serves any start, and the cost grows
with the real context.

Query token t attends to cache positions p with p <= pos[t] (and p > pos[t] - window with a sliding window); the
K/V of the T new tokens must already be in the cache (`rope_append` runs first). One program per (block of
BLOCK_M query rows, query head); grouped-query heads read their KV head (head // group).

A short prompt over a long context (a chat's next turn: ~20 new tokens after ~600 cached) is one block of rows per
head, i.e. as many programs as heads, each walking the whole context: with an `ExtendWorkspace`, prompts of at most
`SPLIT_TOKENS` rows also split the keys (flash-decoding: one program per block of rows, head and key split, then
`decode_attention`'s reduce over the splits), so the work spreads over the whole GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.decode_attention import _reduce_kernel

NO_WINDOW = 1 << 30
BLOCK_N = 64
SPLIT_TOKENS = 64  # prompts of at most this many rows split the keys (given a workspace)
MAX_SPLITS = 16  # key splits per (rows, head) at most: the split size grows with the context past 16 x 256


@dataclass(frozen=True)
class ExtendWorkspace:
    """The key-split path's partial results, sized once for a cache length (graph-safe: fixed addresses)."""

    acc: torch.Tensor  # [SPLIT_TOKENS, heads, splits, hd] float32: unnormalised outputs per split
    m: torch.Tensor  # [SPLIT_TOKENS, heads, splits] float32: running maxima
    l: torch.Tensor  # [SPLIT_TOKENS, heads, splits] float32: softmax denominators
    split: int  # keys per split (a multiple of BLOCK_N)

    @classmethod
    def allocate(cls, num_heads: int, head_dim: int, max_context: int, device: torch.device,
                 split: int | None = None) -> ExtendWorkspace:
        """`split`: keys per split (a multiple of BLOCK_N; tests use small ones), else from the context."""
        split = split or max(256, triton.next_power_of_2(max_context) // MAX_SPLITS)
        if split % BLOCK_N:
            raise ValueError(f"an extend split must be a multiple of {BLOCK_N} keys, got {split}")
        splits = triton.next_power_of_2(triton.cdiv(max_context, split))
        f32 = dict(device=device, dtype=torch.float32)
        return cls(torch.empty(SPLIT_TOKENS, num_heads, splits, head_dim, **f32),
                   torch.empty(SPLIT_TOKENS, num_heads, splits, **f32),
                   torch.empty(SPLIT_TOKENS, num_heads, splits, **f32), split)

    @property
    def num_splits(self) -> int:
        return self.m.shape[2]


@triton.jit
def _extend_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, out_ptr, acc_ptr, m_ptr, l_ptr, T,
                             stride_qt, stride_qh, stride_kh, stride_kn, stride_vh, stride_vn, stride_ot, stride_oh,
                             stride_slot, scale, window,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SLOT: tl.constexpr, SPLIT: tl.constexpr,
                             NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr, PARTIAL: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    if SLOT:  # the KV slot is read from the device (a mixed step's chunk): one graph serves every slot
        k_ptr += tl.load(slot_ptr) * stride_slot
        v_ptr += tl.load(slot_ptr) * stride_slot
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)  # [BM]; -1: a row past T sees nothing
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_ok[:, None],
                other=0.0)  # [BM, hd]
    hi = tl.max(pos, axis=0) + 1
    lo = tl.maximum(tl.min(tl.where(row_ok, pos, 1 << 30), axis=0) + 1 - window, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if PARTIAL:  # this program's keys: split program_id(2) of the context (possibly none of [lo, hi))
        split = tl.program_id(2)
        lo = tl.maximum(lo, split * SPLIT)
        hi = tl.minimum(hi, (split + 1) * SPLIT)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        key_ok = n < hi
        k = tl.load(k_ptr + kv_head * stride_kh + n[None, :] * stride_kn + d[:, None], mask=key_ok[None, :],
                    other=0.0)  # [hd, BN]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee") * scale
        else:
            s = tl.dot(q, k) * scale  # [BM, BN] float32
        visible = (n[None, :] <= pos[:, None]) & (n[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row that has seen no key yet: no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # [BM, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :], mask=key_ok[:, None],
                    other=0.0)  # [BN, hd]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if PARTIAL:  # [T, heads, splits] partials for the reduce
        ws = (rows * NUM_HEADS + head) * NUM_SPLITS + tl.program_id(2)  # [BM]
        tl.store(m_ptr + ws, m_i, mask=row_ok)
        tl.store(l_ptr + ws, l_i, mask=row_ok)
        tl.store(acc_ptr + ws[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     out: torch.Tensor, window: int | None = None, slot: torch.Tensor | None = None,
                     slot_stride: int = 0, workspace: ExtendWorkspace | None = None) -> torch.Tensor:
    """q [T, heads, hd]; k/v_cache [kv_heads, C, hd] (unit stride in hd); positions [T] int64 on the device (each
    < C); out [T, heads, hd], written. `slot` ([1] int64 on the device): the caches lie slot * slot_stride elements
    after k/v_cache. `workspace`: split the keys when T <= SPLIT_TOKENS (and out is contiguous). Graph-safe: no
    host reads, no allocation."""
    t, heads, hd = q.shape
    kv_heads = k_cache.shape[0]
    if heads % kv_heads or out.shape != q.shape or positions.shape != (t,) or q.stride(2) != 1 \
            or k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"extend attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}, positions "
                         f"{tuple(positions.shape)}, out {tuple(out.shape)}")
    block_m = min(64, max(16, triton.next_power_of_2(t)))
    ws = workspace if workspace is not None and t <= SPLIT_TOKENS and out.is_contiguous() \
        and workspace.acc.shape[1:] == (heads, workspace.num_splits, hd) else None
    splits = ws.num_splits if ws is not None else 1
    partial = (ws.acc, ws.m, ws.l) if ws is not None else (out, out, out)  # unused without the split
    _extend_attention_kernel[(triton.cdiv(t, block_m), heads, splits)](
        q, k_cache, v_cache, positions, positions if slot is None else slot, out, *partial, t, q.stride(0),
        q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), out.stride(0),
        out.stride(1), slot_stride, hd ** -0.5, NO_WINDOW if window is None else window, GROUP=heads // kv_heads,
        HEAD_DIM=hd, BLOCK_M=block_m, BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32, SLOT=slot is not None,
        SPLIT=ws.split if ws is not None else BLOCK_N, NUM_SPLITS=splits, NUM_HEADS=heads, PARTIAL=ws is not None,
        num_warps=4, num_stages=2)
    if ws is not None:
        # every key split is written here (SPLIT=0: the reduce reads them all; positions and window unused)
        _reduce_kernel[(heads, t)](ws.acc, ws.m, ws.l, out, positions, 0, HEAD_DIM=hd, NUM_SPLITS=splits,
                                   NUM_HEADS=heads, PDL=False)
    return out
