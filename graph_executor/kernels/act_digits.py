"""The packed split-K GEMVs' activation operand, made once by the kernel that writes the activation.

Every program of a split-K int4/int8 GEMV (gemv_splitk) turns its K slice of the activation into two int8 digits per
weight, a ~= d (hi + lo / 256) with d = max|a| / 127 per group of 32, packs them four to a word in the order its
dp4a calls read them, and sums each weight group of the activation (the offset term); for RMSNorm it also sums the
slice's squares. N / BLOCK_N row blocks do that for the same slice, about as many instructions as their dp4a loop
(bench/NOTES.md, twenty-second session). A kernel of its own for it cost more in launches than it saved (twenty-third
session); here the residual's split-K reduce kernel (`gemv_splitk._reduce_kernel`, writing x after o_proj or
down_proj) writes them for the GEMV that reads x next (gate_up_proj, the next layer's qkv_proj, the lm_head), beside
x: same arithmetic, so the same digits, group sums and maxima as the GEMV would form; the sum of squares comes per
reduce program (REDUCE_BLOCK rows) and the GEMV adds the ones of its slice (another order: float32 rounding apart).

`ActDigits` holds them for one consumer format: int4 codes read four words per 8 activations (hi of the even
positions, hi of the odd, lo even, lo odd), int8 two per 4 (hi, lo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

REDUCE_BLOCK = 256  # rows a split-K reduce program adds up (gemv_splitk), so one sum of squares per this many
_REDUCE_BLOCK = tl.constexpr(REDUCE_BLOCK)  # the same inside kernels (which read only constexpr globals)


@dataclass(frozen=True)
class ActDigits:
    """Digits of a [k] activation for GEMVs over int4 (`int4`) or int8 codes in weight groups of `group`."""

    words: torch.Tensor  # int32 [k // 2]: the packed digits, in the consumer's dp4a order
    amax: torch.Tensor  # float32 [k // qgroup]: max |a| per quantization group (32, or the weight group if smaller)
    sums: torch.Tensor  # float32 [k // group]: sum of a per weight group
    sumsq: torch.Tensor  # float32 [cdiv(k, REDUCE_BLOCK)]: sum of the raw activation's squares per reduce block
    int4: bool
    group: int

    @property
    def k(self) -> int:
        return 2 * self.words.numel()

    @property
    def qgroup(self) -> int:
        return min(32, self.group)

    @staticmethod
    def possible(k: int, group: int) -> bool:
        """Whether digits of a [k] activation for weight groups of `group` can be held (`allocate` refuses others)."""
        return k % 32 == 0 and group in (16, 32)

    @staticmethod
    def allocate(k: int, int4: bool, group: int, device: torch.device) -> ActDigits:
        if not ActDigits.possible(k, group):
            raise ValueError(f"activation digits: k {k} must be whole groups of 32 (weight group {group}: 16 or 32)")
        qgroup = min(32, group)

        def zeros(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(n, device=device, dtype=dtype)

        return ActDigits(zeros(k // 2, torch.int32), zeros(k // qgroup, torch.float32),
                         zeros(k // group, torch.float32), zeros(triton.cdiv(k, REDUCE_BLOCK), torch.float32),
                         int4, group)

    def serves(self, int4: bool, group: int, k: int, slice_len: int) -> bool:
        """Whether a GEMV over k inputs in these codes and groups, reading slices of slice_len activations, can take
        these digits: same format and size, and its slices whole reduce blocks (its sum of squares is theirs)."""
        return self.int4 == int4 and self.group == group and self.k == k and slice_len % REDUCE_BLOCK == 0


@triton.jit
def digits(a, QGROUP: tl.constexpr, GROUP: tl.constexpr):
    """a float32 [L] (L whole groups) -> (hi, lo) float32 [L // QGROUP, QGROUP] with a ~= d (hi + lo / 256), the
    groups' max |a| [L // QGROUP] and sums [L // GROUP]: what the split-K GEMVs form (error <= d / 512)."""
    L: tl.constexpr = a.shape[0]
    a_sum = tl.sum(tl.reshape(a, [L // GROUP, GROUP]), axis=1)
    a = tl.reshape(a, [L // QGROUP, QGROUP])
    amax = tl.max(tl.abs(a), axis=1)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    hi = tl.floor(a * inv[:, None] + 0.5)  # -127..127
    lo = tl.minimum(tl.maximum(tl.floor((a * inv[:, None] - hi) * 256.0 + 0.5), -127.0), 127.0)
    return hi, lo, amax, a_sum


@triton.jit
def pack_bytes(q, shifts):
    """int32 [..., 4] values in -127..127 -> int8x4 words [...] (disjoint bytes: the sum is an or)."""
    return tl.sum((q & 0xFF) << shifts, axis=1)


@triton.jit
def digit_words(hi, lo, INT4: tl.constexpr):
    """(hi, lo) [L // QGROUP, QGROUP] -> the words a GEMV over int4 codes reads, [L // 8] each: (hi of the even
    positions 8w + 2j, hi odd, lo even, lo odd), or over int8 codes [L // 4] each: (hi, hi, lo, lo)."""
    L: tl.constexpr = hi.shape[0] * hi.shape[1]
    shifts = (tl.arange(0, 4) * 8)[None, :]
    if INT4:
        hi_even, hi_odd = tl.split(tl.reshape(hi.to(tl.int32), [L // 8, 4, 2]))
        lo_even, lo_odd = tl.split(tl.reshape(lo.to(tl.int32), [L // 8, 4, 2]))
        return (pack_bytes(hi_even, shifts), pack_bytes(hi_odd, shifts), pack_bytes(lo_even, shifts),
                pack_bytes(lo_odd, shifts))
    else:
        w_hi = pack_bytes(tl.reshape(hi.to(tl.int32), [L // 4, 4]), shifts)
        w_lo = pack_bytes(tl.reshape(lo.to(tl.int32), [L // 4, 4]), shifts)
        return w_hi, w_hi, w_lo, w_lo  # (w0, w2) = (hi, lo), as for int4


@triton.jit
def write_digits(v, rows, row_ok, nw_ptr, words_ptr, amax_ptr, sums_ptr, sumsq_ptr, N, INT4: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """A reduce program's end: v float32 [BLOCK] = x[rows] as stored (rows a whole REDUCE_BLOCK-aligned block of x's
    N) -> the digits of x[rows] * nw[rows] for the GEMV that reads x next, its groups' maxima and sums, and the
    block's sum of x^2."""
    QGROUP: tl.constexpr = 32 if GROUP > 32 else GROUP
    block = tl.program_id(0)
    v = tl.where(row_ok, v, 0.0)
    tl.store(sumsq_ptr + block, tl.sum(v * v, axis=0))
    a = v * tl.load(nw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    hi, lo, amax, a_sum = digits(a, QGROUP, GROUP)
    w0, w1, w2, w3 = digit_words(hi, lo, INT4)
    if INT4:  # [BLOCK // 8, 4] in the order (hi even, hi odd, lo even, lo odd)
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK // 2])
    else:  # [BLOCK // 4, 2]: (hi, lo)
        words = tl.reshape(tl.join(w0, w2), [BLOCK // 2])
    at = block * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    tl.store(words_ptr + at, words, mask=at < N // 2)
    at = block * (BLOCK // QGROUP) + tl.arange(0, BLOCK // QGROUP)
    tl.store(amax_ptr + at, amax, mask=at < N // QGROUP)
    at = block * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
    tl.store(sums_ptr + at, a_sum, mask=at < N // GROUP)


@triton.jit
def read_digits(words_ptr, amax_ptr, sums_ptr, sumsq_ptr, pid_k, K, BLOCK_KW: tl.constexpr, INT4: tl.constexpr,
                GROUP: tl.constexpr, MODE: tl.constexpr):
    """A split-K GEMV program's K slice (BLOCK_KW words of codes) of what `write_digits` wrote: the four digit word
    vectors [BLOCK_KW] (int8: hi, hi, lo, lo), max |a| per quantization group, the sums per weight group, and (MODE 0)
    the slice's sum of x^2."""
    EPW: tl.constexpr = 8 if INT4 else 4
    QGROUP: tl.constexpr = 32 if GROUP > 32 else GROUP
    NQ: tl.constexpr = BLOCK_KW * EPW // QGROUP
    NG: tl.constexpr = BLOCK_KW * EPW // GROUP
    NB: tl.constexpr = BLOCK_KW * EPW // _REDUCE_BLOCK
    KW = K // EPW
    kws = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    if INT4:
        w = tl.load(words_ptr + kws[:, None] * 4 + tl.arange(0, 4)[None, :], mask=(kws < KW)[:, None], other=0)
        first, second = tl.split(tl.reshape(w, [BLOCK_KW, 2, 2]))  # (hi even, lo even), (hi odd, lo odd)
        w0, w2 = tl.split(first)
        w1, w3 = tl.split(second)
    else:
        w = tl.load(words_ptr + kws[:, None] * 2 + tl.arange(0, 2)[None, :], mask=(kws < KW)[:, None], other=0)
        w0, w2 = tl.split(w)  # (hi, lo)
        w1, w3 = w0, w2
    q = pid_k * NQ + tl.arange(0, NQ)
    amax = tl.load(amax_ptr + q, mask=q < K // QGROUP, other=0.0)
    g = pid_k * NG + tl.arange(0, NG)
    a_sum = tl.load(sums_ptr + g, mask=g < K // GROUP, other=0.0)
    ss = 0.0
    if MODE == 0:
        b = pid_k * NB + tl.arange(0, NB)
        ss = tl.sum(tl.load(sumsq_ptr + b, mask=b < tl.cdiv(K, _REDUCE_BLOCK), other=0.0), axis=0)
    return w0, w1, w2, w3, amax, a_sum, ss
