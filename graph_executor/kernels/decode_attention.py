"""Decode attention over the static KV cache (flash-decoding): a few query tokens, each at its own position
p, attending to positions [start, p].

The positions are read from device memory, so one captured graph serves every step while the cache grows;
splits that lie wholly beyond a position exit at once, so the cost grows with the real context, not with the
cache length. Grouped-query attention maps query head h to KV head h // (heads / kv_heads). Decode is one
token (`_split_kernel`: one program per head and split). A speculative verify step is k + 1 tokens, each at its
own position (`_split_rows_kernel`: one program per KV head and split takes every query of the group for every
token as rows of one tensor-core product, so each K/V tile is read once per step, as in decode; one program per
query read it k + 1 times, and on an H200 a 5-token verify's attention took 2.5x decode's, bench/NOTES.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels import l2_prefetch
from graph_executor.kernels.l2_prefetch import L2Prefetch, prefetch_l2
from graph_executor.kernels.pdl import launch_options, wait_for_prior

SPLIT_SIZE = 64  # positions per split; H200 LLaMA-2-7B decode at ctx 512/2048: 64 -> 4.09/4.44 ms, 256 -> 4.44/4.60
# One query per program (one row, or a batched decode's rows, summed like one row), split SPLIT_SIZE too. H200,
# whole batch-1 steps as graph replays (`bench.probes.step_variants`, alternating rounds): LLaMA-2-7B at context
# 300 / 2000 3.926 / 4.347 ms with split 64 on 4 warps and the reduce kernel; 3.844 /
# 4.175 on 2 warps; 3.881 / 4.194 on 2 warps with the splits combined by the last program (SmolLM2-135M 0.621 / 0.676
# on 4 warps, 0.666 / 0.716 on 2, 0.629 / 0.665 combined in the kernel); 32 on 1 warp, the best of the kernel-alone
# sweep, 3.963 / 4.415. 2 warps, one row and a batch's rows alike: with 4 the 4-stream batch's per-stream P50 was
# 1.149-1.155x alone, with 2 1.126-1.132x. On 2 warps SmolLM2's request 5 alone takes token 476 at step 39 where
# float32 takes 260: a near-tie (float32 margin 0.0074, `bench.probes.near_tie`), not a fault (fifteenth session).
# But SmolLM2 (9 heads of 64: 45 programs at context 300 for 132 SMs) is 7% slower on 2 warps: 4 below WIDE_QUERY.
WIDE_QUERY = 4096  # heads x head_dim from which 2 warps beat 4 (measured: LLaMA-2-7B's 4096, SmolLM2's 576)
ROW_WARPS: int | None = None  # one row's warps; None: by width (`one_query_warps`); probes set a number
BATCH_WARPS: int | None = None  # a batched decode's rows' warps, likewise


def one_block_splits(split_size: int | None) -> bool:
    """Whether a split of `split_size` positions (None: SPLIT_SIZE) is one block of keys, as kv_early needs."""
    return (split_size or SPLIT_SIZE) <= BLOCK_N


def one_query_warps(num_heads: int, head_dim: int, batched: bool) -> int:
    """The one-query kernel's warps at the default split: ROW_WARPS / BATCH_WARPS if set, else 2 for a query at
    least WIDE_QUERY wide and 4 below."""
    fixed = BATCH_WARPS if batched else ROW_WARPS
    return fixed if fixed is not None else 2 if num_heads * head_dim >= WIDE_QUERY else 4
BLOCK_N = 64


@triton.jit
def _rotate(src, cos, sin, d, HEAD_DIM: tl.constexpr):
    """One head's [hd] row at `src` rotated (rotate-half, HF layout) by a position's cos and sin [hd] (float32, halves
    duplicated), in float32: x * cos + rotate_half(x) * sin, as `rope_append` computes it."""
    half: tl.constexpr = HEAD_DIM // 2
    x = tl.load(src + d).to(tl.float32)
    partner = tl.load(src + (d + half) % HEAD_DIM).to(tl.float32)  # x2 for the first half, x1 for the second
    return x * cos + tl.where(d < half, -partner * sin, partner * sin)


@triton.jit
def _rope_row(src, cos_sin, d, HEAD_DIM: tl.constexpr):
    """`_rotate` by the position's cos/sin row `cos_sin` ([2, hd] float32)."""
    return _rotate(src, tl.load(cos_sin + d), tl.load(cos_sin + HEAD_DIM + d), d, HEAD_DIM)


@triton.jit
def _keys_of(pos_ptr, token, split, window, SPLIT: tl.constexpr):
    """(pos, start, lo, hi): the token's position, its first visible key (`window`), and the keys [lo, hi) of
    theirs that this split holds (none where lo >= hi)."""
    pos = tl.load(pos_ptr + token)
    start = tl.maximum(pos + 1 - window, 0)
    return pos, start, tl.maximum(split * SPLIT, start), tl.minimum((split + 1) * SPLIT, pos + 1)


@triton.jit
def _early_split(q_ptr, k_ptr, v_ptr, rope_ptr, stride_kh, stride_kn, stride_vh, stride_vn, stride_qkv, scale,
                 head, split, token, pos, lo, hi, d, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK: tl.constexpr, NUM_HEADS: tl.constexpr, PDL: tl.constexpr):
    """`_split_kernel`'s one-query RoPE split (one block of keys, [lo, hi) holding some) with the split's K and V tiles
    and its position's cos/sin loaded before the wait for the kernel before (the QKV projection): none of them is
    written by it. The cache's rows below the position were written by earlier steps; the row at the position, stale
    in the tiles, is this kernel's own append, so it is taken from registers (rounded to the cache's dtype, as a load
    of it would give), not read back. Only the QKV row is loaded after the wait. The arithmetic is the loop's, in the
    same order: the same bits. Returns (m, l, acc [hd])."""
    kv_head = head // GROUP
    n = lo + tl.arange(0, BLOCK)
    valid = n < hi
    k = tl.load(k_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :], mask=valid[:, None],
                other=0.0)  # [BLOCK, hd], the cache's dtype
    v = tl.load(v_ptr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :], mask=valid[:, None], other=0.0)
    cos_sin = rope_ptr + pos * 2 * HEAD_DIM
    cos = tl.load(cos_sin + d)
    sin = tl.load(cos_sin + HEAD_DIM + d)
    wait_for_prior(PDL)
    qkv = q_ptr + token * stride_qkv
    # rounded to the activations' dtype, as rope_append's q buffer holds it
    q = _rotate(qkv + head * HEAD_DIM, cos, sin, d, HEAD_DIM).to(q_ptr.dtype.element_ty).to(tl.float32) * scale
    k_new = _rotate(qkv + (NUM_HEADS + kv_head) * HEAD_DIM, cos, sin, d, HEAD_DIM).to(k_ptr.dtype.element_ty)
    v_new = tl.load(qkv + (NUM_HEADS + NUM_HEADS // GROUP + kv_head) * HEAD_DIM + d).to(v_ptr.dtype.element_ty)
    if split == pos // SPLIT:  # the split that holds the position appends its K and V (every query head of the group
        # does, with the same values)
        tl.store(k_ptr + kv_head * stride_kh + pos * stride_kn + d, k_new)
        tl.store(v_ptr + kv_head * stride_vh + pos * stride_vn + d, v_new)
    mine = (n == pos)[:, None]
    k = tl.where(mine, k_new[None, :], k).to(tl.float32)
    v = tl.where(mine, v_new[None, :], v).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    s = tl.sum(k * q[None, :], axis=1)  # [BLOCK]
    s = tl.where(valid, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)  # [BLOCK]
    acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    return m_new, l_i, acc


@triton.jit
def _block(q, k_ptr, v_ptr, kv_head, stride_kh, stride_kn, stride_vh, stride_vn, block_start, hi, d, m_i, l_i, acc,
           BLOCK: tl.constexpr, V_EARLY: tl.constexpr):
    """One block of keys [block_start, block_start + BLOCK) below `hi` for one query q [hd] (float32, scaled): the
    running max, sum and output [hd] updated (online softmax)."""
    n = block_start + tl.arange(0, BLOCK)
    valid = n < hi
    k = tl.load(k_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, hd]
    if V_EARLY:  # V's loads issued with K's, before the scores' reductions (barriers: ptxas keeps loads behind them)
        v = tl.load(v_ptr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, hd]
    s = tl.sum(k * q[None, :], axis=1)  # [BLOCK]
    s = tl.where(valid, s, -float("inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)  # [BLOCK]
    if not V_EARLY:
        v = tl.load(v_ptr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, hd]
    acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
    l_i = l_i * alpha + tl.sum(p, axis=0)
    return m_new, l_i, acc


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, acc_ptr, m_ptr, l_ptr, count_ptr, out_ptr, rope_ptr,
                  pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3,
                  stride_kh, stride_kn, stride_vh, stride_vn, stride_slot, stride_qkv,
                  scale, window,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr, SLOTS: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                  ROPE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr = 0, THREADS: tl.constexpr = 128,
                  V_EARLY: tl.constexpr = False, KV_EARLY: tl.constexpr = False,
                  EARLY_POSITION: tl.constexpr = False, LOOP_STAGES: tl.constexpr = 0):
    head = tl.program_id(0)
    split = tl.program_id(1)
    token = tl.program_id(2)
    d = tl.arange(0, HEAD_DIM)
    row = token * NUM_HEADS + head
    # KV_EARLY (DecodeAttention(kv_early=): ROPE, one query, no slots, one block a split) or EARLY_POSITION
    # (DecodeAttention(early_position=)): the position read before the wait
    if KV_EARLY or EARLY_POSITION:
        # written before the step's graph (the host) or by the previous step's argmax, never by the kernel before
        pos, start, lo, hi = _keys_of(pos_ptr, token, split, window, SPLIT)
        if PREFETCH > 0:  # before the return below: every program takes its share (weights only: no wait needed)
            if token == 0:
                prefetch_l2(pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3, head * tl.num_programs(1) + split,
                            NUM_HEADS * tl.num_programs(1), PREFETCH, THREADS)
        if lo >= hi:  # a split without keys of the token ends here, before the wait: it writes nothing and is not
            # counted by the split combine below (at a 4096-position cache and context 300, 59 of each head's 64)
            return
        if KV_EARLY:
            m_i, l_i, acc = _early_split(q_ptr, k_ptr, v_ptr, rope_ptr, stride_kh, stride_kn, stride_vh, stride_vn,
                                         stride_qkv, scale, head, split, token, pos, lo, hi, d, GROUP, HEAD_DIM,
                                         SPLIT, BLOCK, NUM_HEADS, PDL)
        else:
            wait_for_prior(PDL)
    else:
        wait_for_prior(PDL)
        if PREFETCH > 0:  # the next GEMVs' weights into L2 while this latency-bound kernel runs (l2_prefetch.py)
            if token == 0:
                prefetch_l2(pf0, pn0, pf1, pn1, pf2, pn2, pf3, pn3, head * tl.num_programs(1) + split,
                            NUM_HEADS * tl.num_programs(1), PREFETCH, THREADS)
        pos, start, lo, hi = _keys_of(pos_ptr, token, split, window, SPLIT)
    if not KV_EARLY:
        kv_head = head // GROUP
        if SLOTS:  # a batched decode: each token attends to its own KV slot
            k_ptr += tl.load(slot_ptr + token) * stride_slot
            v_ptr += tl.load(slot_ptr + token) * stride_slot
        if ROPE:  # q_ptr is the token's un-rotated qkv row [(heads + 2 kv_heads) * hd]: RoPE and the KV append here
            qkv = q_ptr + token * stride_qkv
            cos_sin = rope_ptr + pos * 2 * HEAD_DIM
            # rounded to the activations' dtype, as rope_append's q buffer holds it
            q = _rope_row(qkv + head * HEAD_DIM, cos_sin, d, HEAD_DIM).to(q_ptr.dtype.element_ty).to(tl.float32) \
                * scale
            if split == pos // SPLIT:  # the one split that reads position pos appends its K and V first (every query
                # head of the group does, with the same values); the barrier makes the row visible to the whole
                # program
                k_new = _rope_row(qkv + (NUM_HEADS + kv_head) * HEAD_DIM, cos_sin, d, HEAD_DIM)
                tl.store(k_ptr + kv_head * stride_kh + pos * stride_kn + d, k_new.to(k_ptr.dtype.element_ty))
                tl.store(v_ptr + kv_head * stride_vh + pos * stride_vn + d,
                         tl.load(qkv + (NUM_HEADS + NUM_HEADS // GROUP + kv_head) * HEAD_DIM + d))
            tl.debug_barrier()
        else:
            q = tl.load(q_ptr + row * HEAD_DIM + d).to(tl.float32) * scale  # [hd]
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        if LOOP_STAGES > 1:  # software-pipelined: the next blocks' K and V loads in flight during this block's sums
            for block_start in tl.range(lo, hi, BLOCK, num_stages=LOOP_STAGES):
                m_i, l_i, acc = _block(q, k_ptr, v_ptr, kv_head, stride_kh, stride_kn, stride_vh, stride_vn,
                                       block_start, hi, d, m_i, l_i, acc, BLOCK, V_EARLY)
        else:
            for block_start in range(lo, hi, BLOCK):
                m_i, l_i, acc = _block(q, k_ptr, v_ptr, kv_head, stride_kh, stride_kn, stride_vh, stride_vn,
                                       block_start, hi, d, m_i, l_i, acc, BLOCK, V_EARLY)
    out = row * NUM_SPLITS + split
    # A split past the position (or before a window's start) writes nothing: the reduce skips it. (Masks as
    # tensors: a split's scalars are stored as [1] vectors.)
    one = tl.arange(0, 1)
    busy = (one + lo) < hi  # [1]
    tl.store(acc_ptr + out * HEAD_DIM + d, acc, mask=(d * 0 + lo) < hi)
    tl.store(m_ptr + out + one, tl.zeros([1], dtype=tl.float32) + m_i, mask=busy)
    tl.store(l_ptr + out + one, tl.zeros([1], dtype=tl.float32) + l_i, mask=busy)
    if FUSED_REDUCE:  # the last of the row's programs to get here (all of the grid's, or with KV_EARLY or
        # EARLY_POSITION those holding keys) combines the splits (no reduce kernel after)
        tl.debug_barrier()  # every thread's stores are issued before the release below
        done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        # the splits holding keys [start, pos] that the grid launched (all of them, unless the grid is shorter than
        # the position: a graph's warm-up at the cache's last row, `__call__`'s context): the ones written
        s_hi = tl.minimum(pos // SPLIT + 1, tl.num_programs(1))
        if KV_EARLY or EARLY_POSITION:  # only those got here
            last = s_hi - 1 - start // SPLIT
        else:  # every split program of the grid (NUM_SPLITS, or another count: `__call__`'s context)
            last = tl.num_programs(1) - 1
        if done == last:  # so the counter is back at zero after every call, whatever the grid
            _combine(acc_ptr, m_ptr, l_ptr, out_ptr, row, start // SPLIT, s_hi, HEAD_DIM, NUM_SPLITS,
                     COMBINE_SPLITS)
            tl.atomic_xchg(count_ptr + row, 0)  # ready for the next step (a graph replays it)


# Splits combined per loop step: a [16, hd] float32 tile (64 registers a thread on one warp). A tl.constexpr: a
# @triton.jit function may read no other kind of module global (the interpreter allows it; the compiler does not).
COMBINE_SPLITS = tl.constexpr(16)


@triton.jit
def _combine(acc_ptr, m_ptr, l_ptr, out_ptr, row, s_lo, s_hi, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
             SB: tl.constexpr):
    """out[row] [hd] = splits [s_lo, s_hi) of the row's partials (the ones written) combined by their maxima, SB
    splits at a time (a whole [NUM_SPLITS, hd] tile would spill on a one-warp program at a 4096-position cache);
    loads from L2 (.cg): other programs of the same kernel may have written them. The first SB splits' loads are
    issued before the maxima's reduction (they do not depend on it: one L2 round trip fewer on the step's critical
    path); the arithmetic is the loop's, in the same order (the same bits on an H200 and under the interpreter).
    Measured (H200, 38th session, whole steps, two alternating rounds, context 300 / 2000): SmolLM2-135M 0.496 /
    0.491 -> 0.482 / 0.484 and 0.550 / 0.544 -> 0.533 / 0.538 ms; LLaMA-2-7B 3.702 / 3.678 -> 3.674 / 3.663 and
    3.980 / 3.955 -> 3.934 / 3.916."""
    d = tl.arange(0, HEAD_DIM)
    s = s_lo + tl.arange(0, SB)
    ok = s < s_hi
    mb = tl.load(m_ptr + row * NUM_SPLITS + s, mask=ok, other=-float("inf"), cache_modifier=".cg")  # [SB]
    lb = tl.load(l_ptr + row * NUM_SPLITS + s, mask=ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0,
                  cache_modifier=".cg")  # [SB, hd]
    s_all = tl.arange(0, NUM_SPLITS)
    m = tl.load(m_ptr + row * NUM_SPLITS + s_all, mask=(s_all >= s_lo) & (s_all < s_hi), other=-float("inf"),
                cache_modifier=".cg")  # [S]
    m_max = tl.max(m, axis=0)
    total = tl.zeros([HEAD_DIM], dtype=tl.float32)
    weight = tl.zeros([SB], dtype=tl.float32)
    w = tl.where(lb > 0, tl.exp(mb - m_max), 0.0)  # [SB]
    total += tl.sum(acc * w[:, None], axis=0)
    weight += lb * w
    for s0 in range(s_lo + SB, s_hi, SB):
        s = s0 + tl.arange(0, SB)
        ok = s < s_hi
        mb = tl.load(m_ptr + row * NUM_SPLITS + s, mask=ok, other=-float("inf"), cache_modifier=".cg")  # [SB]
        lb = tl.load(l_ptr + row * NUM_SPLITS + s, mask=ok, other=0.0, cache_modifier=".cg")
        w = tl.where(lb > 0, tl.exp(mb - m_max), 0.0)  # [SB]
        acc = tl.load(acc_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0,
                      cache_modifier=".cg")  # [SB, hd]
        total += tl.sum(acc * w[:, None], axis=0)
        weight += lb * w
    tl.store(out_ptr + row * HEAD_DIM + d, (total / tl.sum(weight, axis=0)).to(out_ptr.dtype.element_ty))


@triton.jit
def _split_rows_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
                       stride_kh, stride_kn, stride_vh, stride_vn,
                       scale, window, T,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
                       NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr, ROWS: tl.constexpr, IEEE: tl.constexpr,
                       PDL: tl.constexpr):
    wait_for_prior(PDL)
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, ROWS)  # row r: token r // GROUP, query head kv_head * GROUP + r % GROUP; padded to ROWS
    token = r // GROUP
    row_ok = token < T
    pos = tl.load(pos_ptr + token, mask=row_ok, other=-1)  # [ROWS]; keys [start, pos] are visible to the row
    start = tl.maximum(pos + 1 - window, 0)
    lo = tl.maximum(split * SPLIT, tl.min(tl.where(row_ok, start, 1 << 30), axis=0))
    hi = tl.minimum((split + 1) * SPLIT, tl.max(pos, axis=0) + 1)
    d = tl.arange(0, HEAD_DIM)
    row = token * NUM_HEADS + kv_head * GROUP + r % GROUP  # [ROWS]: the row of [T * heads, hd]
    q = tl.load(q_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)  # [ROWS, hd]
    m_i = tl.full([ROWS], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for block_start in range(lo, hi, BLOCK):
        n = block_start + tl.arange(0, BLOCK)
        valid = n < hi
        k = tl.load(k_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :],
                    mask=valid[:, None], other=0.0)  # [BLOCK, hd]
        if IEEE:
            s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q.to(k.dtype), tl.trans(k))  # [ROWS, BLOCK] float32
        visible = (n[None, :] <= pos[:, None]) & (n[None, :] >= start[:, None]) & valid[None, :]
        s = tl.where(visible, s * scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with nothing visible yet keeps 0s
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # [ROWS, BLOCK]
        v = tl.load(v_ptr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :],
                    mask=valid[:, None], other=0.0)  # [BLOCK, hd]
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = row * NUM_SPLITS + split
    tl.store(acc_ptr + out[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _reduce_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, pos_ptr, window, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   NUM_HEADS: tl.constexpr, PDL: tl.constexpr, SPLIT: tl.constexpr = 0):
    """SPLIT > 0: split s holds positions [s * SPLIT, (s + 1) * SPLIT) and only those holding keys of the token (at
    pos_ptr[token], within `window`) were written; 0: every split was (extend attention's key splits)."""
    wait_for_prior(PDL)
    token = tl.program_id(1)
    row = token * NUM_HEADS + tl.program_id(0)  # a row of [T * heads, hd]
    # Only the splits holding keys of this token ([start, pos]) are read: past them the split kernels wrote nothing
    # (the rest of a cache-long workspace: at a 4096-position cache and context 300, 118 of 128 splits).
    if SPLIT > 0:
        pos = tl.load(pos_ptr + token)
        s_lo = tl.maximum(pos + 1 - window, 0) // SPLIT
        s_hi = pos // SPLIT + 1
        _combine(acc_ptr, m_ptr, l_ptr, out_ptr, row, s_lo, s_hi, HEAD_DIM, NUM_SPLITS, COMBINE_SPLITS)
    else:  # extend attention's key splits: all of them in one tile (its sums as before the split ranges)
        _combine(acc_ptr, m_ptr, l_ptr, out_ptr, row, 0, NUM_SPLITS, HEAD_DIM, NUM_SPLITS, NUM_SPLITS)


class DecodeAttention:
    """Workspace sized once for a cache length; `__call__` is graph-safe (no allocation, no host reads)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, max_context: int,
                 device: torch.device, sliding_window: int | None = None, split_size: int | None = None,
                 max_tokens: int = 1, pdl: bool = False, batched: bool = False, num_warps: int | None = None,
                 fused_reduce: bool = False, v_early: bool = False, kv_early: bool = False,
                 early_position: bool = False, loop_stages: int = 0, rows_kernel: bool = False) -> None:
        """`max_tokens` > 1: a verify step's tokens (one sequence, consecutive positions), or with `batched` the
        tokens of a batched decode (one per KV slot: `__call__`'s slots). `num_warps`: the one-query kernel's
        (default: `one_query_warps` with the default split, else Triton's 4; `bench.probes.decode_attention`
        sweeps it). `fused_reduce`: the one-query kernel's last program per query head combines the splits (one
        kernel per call instead of two; off by default: not faster on 7B in the whole step, see SPLIT_SIZE; the
        verify kernel keeps its reduce kernel). `v_early`: the one-query kernel issues each block's V loads with its
        K loads, before the scores' reductions (whose barriers otherwise keep V's DRAM latency after K's; same
        arithmetic, same bits; measured on an H200: a loss with the split combine and on 7B, so off everywhere,
        decode_plan.StepOptions.v_early). `kv_early`: a one-query call with `rope` (decode, not batched) loads each
        split's keys and values, its position and cos/sin before it waits for the kernel before it (PDL: during the
        QKV projection) and takes the new position's K and V from registers (`_early_split`; same bits); needs
        splits of at most BLOCK_N positions (one block each). `early_position` (one query per token: decode, batched
        or not): the position is read before the wait (it is written before the step, never by the kernel before),
        and a split without keys of the token returns there, so the position's round trip leaves the critical path
        and the empty splits never wait (kv_early does both too); the same bits. Measured (H200, 42nd session, whole
        steps): LLaMA-2-7B +1.3% / +2.0% at context 300 / 2000, Llama-3-8B +3.9% / +1.9%, Llama-3.2-1B -0.8% / -0.9%:
        off. `loop_stages` > 1 (the one-query kernel without kv_early): its loop over a split's blocks is software-
        pipelined over that many stages (`tl.range(num_stages=)`: the next blocks' K and V loads issued during this
        block's sums), for splits of several blocks; the same arithmetic in the same order. Unmeasured (42nd
        session). `rows_kernel` (one token, not batched): the decode runs the verify step's kernel
        (`_split_rows_kernel`: one program per KV head and split, the group's queries as rows of tensor-core
        products, padded to 16) instead of one program per query head; no RoPE inside, prefetch or context there.
        Unmeasured (42nd session)."""
        if head_dim & (head_dim - 1):
            raise ValueError(f"decode attention needs a power-of-two head_dim, got {head_dim}")
        if loop_stages > 1 and (kv_early or one_block_splits(split_size)):
            raise ValueError(f"loop_stages pipelines a loop over several blocks of keys a split: splits of more than "
                             f"{BLOCK_N} positions without kv_early, got {split_size or SPLIT_SIZE}"
                             f"{' with kv_early' if kv_early else ''}")
        if kv_early and not one_block_splits(split_size):
            raise ValueError(f"kv_early loads one block of keys a split: splits of at most {BLOCK_N} positions, got "
                             f"{split_size or SPLIT_SIZE}")
        self.num_heads, self.group, self.head_dim = num_heads, num_heads // num_kv_heads, head_dim
        if rows_kernel and (max_tokens != 1 or batched or kv_early or early_position or fused_reduce or v_early
                            or loop_stages):
            raise ValueError("rows_kernel runs one token's decode on the verify step's kernel, which has none of "
                             "the one-query kernel's options (batched, kv_early, early_position, fused_reduce, "
                             "v_early, loop_stages)")
        self.rows_kernel = rows_kernel
        # `_split_kernel`; else the verify step's `_split_rows_kernel`
        self.one_query = one_query = (max_tokens == 1 or batched) and not rows_kernel
        self.split = split_size or SPLIT_SIZE
        self.num_splits = triton.next_power_of_2(triton.cdiv(max_context, self.split))
        self.window = sliding_window or (1 << 30)
        self.scale = head_dim ** -0.5
        f32 = dict(device=device, dtype=torch.float32)
        self.max_tokens = max_tokens
        self.batched = batched
        self.pdl = pdl  # launch with programmatic dependent launch (kernels/pdl.py)
        if num_warps is None and one_query and split_size is None:
            num_warps = one_query_warps(num_heads, head_dim, batched)
        self.warps = {} if num_warps is None else {"num_warps": num_warps}
        self.rows = max(16, triton.next_power_of_2(self.group * max_tokens))  # the multi-token kernel's rows
        self.acc = torch.empty(max_tokens, num_heads, self.num_splits, head_dim, **f32)
        self.m = torch.empty(max_tokens, num_heads, self.num_splits, **f32)
        self.l = torch.empty(max_tokens, num_heads, self.num_splits, **f32)
        self.fused_reduce = fused_reduce and one_query
        self.v_early = v_early
        self.kv_early = kv_early
        self.early_position = early_position
        self.loop_stages = loop_stages
        # per query row, how many of its split programs have finished (the last one resets it)
        self.counts = torch.zeros(max_tokens * num_heads, device=device, dtype=torch.int32)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                 out: torch.Tensor, slots: torch.Tensor | None = None, slot_stride: int = 0,
                 rope: torch.Tensor | None = None, prefetch: L2Prefetch | None = None,
                 context: int | None = None) -> torch.Tensor:
        """q: [T, heads, hd] (or [heads, hd] for T = 1), contiguous; k/v_cache: [kv_heads, C, hd] (unit stride in
        hd); position: [T] int64, token t's position; out: [T, heads, hd] like q, written in q's dtype. `slots` [T]
        int64 (a batched decode): token t attends to the caches of KV slot slots[t], slot_stride elements after
        k/v_cache. `rope` [C, 2, hd] float32 (one query per token only): q is then the tokens' un-rotated QKV
        projection [T, (heads + 2 kv_heads) * hd] (or 1-D for T = 1) and this call also does `rope_append`'s work
        (RoPE on q and k, K and V written at each token's position): one kernel fewer per layer. `prefetch`
        (one query per token only; sm_90+, `l2_prefetch.supported`): weights the programs ask L2 to hold for the
        kernels after this one (values unchanged). `context` (one query per token): every position is below it, so only
        the splits that can hold keys, the first cdiv(context, split), are launched (None: the cache's NUM_SPLITS;
        the graph runner's decode graphs per context bucket, graphs.DECODE_CONTEXT_MIN). The rest would find no keys
        and store nothing. A context past the cache's length launches that many more programs, which find no keys
        either (step_variants times the step with them: how the waiting programs shape the step). A position at or
        past the context (a graph's warm-up at the cache's last row) gives a wrong output, attending to the keys of
        the launched splits only, and leaves the workspace ready for the next call (the split combine's counts at
        zero)."""
        if self.batched and slots is None or slots is not None and not (self.batched or self.max_tokens == 1):
            raise ValueError("a batched decode attention takes each token's KV slot (a verify step's tokens share one)")
        tokens = position.shape[0]
        width = (self.num_heads + 2 * (self.num_heads // self.group)) * self.head_dim if rope is not None else \
            self.num_heads * self.head_dim
        if tokens > self.max_tokens or q.numel() != tokens * width:
            raise ValueError(f"decode attention sized for {self.max_tokens} tokens of {self.num_heads} x "
                             f"{self.head_dim}{' (a QKV row each)' if rope is not None else ''}, got q "
                             f"{tuple(q.shape)} for {tokens} positions")
        if self.rows_kernel and (rope is not None or prefetch is not None or context is not None):
            raise ValueError("a decode on the rows kernel takes q after rope_append, and no prefetch or context")
        # past the check above, only a verify step's attention is not one_query
        if rope is not None and not self.one_query:
            raise ValueError("RoPE inside decode attention is for one query per token (decode), not a verify step")
        if prefetch is not None and not self.one_query:
            raise ValueError("an L2 prefetch rides on the one-query kernel (decode), not a verify step")
        if context is not None and not (1 <= context and self.one_query):
            raise ValueError(f"a decode attention's context bounds one query per token's positions: >= 1, got "
                             f"{context}{'' if self.one_query else ' on a verify step'}")
        splits = self.num_splits if context is None else triton.cdiv(context, self.split)
        strides = (k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1))
        block = min(BLOCK_N, self.split)
        if self.one_query:
            pf_args, regions = l2_prefetch.kernel_args(prefetch, self.m)
            _split_kernel[(self.num_heads, splits, tokens)](
                q, k_cache, v_cache, position, slots if slots is not None else position, self.acc, self.m, self.l,
                self.counts, out, rope if rope is not None else self.m, *pf_args, *strides, slot_stride, width,
                self.scale, self.window, GROUP=self.group, HEAD_DIM=self.head_dim, SPLIT=self.split, BLOCK=block,
                NUM_SPLITS=self.num_splits, NUM_HEADS=self.num_heads, SLOTS=slots is not None,
                FUSED_REDUCE=self.fused_reduce, ROPE=rope is not None, PDL=self.pdl,
                PREFETCH=regions,
                THREADS=32 * self.warps.get("num_warps", 4), V_EARLY=self.v_early,
                KV_EARLY=self.kv_early and rope is not None and slots is None,
                EARLY_POSITION=self.early_position, LOOP_STAGES=self.loop_stages, **self.warps,
                **launch_options(self.pdl),
            )
            if self.fused_reduce:
                return out
        else:
            _split_rows_kernel[(self.num_heads // self.group, self.num_splits)](
                q, k_cache, v_cache, position, self.acc, self.m, self.l, *strides, self.scale, self.window, tokens,
                GROUP=self.group, HEAD_DIM=self.head_dim, SPLIT=self.split, BLOCK=max(16, block),
                NUM_SPLITS=self.num_splits, NUM_HEADS=self.num_heads, ROWS=self.rows,
                IEEE=k_cache.dtype == torch.float32, num_warps=4 if self.rows * self.head_dim <= 4096 else 8,
                PDL=self.pdl, **launch_options(self.pdl),
            )
        _reduce_kernel[(self.num_heads, tokens)](self.acc, self.m, self.l, out, position, self.window,
                                                 HEAD_DIM=self.head_dim, NUM_SPLITS=self.num_splits,
                                                 NUM_HEADS=self.num_heads, PDL=self.pdl, SPLIT=self.split,
                                                 **launch_options(self.pdl))
        return out
