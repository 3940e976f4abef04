"""The whole batch-1 decode step of a dense (fp16/bf16) model as ONE persistent kernel: one program per SM, every
layer's phases run in turn, each phase's work units spread over the programs, a grid-wide barrier between phases (an
atomic counter in device memory).

Why: on small models the decode step is all kernel boundaries. SmolLM2-135M's step reads 0.27 GB (0.06 ms at an
H200's bandwidth) but runs ~212 kernels at ~2.5 us each (0.5 ms; bench/NOTES.md, issue 12). A grid barrier costs
~1 us on an H200 (bench.probes.grid_barrier), and the weights of a phase's first unit are loaded while the program
waits at the barrier before it, so no phase waits for a launch, a ramp or (mostly) a DRAM latency.

Phases per layer (the arithmetic of `fused_decoder.FusedDecoder`'s kernels, which the tests compare it with):
  1. qkv = W_qkv @ (rmsnorm(x) * attn_norm) [+ bias]          units: row blocks of BN_QKV rows
  2. attention: RoPE on q (and, in the split holding the position, on the new k; that split writes the new K and V
     into the cache), flash-decoding partials per (head, split); the last unit of a head to finish combines its
     splits into attn[head]                                    units: (head, split)
  3. x += W_o @ attn                                          units: row blocks of BN_O rows
  4. gate_up = W_gu @ (rmsnorm(x) * mlp_norm)                  units: row blocks of BN_GU rows
  5. x += W_down @ (silu(gate) * up)                           units: row blocks of BN_DOWN rows
The embedding row is copied into x first. The logits (W_lm @ (rmsnorm(x) * norm), float32) are gemv.py's kernel after
this one: a vocabulary of rows streams at full bandwidth there.

A unit's weights are loaded whole (`_tile`: two power-of-two tiles, every byte in flight at once); a phase with more
units than programs loads its later units in turn. So the kernel suits models whose units fit a program's registers
(hidden sizes up to ~1-2k); `persistent_decoder` says which models take it.

Co-residency: a grid barrier deadlocks unless every program is resident at once; `PersistentDecoder` checks the grid
against the SMs and the compiled kernel's registers before the first launch. Under the Triton interpreter (the CPU
tests) programs run one after another, so the grid there is one program (its barriers pass at once).

Memory ordering at a barrier: every thread's stores are issued (`debug_barrier`), one thread adds 1 with release
semantics (gpu scope), then polls with acquire loads until the count reaches the barrier's ordinal x programs;
activations written by other programs are loaded with `.cg` (from L2, never a stale L1 line). The last program to
leave zeroes the counter for the next launch (a graph replay).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from graph_executor.kernels.decode_attention import _combine

STAMP_SLOTS = tl.constexpr(512)  # a program's clock stamps (STAMPS): 10 a layer (each phase's start and end)
# per layer, element offsets (from layer 0's tensor of the same kind) of: qkv weight, o, gate_up, down, attn norm,
# mlp norm, qkv bias (0 without one), padding
OFFSETS = 8


@triton.jit
def _count(ptr, INTERPRET: tl.constexpr):
    """The counter at `ptr` (a scalar), loaded with acquire semantics at gpu scope (the interpreter: an atomic)."""
    if INTERPRET:
        return tl.atomic_add(ptr, 0)
    seen = tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr + tl.arange(0, 1)],
                                     dtype=tl.int32, is_pure=False, pack=1)
    return tl.max(seen, axis=0)


@triton.jit
def _arrive(sync_ptr):
    """This program's arrival at the next grid barrier: its stores are all issued, then released (gpu scope)."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(sync_ptr, epoch, INTERPRET: tl.constexpr):
    """Until every program has arrived at barrier number `epoch` (1, 2, ... within the launch)."""
    target = epoch * tl.num_programs(0)
    while _count(sync_ptr, INTERPRET) < target:
        pass
    tl.debug_barrier()


@triton.jit
def _stamp(stamps_ptr, pid, index, STAMPS: tl.constexpr):
    """The SM's clock (cycles) into stamps[pid, index] (bench.probes.persistent_phases: where a step's time goes)."""
    if STAMPS:
        clock = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid + tl.arange(0, 1)], dtype=tl.int64,
                                          is_pure=False, pack=1)
        tl.store(stamps_ptr + pid * STAMP_SLOTS + index + tl.arange(0, 1), clock)


@triton.jit
def _tile(w_ptr, u, N, K: tl.constexpr, BN: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """Unit u's rows of a row-major [N, K] weight as two tiles, [BN, KA] and [BN, KB] (KA: the largest power of two
    <= K, KB: the rest rounded up to one, masked; 0: none), in ONE go: every byte of the unit in flight at once.
    Rows past N load nothing (a program with no unit in a phase computes on zeros and stores nothing)."""
    rows = u * BN + tl.arange(0, BN)
    row_ok = rows < N
    wa = tl.load(w_ptr + rows[:, None] * K + tl.arange(0, KA)[None, :], mask=row_ok[:, None], other=0.0)
    if KB > 0:
        cb = KA + tl.arange(0, KB)
        wb = tl.load(w_ptr + rows[:, None] * K + cb[None, :], mask=row_ok[:, None] & (cb < K)[None, :], other=0.0)
    else:
        wb = wa
    return wa, wb


@triton.jit
def _norm_rows(wa, wb, x_ptr, nw_ptr, b_ptr, out_ptr, u, N, K: tl.constexpr, eps, HAS_BIAS: tl.constexpr,
               BN: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """out[rows] = W[rows] @ (rmsnorm(x) * nw) [+ b] for unit u, its weights in the tiles (gemv.py's arithmetic: the
    sum of squares and the dot in float32, the scale applied to the row sums)."""
    rows = u * BN + tl.arange(0, BN)
    row_ok = rows < N
    ca = tl.arange(0, KA)
    x = tl.load(x_ptr + ca, cache_modifier=".cg").to(tl.float32)
    ss = tl.sum(x * x, axis=0)
    acc = tl.sum(wa.to(tl.float32) * (x * tl.load(nw_ptr + ca).to(tl.float32))[None, :], axis=1)
    if KB > 0:
        cb = KA + tl.arange(0, KB)
        ok = cb < K
        xb = tl.load(x_ptr + cb, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        ss += tl.sum(xb * xb, axis=0)
        acc += tl.sum(wb.to(tl.float32) * (xb * tl.load(nw_ptr + cb, mask=ok, other=0.0).to(tl.float32))[None, :],
                      axis=1)
    out = acc * (1.0 / tl.sqrt(ss / K + eps))
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _activation(a_ptr, cols, ok, K: tl.constexpr, SWIGLU: tl.constexpr):
    """a[cols] (SWIGLU: silu(gate) * up of a_ptr = [gate (K), up (K)]) in float32, from L2."""
    a = tl.load(a_ptr + cols, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    if SWIGLU:
        up = tl.load(a_ptr + K + cols, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        a = a / (1.0 + tl.exp(-a)) * up
    return a


@triton.jit
def _residual_rows(wa, wb, a_ptr, x_ptr, u, N, K: tl.constexpr, SWIGLU: tl.constexpr, BN: tl.constexpr,
                   KA: tl.constexpr, KB: tl.constexpr):
    """x[rows] += W[rows] @ a for unit u (a: `_activation`), its weights in the tiles."""
    rows = u * BN + tl.arange(0, BN)
    row_ok = rows < N
    ca = tl.arange(0, KA)
    acc = tl.sum(wa.to(tl.float32) * _activation(a_ptr, ca, ca < K, K, SWIGLU)[None, :], axis=1)
    if KB > 0:
        cb = KA + tl.arange(0, KB)
        acc += tl.sum(wb.to(tl.float32) * _activation(a_ptr, cb, cb < K, K, SWIGLU)[None, :], axis=1)
    residual = tl.load(x_ptr + rows, mask=row_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(x_ptr + rows, (residual + acc).to(x_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _norm_phase(wa, wb, w_ptr, x_ptr, nw_ptr, b_ptr, out_ptr, pid, P, N, K: tl.constexpr, eps,
                HAS_BIAS: tl.constexpr, BN: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr):
    """A `_norm_rows` phase: unit pid from the tiles loaded before the barrier, the program's later units here."""
    _norm_rows(wa, wb, x_ptr, nw_ptr, b_ptr, out_ptr, pid, N, K, eps, HAS_BIAS, BN, KA, KB)
    for u in range(pid + P, tl.cdiv(N, BN), P):
        ta, tb = _tile(w_ptr, u, N, K, BN, KA, KB)
        _norm_rows(ta, tb, x_ptr, nw_ptr, b_ptr, out_ptr, u, N, K, eps, HAS_BIAS, BN, KA, KB)


@triton.jit
def _residual_phase(wa, wb, w_ptr, a_ptr, x_ptr, pid, P, N, K: tl.constexpr, SWIGLU: tl.constexpr, BN: tl.constexpr,
                    KA: tl.constexpr, KB: tl.constexpr):
    """A `_residual_rows` phase, as `_norm_phase`."""
    _residual_rows(wa, wb, a_ptr, x_ptr, pid, N, K, SWIGLU, BN, KA, KB)
    for u in range(pid + P, tl.cdiv(N, BN), P):
        ta, tb = _tile(w_ptr, u, N, K, BN, KA, KB)
        _residual_rows(ta, tb, a_ptr, x_ptr, u, N, K, SWIGLU, BN, KA, KB)


@triton.jit
def _rope_row(src, cos_sin, d, HEAD_DIM: tl.constexpr):
    """decode_attention._rope_row with the row loaded from L2 (`.cg`: written by other programs of this launch)."""
    half: tl.constexpr = HEAD_DIM // 2
    x = tl.load(src + d, cache_modifier=".cg").to(tl.float32)
    partner = tl.load(src + (d + half) % HEAD_DIM, cache_modifier=".cg").to(tl.float32)
    sin = tl.load(cos_sin + HEAD_DIM + d)
    return x * tl.load(cos_sin + d) + tl.where(d < half, -partner * sin, partner * sin)


@triton.jit
def _attention_unit(qkv_ptr, k_ptr, v_ptr, rope_ptr, acc_ptr, m_ptr, l_ptr, count_ptr, attn_ptr, head, split, active,
                    pos, start, stride_kh, stride_kn, scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, NUM_HEADS: tl.constexpr):
    """One (head, split) of decode attention with RoPE inside (decode_attention._split_kernel's ROPE path): the
    split's partials (acc [hd], m, l) into the workspace row head * NUM_SPLITS + split; the last of the head's
    `active` units to finish combines them into attn[head] (no phase of its own, as `_split_kernel`'s
    FUSED_REDUCE)."""
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
    tl.debug_barrier()  # every thread's stores are issued before the release below
    if tl.atomic_add(count_ptr + head, 1, sem="acq_rel", scope="gpu") == active - 1:
        _combine(acc_ptr, m_ptr, l_ptr, attn_ptr, head, start // SPLIT, pos // SPLIT + 1, HEAD_DIM, NUM_SPLITS, 16)
        tl.atomic_xchg(count_ptr + head, 0, sem="relaxed", scope="gpu")  # for the next layer (a barrier between)


@triton.jit
def _step_kernel(
    # weights: layer 0's tensor of each kind (the others at per-layer element offsets from it, `offs_ptr`)
    embed_ptr, wqkv_ptr, wo_ptr, wgu_ptr, wd_ptr, anorm_ptr, mnorm_ptr, bias_ptr, offs_ptr,
    # the step's inputs
    tok_ptr, pos_ptr, slot_ptr,
    # the KV cache (slot 0, layer 0's K; V at +v_off; a layer at +layer_stride, a slot at +slot_stride), RoPE table
    kv_ptr, v_off, layer_stride, slot_stride, stride_kh, stride_kn, rope_ptr,
    # workspace
    x_ptr, qkv_ptr, attn_ptr, gu_ptr, acc_ptr, m_ptr, l_ptr, count_ptr, sync_ptr,
    # sizes
    NQKV, eps, scale, window, LAYERS, H: tl.constexpr, I: tl.constexpr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, SLOTS: tl.constexpr,
    BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_DOWN: tl.constexpr,
    HA: tl.constexpr, HB: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, IA: tl.constexpr, IB: tl.constexpr,
    EMBED_BLOCK: tl.constexpr, INTERPRET: tl.constexpr, stamps_ptr=None, STAMPS: tl.constexpr = False,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    pos = tl.load(pos_ptr)
    if SLOTS:
        kv_ptr += tl.load(slot_ptr) * slot_stride
    start = tl.maximum(pos + 1 - window, 0)
    s_lo = start // SPLIT
    active = pos // SPLIT + 1 - s_lo  # splits holding keys [start, pos]
    q_size: tl.constexpr = NUM_HEADS * HEAD_DIM
    # the token's embedding row into the residual stream
    row = tl.load(tok_ptr)
    for c0 in range(pid * EMBED_BLOCK, H, P * EMBED_BLOCK):
        cols = c0 + tl.arange(0, EMBED_BLOCK)
        tl.store(x_ptr + cols, tl.load(embed_ptr + row * H + cols, mask=cols < H), mask=cols < H)
    _arrive(sync_ptr)
    # Each GEMV phase's first unit (unit pid) is loaded between this program's arrival at the barrier before the phase
    # and its wait there: the weights do not depend on the barrier, so their DRAM latency hides behind it.
    qa, qb = _tile(wqkv_ptr + tl.load(offs_ptr), pid, NQKV, H, BN_QKV, HA, HB)
    epoch = 1
    _wait(sync_ptr, epoch, INTERPRET)
    for layer in range(0, LAYERS):
        offs = offs_ptr + layer * 8
        k_ptr = kv_ptr + layer * layer_stride
        t = layer * 10
        _stamp(stamps_ptr, pid, t, STAMPS)
        _norm_phase(qa, qb, wqkv_ptr + tl.load(offs), x_ptr, anorm_ptr + tl.load(offs + 4),
                    bias_ptr + tl.load(offs + 6), qkv_ptr, pid, P, NQKV, H, eps, HAS_BIAS, BN_QKV, HA, HB)
        _stamp(stamps_ptr, pid, t + 1, STAMPS)
        _arrive(sync_ptr)
        epoch += 1
        _wait(sync_ptr, epoch, INTERPRET)
        _stamp(stamps_ptr, pid, t + 2, STAMPS)
        for u in range(pid, NUM_HEADS * active, P):
            _attention_unit(qkv_ptr, k_ptr, k_ptr + v_off, rope_ptr, acc_ptr, m_ptr, l_ptr, count_ptr, attn_ptr,
                            u // active, s_lo + u % active, active, pos, start, stride_kh, stride_kn, scale, GROUP,
                            HEAD_DIM, SPLIT, BLOCK, NUM_SPLITS, NUM_HEADS)
        _stamp(stamps_ptr, pid, t + 3, STAMPS)
        _arrive(sync_ptr)
        wo = wo_ptr + tl.load(offs + 1)
        oa, ob = _tile(wo, pid, H, q_size, BN_O, QA, QB)
        epoch += 1
        _wait(sync_ptr, epoch, INTERPRET)
        _stamp(stamps_ptr, pid, t + 4, STAMPS)
        _residual_phase(oa, ob, wo, attn_ptr, x_ptr, pid, P, H, q_size, False, BN_O, QA, QB)
        _stamp(stamps_ptr, pid, t + 5, STAMPS)
        _arrive(sync_ptr)
        wgu = wgu_ptr + tl.load(offs + 2)
        ga, gb = _tile(wgu, pid, 2 * I, H, BN_GU, HA, HB)
        epoch += 1
        _wait(sync_ptr, epoch, INTERPRET)
        _stamp(stamps_ptr, pid, t + 6, STAMPS)
        _norm_phase(ga, gb, wgu, x_ptr, mnorm_ptr + tl.load(offs + 5), bias_ptr, gu_ptr, pid, P, 2 * I, H, eps,
                    False, BN_GU, HA, HB)
        _stamp(stamps_ptr, pid, t + 7, STAMPS)
        _arrive(sync_ptr)
        wd = wd_ptr + tl.load(offs + 3)
        da, db = _tile(wd, pid, H, I, BN_DOWN, IA, IB)
        epoch += 1
        _wait(sync_ptr, epoch, INTERPRET)
        _stamp(stamps_ptr, pid, t + 8, STAMPS)
        _residual_phase(da, db, wd, gu_ptr, x_ptr, pid, P, H, I, True, BN_DOWN, IA, IB)
        _stamp(stamps_ptr, pid, t + 9, STAMPS)
        _arrive(sync_ptr)
        # the next layer's first qkv unit (none after the last layer: N = 0 loads nothing)
        nxt = tl.minimum(layer + 1, LAYERS - 1)
        qa, qb = _tile(wqkv_ptr + tl.load(offs_ptr + nxt * 8), pid, tl.where(layer + 1 < LAYERS, NQKV, 0), H,
                       BN_QKV, HA, HB)
        epoch += 1
        _wait(sync_ptr, epoch, INTERPRET)
    # the last program out zeroes the counters for the next launch (every program has passed every barrier)
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == P - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class PersistentConfig:
    """Launch shape: `per_sm` programs per SM (the grid is SMs x per_sm; all must be resident at once), `num_warps`
    each; a phase's rows a unit: the smallest power of two that covers the phase's rows in one round of the grid,
    capped at `max_rows`."""
    per_sm: int = 1
    num_warps: int = 4
    max_rows: int = 32
    split: int = 64  # attention positions per split


def rows_per_unit(n: int, programs: int, cap: int) -> int:
    """The smallest power of two >= n / programs (at least 1, at most `cap`)."""
    return max(1, min(cap, triton.next_power_of_2(triton.cdiv(n, programs))))


def pieces(k: int) -> tuple[int, int]:
    """K as the two tiles of `_tile`: (the largest power of two <= k, the rest rounded up to a power of two or 0)."""
    if k < 1:
        raise ValueError(f"a weight needs K >= 1, got {k}")
    first = 1 << (k.bit_length() - 1)
    return first, triton.next_power_of_2(k - first) if k > first else 0
