"""The whole batch-1 decode step of a dense (fp16/bf16) model as ONE persistent kernel: one program per SM (or a
few), every layer's phases run in turn, each phase's work units spread over the programs, a grid-wide barrier
between phases (an atomic counter in device memory).

Why: on small models the decode step is all kernel boundaries. SmolLM2-135M's step reads 0.27 GB (0.06 ms at an
H200's bandwidth) but runs ~212 kernels at ~2.5-3 us each (0.5 ms; bench/NOTES.md, issue 12). A grid barrier costs
about an L2 round trip or two (~1 us), less than a kernel boundary, and no phase waits for a launch or a ramp.

Phases per layer (the same arithmetic as `fused_decoder.FusedDecoder`'s kernels, which the tests compare it with):
  1. qkv = W_qkv @ (rmsnorm(x) * attn_norm) [+ bias]          units: row blocks of BN_QKV rows
  2. attention splits: RoPE on q (and, in the split holding the position, on the new k; that split writes the
     new K and V into the cache), flash-decoding partials (m, l, acc) per (head, split)   units: (head, split)
  3. the splits of each head combined into attn [heads * hd]   units: heads
  4. x += W_o @ attn                                          units: row blocks of BN_O rows
  5. gate_up = W_gu @ (rmsnorm(x) * mlp_norm)                  units: row blocks of BN_GU rows
  6. x += W_down @ (silu(gate) * up)                           units: row blocks of BN_DOWN rows
The embedding row is copied into x first. The logits (W_lm @ (rmsnorm(x) * norm), float32) are gemv.py's kernel after
this one: a vocabulary of rows streams at full bandwidth there, where the units here wait a DRAM latency each.

Co-residency: a grid barrier deadlocks unless every program is resident at once; the host sizes the grid to the
SM count times the programs an SM holds by the compiled kernel's registers (`PersistentDecoder` checks it).
Under the Triton interpreter (the CPU tests) programs run one after another, so a barrier cannot be waited on there:
the host launches each phase as its own grid instead (`SYNC=False`, `PHASE=` the phase): the same code per phase.

Memory ordering at a barrier: every thread's stores are issued (`debug_barrier`), one thread adds 1 with release
semantics (gpu scope), then polls with acquire loads until the count reaches the barrier's ordinal x programs;
activations written by other programs are loaded with `.cg` (L2, not a possibly stale L1 line). The last program
to leave zeroes the counters for the next launch (a graph replay).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from graph_executor.kernels.decode_attention import _combine

# phases of the per-phase launches (the interpreter's): PHASE_ALL runs everything in one launch with barriers
(PHASE_ALL, PHASE_EMBED, PHASE_QKV, PHASE_ATTN, PHASE_COMBINE, PHASE_O, PHASE_GATE_UP,
 PHASE_DOWN) = range(-1, 7)
LAYER_PHASES = (PHASE_QKV, PHASE_ATTN, PHASE_COMBINE, PHASE_O, PHASE_GATE_UP, PHASE_DOWN)
# per layer, element offsets (from layer 0's tensor of the same kind) of: qkv weight, o, gate_up, down, attn norm,
# mlp norm, qkv bias (0 without one), padding
OFFSETS = 8


@triton.jit
def _acquire_count(ptr):
    """The counter at `ptr`, loaded with acquire semantics at gpu scope (a scalar)."""
    seen = tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr + tl.arange(0, 1)],
                                     dtype=tl.int32, is_pure=False, pack=1)
    return tl.max(seen, axis=0)


@triton.jit
def _grid_sync(sync_ptr, epoch, SYNC: tl.constexpr):
    """Barrier number `epoch` (1, 2, ... within the launch) over every program of the grid."""
    if SYNC:
        tl.debug_barrier()  # this program's stores are all issued before its arrival is released
        tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")
        target = epoch * tl.num_programs(0)
        while _acquire_count(sync_ptr) < target:
            pass
        tl.debug_barrier()


@triton.jit
def _rope_row(src, cos_sin, d, HEAD_DIM: tl.constexpr):
    """decode_attention._rope_row with the row loaded from L2 (`.cg`: written by other programs of this launch)."""
    half: tl.constexpr = HEAD_DIM // 2
    x = tl.load(src + d, cache_modifier=".cg").to(tl.float32)
    partner = tl.load(src + (d + half) % HEAD_DIM, cache_modifier=".cg").to(tl.float32)
    sin = tl.load(cos_sin + HEAD_DIM + d)
    return x * tl.load(cos_sin + d) + tl.where(d < half, -partner * sin, partner * sin)


@triton.jit
def _norm_gemv_unit(w_ptr, x_ptr, nw_ptr, b_ptr, out_ptr, u, N, K: tl.constexpr, eps, HAS_BIAS: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):
    """out[rows] = W[rows] @ (rmsnorm(x) * nw) [+ b] for the unit's BN rows (gemv._rmsnorm_gemv_kernel's sums). K is
    a constexpr and its loop unrolled, so that every chunk's weight loads can be issued before the first is used (one
    program per SM holds the whole unit's bytes in flight; a rolled loop waited one DRAM latency per chunk)."""
    rows = u * BN + tl.arange(0, BN)
    row_ok = rows < N
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    ss = tl.zeros([BK], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ss += x * x
        acc += w.to(tl.float32) * (x * nw)[None, :]
    out = tl.sum(acc, axis=1) * (1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps))
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _residual_gemv_unit(w_ptr, a_ptr, x_ptr, u, N, K: tl.constexpr, SWIGLU: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr):
    """x[rows] += W[rows] @ a (SWIGLU: a = silu(gate) * up of a_ptr = [gate (K), up (K)]) for the unit's rows (K
    unrolled as in _norm_gemv_unit)."""
    rows = u * BN + tl.arange(0, BN)
    row_ok = rows < N
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptr + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        if SWIGLU:
            up = tl.load(a_ptr + K + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
            a = a / (1.0 + tl.exp(-a)) * up
        acc += w.to(tl.float32) * a[None, :]
    out = tl.sum(acc, axis=1)
    residual = tl.load(x_ptr + rows, mask=row_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(x_ptr + rows, (residual + out).to(x_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _attention_unit(qkv_ptr, k_ptr, v_ptr, rope_ptr, acc_ptr, m_ptr, l_ptr, head, split, pos, start, stride_kh,
                    stride_kn, scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr):
    """One (head, split) of decode attention with RoPE inside (decode_attention._split_kernel's ROPE path): the
    split's partials (acc [hd], m, l) into the workspace row head * NUM_SPLITS + split."""
    kv_head = head // GROUP
    lo = tl.maximum(split * SPLIT, start)
    hi = tl.minimum((split + 1) * SPLIT, pos + 1)
    d = tl.arange(0, HEAD_DIM)
    cos_sin = rope_ptr + pos * 2 * HEAD_DIM
    # qkv was written by other programs in the phase before: read from L2
    q = _rope_row(qkv_ptr + head * HEAD_DIM, cos_sin, d, HEAD_DIM).to(qkv_ptr.dtype.element_ty).to(tl.float32) * scale
    if split == pos // SPLIT:  # the split that reads position pos appends the new K and V first (each query head of
        # the group writes the same values); the barrier makes the row visible to the whole program
        k_new = _rope_row(qkv_ptr + (NUM_HEADS + kv_head) * HEAD_DIM, cos_sin, d, HEAD_DIM)
        tl.store(k_ptr + kv_head * stride_kh + pos * stride_kn + d, k_new.to(k_ptr.dtype.element_ty))
        tl.store(v_ptr + kv_head * stride_kh + pos * stride_kn + d,
                 tl.load(qkv_ptr + (NUM_HEADS + NUM_HEADS // GROUP + kv_head) * HEAD_DIM + d, cache_modifier=".cg"))
    tl.debug_barrier()
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for block_start in range(lo, hi, BLOCK):
        n = block_start + tl.arange(0, BLOCK)
        valid = n < hi
        k = tl.load(k_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :],
                    mask=valid[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)  # [BLOCK, hd]
        s = tl.sum(k * q[None, :], axis=1)  # [BLOCK]
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)  # [BLOCK]
        v = tl.load(v_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :],
                    mask=valid[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)  # [BLOCK, hd]
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = head * NUM_SPLITS + split
    one = tl.arange(0, 1)
    tl.store(acc_ptr + out * HEAD_DIM + d, acc)
    tl.store(m_ptr + out + one, tl.zeros([1], dtype=tl.float32) + m_i)
    tl.store(l_ptr + out + one, tl.zeros([1], dtype=tl.float32) + l_i)


@triton.jit
def _step_kernel(
    # weights: layer 0's tensor of each kind (the others at per-layer element offsets from it, `offs_ptr`)
    embed_ptr, wqkv_ptr, wo_ptr, wgu_ptr, wd_ptr, anorm_ptr, mnorm_ptr, bias_ptr, offs_ptr,
    # the step's inputs and output
    tok_ptr, pos_ptr, slot_ptr,
    # the KV cache (slot 0, layer 0's K; V at +v_off; a layer at +layer_stride, a slot at +slot_stride), RoPE table
    kv_ptr, v_off, layer_stride, slot_stride, stride_kh, stride_kn, rope_ptr,
    # workspace
    x_ptr, qkv_ptr, attn_ptr, gu_ptr, acc_ptr, m_ptr, l_ptr, sync_ptr,
    # sizes
    NQKV, eps, scale, window, L0, L1, H: tl.constexpr, I: tl.constexpr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, SLOTS: tl.constexpr,
    BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_DOWN: tl.constexpr,
    BK: tl.constexpr, EMBED_BLOCK: tl.constexpr, PHASE: tl.constexpr, SYNC: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    pos = tl.load(pos_ptr)
    if SLOTS:
        kv_ptr += tl.load(slot_ptr) * slot_stride
    start = tl.maximum(pos + 1 - window, 0)
    epoch = 0
    if PHASE == -1 or PHASE == 0:  # the token's embedding row into the residual stream
        row = tl.load(tok_ptr)
        for c0 in range(pid * EMBED_BLOCK, H, P * EMBED_BLOCK):
            cols = c0 + tl.arange(0, EMBED_BLOCK)
            tl.store(x_ptr + cols, tl.load(embed_ptr + row * H + cols, mask=cols < H), mask=cols < H)
        epoch += 1
        _grid_sync(sync_ptr, epoch, SYNC)
    q_size: tl.constexpr = NUM_HEADS * HEAD_DIM
    s_lo = start // SPLIT
    active = pos // SPLIT + 1 - s_lo  # splits holding keys [start, pos]
    for layer in range(L0, L1):
        offs = offs_ptr + layer * 8
        k_ptr = kv_ptr + layer * layer_stride
        if PHASE == -1 or PHASE == 1:
            for u in range(pid, tl.cdiv(NQKV, BN_QKV), P):
                _norm_gemv_unit(wqkv_ptr + tl.load(offs), x_ptr, anorm_ptr + tl.load(offs + 4),
                                bias_ptr + tl.load(offs + 6), qkv_ptr, u, NQKV, H, eps, HAS_BIAS, BN_QKV, BK)
            epoch += 1
            _grid_sync(sync_ptr, epoch, SYNC)
        if PHASE == -1 or PHASE == 2:
            for u in range(pid, NUM_HEADS * active, P):
                _attention_unit(qkv_ptr, k_ptr, k_ptr + v_off, rope_ptr, acc_ptr, m_ptr, l_ptr, u // active,
                                s_lo + u % active, pos, start, stride_kh, stride_kn, scale, GROUP, HEAD_DIM, SPLIT,
                                BLOCK, NUM_SPLITS, NUM_HEADS)
            epoch += 1
            _grid_sync(sync_ptr, epoch, SYNC)
        if PHASE == -1 or PHASE == 3:
            for head in range(pid, NUM_HEADS, P):
                _combine(acc_ptr, m_ptr, l_ptr, attn_ptr, head, s_lo, s_lo + active, HEAD_DIM, NUM_SPLITS, 16)
            epoch += 1
            _grid_sync(sync_ptr, epoch, SYNC)
        if PHASE == -1 or PHASE == 4:
            for u in range(pid, tl.cdiv(H, BN_O), P):
                _residual_gemv_unit(wo_ptr + tl.load(offs + 1), attn_ptr, x_ptr, u, H, q_size, False, BN_O, BK)
            epoch += 1
            _grid_sync(sync_ptr, epoch, SYNC)
        if PHASE == -1 or PHASE == 5:
            for u in range(pid, tl.cdiv(2 * I, BN_GU), P):
                _norm_gemv_unit(wgu_ptr + tl.load(offs + 2), x_ptr, mnorm_ptr + tl.load(offs + 5), bias_ptr,
                                gu_ptr, u, 2 * I, H, eps, False, BN_GU, BK)
            epoch += 1
            _grid_sync(sync_ptr, epoch, SYNC)
        if PHASE == -1 or PHASE == 6:
            for u in range(pid, tl.cdiv(H, BN_DOWN), P):
                _residual_gemv_unit(wd_ptr + tl.load(offs + 3), gu_ptr, x_ptr, u, H, I, True, BN_DOWN, BK)
            epoch += 1
            _grid_sync(sync_ptr, epoch, SYNC)
    if SYNC:  # the last program out zeroes the counters for the next launch (every program has passed every barrier)
        if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class PersistentConfig:
    """Launch shape: `per_sm` programs per SM (the grid is SMs x per_sm; all must be resident at once), `num_warps`
    each, K walked in chunks of `block_k`; row blocks per phase None: the smallest power of two that covers the
    phase's rows in one round of the grid (capped at `max_rows`)."""
    per_sm: int = 1
    num_warps: int = 4
    block_k: int = 128
    max_rows: int = 32
    split: int = 64  # attention positions per split


def rows_per_unit(n: int, programs: int, cap: int) -> int:
    """The smallest power of two >= n / programs (at least 1, at most `cap`)."""
    return max(1, min(cap, triton.next_power_of_2(triton.cdiv(n, programs))))
