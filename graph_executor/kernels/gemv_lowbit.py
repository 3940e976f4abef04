"""Batch-1 GEMVs over packed low-bit weights (`graph_executor/quant/formats.py`: Int4Groups, Int8Groups), with
the same fusions as the fp16 kernels in `gemv.py`:

- `rmsnorm_gemv`:  out = W @ (rmsnorm(x) * norm_w) [+ bias]
- `gemv_residual`: x += W @ a
- `silu_gemv_residual`: x += W @ (silu(g) * u), [g, u] = gate_up

The codes are unpacked in registers and never dequantized one by one: a program owns BLOCK_N rows and walks K
in chunks of BLOCK_K codes, read as 32-bit words; per word it forms sum(q * a) and sum(a) over the word's codes
and applies its group's scale and offset once: sum of (scale * q + offset) * a = scale * sum(q * a) + offset *
sum(a). Accumulation is float32. K must be a multiple of the group, not of BLOCK_K; N needs no multiple.

Int4: byte b of a row holds weights 2b (low nibble) and 2b + 1 (high nibble), so nibble j of 32-bit word w
(little-endian) is weight 8w + j; int8: byte j of word w is weight 4w + j.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv import GemvConfig
from graph_executor.quant.formats import INT4_ZERO, Int4Groups, Int8Groups

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


# Codes are read as 32-bit words (8 int4 or 4 int8 codes) and turned into floats without an int->float convert
# (I2F issues at a fraction of the FMA rate and bound the first version of these kernels at ~1.2 TB/s): a code
# c < 2**8 or'ed into the bits of 2**23 reads as the float 2**23 + c, and one subtraction leaves c. A weight
# then costs a shift, a LOP3 (mask and magic in one), an FADD and the FMA.
MAGIC: tl.constexpr = tl.constexpr(0x4B000000)  # the bits of float 2**23
MAGIC_F: tl.constexpr = tl.constexpr(8388608.0)


@triton.jit
def _word_terms(words, j: tl.constexpr, BITS: tl.constexpr):
    """Code j of each 32-bit word as float32: int4 codes 0..15; int8 codes -128..127 (stored two's complement:
    the xor with 0x80 biases them to 0..255 in the same LOP3)."""
    if BITS == 4:
        bits = ((words >> (4 * j)) & 0xF) | MAGIC
        return bits.to(tl.float32, bitcast=True) - MAGIC_F
    else:
        bits = ((words >> (8 * j)) & 0xFF) ^ (MAGIC | 0x80)
        return bits.to(tl.float32, bitcast=True) - (MAGIC_F + 128.0)


@triton.jit
def _chunk(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, w0, K, a_ptr, x_ptr, nw_ptr, ss,
           RMSNORM: tl.constexpr, SWIGLU: tl.constexpr, BITS: tl.constexpr, HAS_OFFSET: tl.constexpr,
           ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_W: tl.constexpr):
    """One chunk of BLOCK_W words per row: returns (the chunk's [BLOCK_N, BLOCK_W] contribution, ss).

    Per word: qa = sum_j q_j a_j over its PER codes, then scale * qa + offset * sum_j a_j with the word's group
    scale and offset (a group holds whole words: GROUP >= 8 int4 / 4 int8 codes)."""
    PER: tl.constexpr = 32 // BITS  # codes per word
    KW = K // PER  # words per row
    wcols = w0 + tl.arange(0, BLOCK_W)
    wok = wcols < KW
    words = tl.load(codes_ptr + rows[:, None] * KW + wcols[None, :], mask=row_ok[:, None] & wok[None, :],
                    other=0)  # int32 [BLOCK_N, BLOCK_W]
    qa = tl.zeros(words.shape, dtype=tl.float32)
    a_sum = tl.zeros([BLOCK_W], dtype=tl.float32)
    for j in tl.static_range(PER):
        cols = wcols * PER + j
        if RMSNORM:
            x = tl.load(x_ptr + cols, mask=wok, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=0)
            a = x * tl.load(nw_ptr + cols, mask=wok, other=0.0).to(tl.float32)
        else:
            a = _act(a_ptr, cols, wok, K, SWIGLU)
        qa += _word_terms(words, j, BITS) * a[None, :]
        a_sum += a
    at = rows[:, None] * (K // GROUP) + (wcols * PER // GROUP)[None, :]  # the word's group
    mask = row_ok[:, None] & wok[None, :]
    s = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        o = tl.load(offset_ptr + at, mask=mask, other=0.0).to(tl.float32)
        return s * qa + o * a_sum[None, :], ss
    else:
        return s * (qa - ZERO * a_sum[None, :]), ss


@triton.jit
def _rmsnorm_gemv_lowbit_kernel(codes_ptr, scale_ptr, offset_ptr, x_ptr, nw_ptr, b_ptr, out_ptr, N, K, eps,
                                BITS: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr,
                                HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_W: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N * K may pass 2**31
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    ss = tl.zeros([1], dtype=tl.float32)
    for w0 in range(0, K // (32 // BITS), BLOCK_W):
        part, ss = _chunk(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, w0, K, x_ptr, x_ptr, nw_ptr, ss, True,
                          False, BITS, HAS_OFFSET, ZERO, GROUP, BLOCK_W)
        acc += part
    # rmsnorm(x) * nw = (x * nw) / rms(x): the 1 / rms factor is common to every row, applied once at the end
    inv_rms = 1.0 / tl.sqrt(ss / K + eps)  # [1]
    out = tl.sum(acc, axis=1) * inv_rms
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_residual_lowbit_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, x_ptr, N, K, BITS: tl.constexpr,
                                 HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, SWIGLU: tl.constexpr,
                                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    ss = tl.zeros([1], dtype=tl.float32)  # unused here
    for w0 in range(0, K // (32 // BITS), BLOCK_W):
        part, ss = _chunk(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, w0, K, a_ptr, a_ptr, a_ptr, ss, False,
                          SWIGLU, BITS, HAS_OFFSET, ZERO, GROUP, BLOCK_W)
        acc += part
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
    """The kernel's pointer arguments (codes as 32-bit words) and the format's constexprs."""
    int4 = isinstance(w, Int4Groups)
    offset = w.offset if w.offset is not None else w.scale  # unused when HAS_OFFSET is False
    # without an offset, value = scale * (q - ZERO): Int4Groups' symmetric codes are centred on 8
    zero = float(INT4_ZERO) if int4 and w.offset is None else 0.0
    words = w.codes.view(torch.int32)  # [N, K / 8] (int4) or [N, K / 4] (int8): rows hold whole groups
    return (words, w.scale, offset), dict(BITS=4 if int4 else 8, HAS_OFFSET=w.offset is not None, ZERO=zero,
                                          GROUP=w.group)


def _launch(cfg: GemvConfig, w: Int4Groups | Int8Groups) -> dict:
    per_word = 8 if isinstance(w, Int4Groups) else 4
    return dict(BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_k // per_word, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


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
        **_launch(cfg, w))
    return out


def gemv_residual(w: Int4Groups | Int8Groups, a: torch.Tensor, x: torch.Tensor,
                  cfg: GemvConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ a [K], in place."""
    n, k = w.shape
    _check(w, cfg, dict(a=(a, k), x=(x, n)))
    ptrs, fmt = _weights(w)
    _gemv_residual_lowbit_kernel[(triton.cdiv(n, cfg.block_n),)](*ptrs, a, x, n, k, SWIGLU=False, **fmt,
                                                                 **_launch(cfg, w))
    return x


def silu_gemv_residual(w: Int4Groups | Int8Groups, gate_up: torch.Tensor, x: torch.Tensor,
                       cfg: GemvConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ (silu(gate_up[:K]) * gate_up[K:]), in place."""
    n, k = w.shape
    _check(w, cfg, dict(gate_up=(gate_up, 2 * k), x=(x, n)))
    ptrs, fmt = _weights(w)
    _gemv_residual_lowbit_kernel[(triton.cdiv(n, cfg.block_n),)](*ptrs, gate_up, x, n, k, SWIGLU=True, **fmt,
                                                                 **_launch(cfg, w))
    return x
