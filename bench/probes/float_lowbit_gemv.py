"""The first packed decode GEMVs (issue 10, until the split-K kernels of graph_executor/kernels/gemv_splitk.py
replaced them), kept as the float baseline the probes compare against. Batch-1 GEMVs over packed low-bit
weights (`graph_executor/quant/formats.py`: Int4Groups, Int8Groups), with the same fusions as the fp16 kernels
in `gemv.py`:

- `rmsnorm_gemv`:  out = W @ (rmsnorm(x) * norm_w) [+ bias]
- `gemv_residual`: x += W @ a
- `silu_gemv_residual`: x += W @ (silu(g) * u), [g, u] = gate_up

The codes are unpacked in registers and never dequantized one by one: a program owns BLOCK_N rows and walks K
in BLOCK_K chunks (a multiple of the group); per group it forms sum(q * a) and sum(a), and applies the scale
and offset once per group: sum over the group of (scale * q + offset) * a = scale * sum(q * a) + offset *
sum(a). Accumulation is float32. K must be a multiple of the group, not of BLOCK_K; N needs no multiple.

Int4: byte j of a row holds weights 2j (low nibble) and 2j + 1 (high nibble), so a program loads BLOCK_K / 2
contiguous bytes per row and the activation at even and odd positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv import GemvConfig
from graph_executor.quant.formats import INT4_ZERO, Int4Groups, Int8Groups

MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # the bits of float 2**23
MAGIC_F: tl.constexpr = tl.constexpr(8388608.0)

# Not tuned yet: a starting point for the GPU sweep (bench/probes/gpu_probe.py sweeps the fp16 kernels).
DEFAULT = GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=3)


@triton.jit
def _act(a_ptr, cols, ok, K, SWIGLU: tl.constexpr):
    """The activation at cols (float32): a, or silu(gate) * up with a = [gate (K), up (K)]."""
    a = tl.load(a_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.load(a_ptr + K + cols, mask=ok, other=0.0).to(tl.float32)
        a = a / (1.0 + tl.exp(-a)) * up
    return a


@triton.jit
def _group_terms(scale_ptr, offset_ptr, rows, row_ok, k0, K, qa, a_sum, HAS_OFFSET: tl.constexpr,
                 ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """scale * sum(q a) + offset * sum(a) per group of this K chunk: qa [BLOCK_N, NG], a_sum [NG] -> [BLOCK_N, NG].
    Groups past K load scale 0 (their q and a are masked to 0 as well)."""
    NG: tl.constexpr = BLOCK_K // GROUP
    groups = k0 // GROUP + tl.arange(0, NG)
    mask = row_ok[:, None] & (groups < K // GROUP)[None, :]
    at = rows[:, None] * (K // GROUP) + groups[None, :]
    s = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        o = tl.load(offset_ptr + at, mask=mask, other=0.0).to(tl.float32)
        return s * qa + o * a_sum[None, :]
    else:
        return s * (qa - ZERO * a_sum[None, :])


@triton.jit
def _codes(codes_ptr, rows, row_ok, k0, K, INT4: tl.constexpr, BLOCK_K: tl.constexpr):
    """The codes of chunk k0: uint8 [BLOCK_N, BLOCK_K / 2] (int4) or int8 [BLOCK_N, BLOCK_K]; zeros past K (a
    masked load moves no data, so the prefetch past the last chunk is free)."""
    if INT4:
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        return tl.load(codes_ptr + rows[:, None] * (K // 2) + half[None, :],
                       mask=row_ok[:, None] & (half < K // 2)[None, :], other=0)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        return tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :],
                       other=0)


@triton.jit
def _int4_chunk(b, scale_ptr, offset_ptr, rows, row_ok, k0, K, a_even, a_odd, HAS_OFFSET: tl.constexpr,
                ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K chunk of Int4Groups rows (its codes b, uint8 [BLOCK_N, BLOCK_K / 2]) times the activation
    (even and odd positions, [BLOCK_K / 2] each)."""
    NG: tl.constexpr = BLOCK_K // GROUP
    bi = b.to(tl.int32)
    # nibble | bits of 2**23 reads as the float 2**23 + nibble: no int->float convert (I2F is a slow pipe)
    lo = ((bi & 0xF) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
    hi = ((bi >> 4) | MAGIC).to(tl.float32, bitcast=True) - MAGIC_F
    qa = lo * a_even[None, :] + hi * a_odd[None, :]
    qa = tl.sum(tl.reshape(qa, [BLOCK_N, NG, GROUP // 2]), axis=2)  # [BLOCK_N, NG]
    a_sum = tl.sum(tl.reshape(a_even + a_odd, [NG, GROUP // 2]), axis=1)  # [NG]
    return _group_terms(scale_ptr, offset_ptr, rows, row_ok, k0, K, qa, a_sum, HAS_OFFSET, ZERO, GROUP, BLOCK_K)


@triton.jit
def _int8_chunk(q, scale_ptr, offset_ptr, rows, row_ok, k0, K, a, HAS_OFFSET: tl.constexpr,
                GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One BLOCK_K chunk of Int8Groups rows (its codes q, int8 [BLOCK_N, BLOCK_K]) times the activation a."""
    NG: tl.constexpr = BLOCK_K // GROUP
    # two's complement byte ^ 0x80 = q + 128, or'ed into the bits of 2**23 (one LOP3): no int->float convert
    qf = ((q.to(tl.int32) & 0xFF) ^ (MAGIC | 0x80)).to(tl.float32, bitcast=True) - (MAGIC_F + 128.0)
    qa = tl.sum(tl.reshape(qf * a[None, :], [BLOCK_N, NG, GROUP]), axis=2)  # [BLOCK_N, NG]
    a_sum = tl.sum(tl.reshape(a, [NG, GROUP]), axis=1)
    return _group_terms(scale_ptr, offset_ptr, rows, row_ok, k0, K, qa, a_sum, HAS_OFFSET, 0.0, GROUP, BLOCK_K)


@triton.jit
def _rmsnorm_gemv_lowbit_kernel(codes_ptr, scale_ptr, offset_ptr, x_ptr, nw_ptr, b_ptr, out_ptr, N, K, eps,
                                INT4: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr,
                                HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N * K may pass 2**31
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], dtype=tl.float32)
    ss = tl.zeros([1], dtype=tl.float32)
    codes = _codes(codes_ptr, rows, row_ok, 0, K, INT4, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if INT4:
            # the next chunk's codes are requested before this one is used: two chunks in flight per program
            # (plain loads are not software-pipelined by num_stages; at 4 bits a chunk is half an fp16 one's
            # bytes). Measured on the H200: int4 +5% over its four projections; int8 -10%, so int8 loads in place.
            b = codes
            codes = _codes(codes_ptr, rows, row_ok, k0 + BLOCK_K, K, INT4, BLOCK_K)
        else:
            b = _codes(codes_ptr, rows, row_ok, k0, K, INT4, BLOCK_K)
        if INT4:
            even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            ok = even < K  # K is even (a multiple of the group), so even < K implies even + 1 < K
            xe = _act(x_ptr, even, ok, K, False)
            xo = _act(x_ptr, even + 1, ok, K, False)
            ss += tl.sum(xe * xe + xo * xo, axis=0)
            ae = xe * tl.load(nw_ptr + even, mask=ok, other=0.0).to(tl.float32)
            ao = xo * tl.load(nw_ptr + even + 1, mask=ok, other=0.0).to(tl.float32)
            acc += _int4_chunk(b, scale_ptr, offset_ptr, rows, row_ok, k0, K, ae, ao, HAS_OFFSET, ZERO,
                               GROUP, BLOCK_N, BLOCK_K)
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            ok = cols < K
            x = _act(x_ptr, cols, ok, K, False)
            ss += tl.sum(x * x, axis=0)
            a = x * tl.load(nw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            acc += _int8_chunk(b, scale_ptr, offset_ptr, rows, row_ok, k0, K, a, HAS_OFFSET, GROUP,
                               BLOCK_N, BLOCK_K)
    # rmsnorm(x) * nw = (x * nw) / rms(x): the 1 / rms factor is common to every row, applied once at the end
    inv_rms = 1.0 / tl.sqrt(ss / K + eps)  # [1]
    out = tl.sum(acc, axis=1) * inv_rms
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_residual_lowbit_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, x_ptr, N, K, INT4: tl.constexpr,
                                 HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, SWIGLU: tl.constexpr,
                                 GROUP: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], dtype=tl.float32)
    codes = _codes(codes_ptr, rows, row_ok, 0, K, INT4, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if INT4:  # int4 prefetches the next chunk, as in the kernel above
            b = codes
            codes = _codes(codes_ptr, rows, row_ok, k0 + BLOCK_K, K, INT4, BLOCK_K)
        else:
            b = _codes(codes_ptr, rows, row_ok, k0, K, INT4, BLOCK_K)
        if INT4:
            even = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            ok = even < K
            ae = _act(a_ptr, even, ok, K, SWIGLU)
            ao = _act(a_ptr, even + 1, ok, K, SWIGLU)
            acc += _int4_chunk(b, scale_ptr, offset_ptr, rows, row_ok, k0, K, ae, ao, HAS_OFFSET, ZERO,
                               GROUP, BLOCK_N, BLOCK_K)
        else:
            cols = k0 + tl.arange(0, BLOCK_K)
            a = _act(a_ptr, cols, cols < K, K, SWIGLU)
            acc += _int8_chunk(b, scale_ptr, offset_ptr, rows, row_ok, k0, K, a, HAS_OFFSET, GROUP,
                               BLOCK_N, BLOCK_K)
    residual = tl.load(x_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + rows, (residual + tl.sum(acc, axis=1)).to(x_ptr.dtype.element_ty), mask=row_ok)


def _check(w: Int4Groups | Int8Groups, cfg: GemvConfig, vectors: dict[str, tuple[torch.Tensor, int]]) -> None:
    if not isinstance(w, (Int4Groups, Int8Groups)):
        raise ValueError(f"expected Int4Groups or Int8Groups weights, got {type(w).__name__}")
    if cfg.block_k % w.group:
        raise ValueError(f"block_k {cfg.block_k} is not a multiple of the weight's group ({w.group})")
    for name, (t, size) in vectors.items():
        if t.dim() != 1 or t.numel() != size or not t.is_contiguous() or t.device != w.device:
            raise ValueError(f"{name}: expected a contiguous [{size}] tensor on {w.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


def _weights(w: Int4Groups | Int8Groups) -> tuple:
    """The kernel's pointer arguments and the format's constexprs."""
    int4 = isinstance(w, Int4Groups)
    offset = w.offset if w.offset is not None else w.scale  # unused when HAS_OFFSET is False
    # without an offset, value = scale * (q - ZERO): Int4Groups' symmetric codes are centred on 8
    zero = float(INT4_ZERO) if int4 and w.offset is None else 0.0
    return (w.codes, w.scale, offset), dict(INT4=int4, HAS_OFFSET=w.offset is not None, ZERO=zero, GROUP=w.group)


def _launch(cfg: GemvConfig) -> dict:
    return dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def rmsnorm_gemv(w: Int4Groups | Int8Groups, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 bias: torch.Tensor | None = None, cfg: GemvConfig = DEFAULT) -> torch.Tensor:
    """w [N, K] packed, x [K], norm_w [K], bias [N] or None -> out [N] = W @ (rmsnorm(x) * norm_w) [+ bias]."""
    n, k = w.shape
    vectors = dict(x=(x, k), norm_w=(norm_w, k), out=(out, n))
    if bias is not None:
        vectors["bias"] = (bias, n)
    _check(w, cfg, vectors)
    ptrs, fmt = _weights(w)
    _rmsnorm_gemv_lowbit_kernel[(triton.cdiv(n, cfg.block_n),)](
        *ptrs, x, norm_w, bias if bias is not None else out, out, n, k, eps, HAS_BIAS=bias is not None, **fmt,
        **_launch(cfg))
    return out


def gemv_residual(w: Int4Groups | Int8Groups, a: torch.Tensor, x: torch.Tensor,
                  cfg: GemvConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ a [K], in place."""
    n, k = w.shape
    _check(w, cfg, dict(a=(a, k), x=(x, n)))
    ptrs, fmt = _weights(w)
    _gemv_residual_lowbit_kernel[(triton.cdiv(n, cfg.block_n),)](*ptrs, a, x, n, k, SWIGLU=False, **fmt,
                                                                 **_launch(cfg))
    return x


def silu_gemv_residual(w: Int4Groups | Int8Groups, gate_up: torch.Tensor, x: torch.Tensor,
                       cfg: GemvConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ (silu(gate_up[:K]) * gate_up[K:]), in place."""
    n, k = w.shape
    _check(w, cfg, dict(gate_up=(gate_up, 2 * k), x=(x, n)))
    ptrs, fmt = _weights(w)
    _gemv_residual_lowbit_kernel[(triton.cdiv(n, cfg.block_n),)](*ptrs, gate_up, x, n, k, SWIGLU=True, **fmt,
                                                                 **_launch(cfg))
    return x
