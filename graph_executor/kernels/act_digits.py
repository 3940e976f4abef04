"""The packed split-K GEMVs' activation operand (gemv_splitk, and the probes that reuse its arithmetic).

Every program of a split-K int4/int8 GEMV turns its K slice of the activation into two int8 digits per weight,
a ~= d (hi + lo / 256) with d = max|a| / 127 per group of 32 (or the weight group where smaller), packs them four
to a word in the order its dp4a calls read them (int4 codes: four words per 8 activations, hi of the even
positions, hi of the odd, lo even, lo odd; int8: two per 4, hi and lo), and sums each weight group of the
activation (the offset term).
"""

from __future__ import annotations

import triton
import triton.language as tl


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
