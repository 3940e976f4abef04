"""Prefill GEMM over packed int4 / int8 weights on the integer tensor cores: out = x @ W^T [+ bias], or
out += x @ W^T.

Why: `gemm_lowbit.gemm` turns every weight into the activation's float type in registers before its `tl.dot`;
at 16-64 tokens that conversion, not the weights' bytes, sets its speed (LLaMA-2-7B int4 qkv 0.8-0.9 TB/s on an
H200, slower than fp16 cuBLAS reading four times the bytes: bench/NOTES.md). Here the codes go to the tensor
cores as they are (int8, or int4 codes 0..15 widened to int8) and the activation comes as two int8 digits per
element, as in the decode GEMVs (kernels/gemv_splitk.py): per token and group of GROUP columns,
x ~= d (hi + lo / 256) with d = max|x| / 127 over the group, |error| <= d / 512 (d / 256 where lo
saturates at 127). Then per group

    sum_k w_k x_k = scale d (256 dot(q, hi) + dot(q, lo)) / 256 + offset sum_k x_k

(symmetric int4: offset = -8 scale; symmetric int8: none): two int8 dots into int32 (no overflow: |256 dot(q, hi)
+ dot(q, lo)| <= 257 x 128 x 128 x 127 < 2**31 for groups up to 128), one float multiply-add per output and group,
sum(x) exact from the digit pass.
`digits` writes hi, lo, d / 256 and the group sums once per prompt (one small kernel); the GEMM splits K over the
grid as gemm_lowbit does (partials into a SplitKScratch, `gemm_lowbit._gemm_reduce_kernel` adds them in order and
applies the bias and the residual add).

Groups must be a multiple of 32 (the int8 dot's K); other packed weights (groups of 16, FP8) take gemm_lowbit.
CUDA-graph safe: no host sync; `gemm` allocates nothing when given its `DigitsScratch` and SplitKScratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemm_lowbit import ACT_DTYPES, _gemm_reduce_kernel
from graph_executor.kernels.gemv_splitk import SplitKScratch, tile_offsets
from graph_executor.quant.formats import INT4_ZERO, Int4Groups, Int8Groups


@dataclass(frozen=True)
class DigitsConfig:
    block_n: int = 64  # weight rows (output columns) per program: the tensor core's M
    block_t: int = 16  # tokens per program: its N
    groups: int = 4  # weight groups per loop step (their loads issued together)
    split: int = 1  # programs along K (at most): > 1 sums partials in a SplitKScratch
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_n", "block_t", "groups"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1) or (name != "groups" and v < 16):
                raise ValueError(f"DigitsConfig: {name} {v} is not a power of two (>= 16 for the blocks)")
        if self.split < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"DigitsConfig: split, num_warps and num_stages must be >= 1, got {self}")


def supported(w: object) -> bool:
    """Whether `gemm` takes this weight: int4 or int8 groups of a multiple of 32 (the int8 dot's K) up to 128."""
    return isinstance(w, (Int4Groups, Int8Groups)) and w.group % 32 == 0 and w.group <= 128


def default_config(tokens: int, n: int, k: int) -> DigitsConfig:
    """64 rows, T rounded up to a power of two (16..64) tokens a program, K split until ~2 programs an SM's worth
    (at most 8 ways, whole loop steps)."""
    block_t = min(64, max(16, triton.next_power_of_2(tokens)))
    tiles = triton.cdiv(n, 64) * triton.cdiv(tokens, block_t)
    split = 1
    while split < 8 and tiles * split * 2 <= 1024 and split * 2 * 4 * 32 <= k:
        split *= 2
    return DigitsConfig(block_n=64, block_t=block_t, split=split)


@dataclass(frozen=True)
class DigitsScratch:
    """A prompt's activation as two int8 digits a column (`digits`): hi, lo [T, K] int8; dd [T, G] float32 (each
    group's d / 256); xs [T, G] float32 (each group's exact sum, for the offsets)."""

    hi: torch.Tensor
    lo: torch.Tensor
    dd: torch.Tensor
    xs: torch.Tensor

    @staticmethod
    def allocate(tokens: int, k: int, group: int, device: torch.device) -> DigitsScratch:
        g = k // group
        return DigitsScratch(torch.empty(tokens, k, dtype=torch.int8, device=device),
                             torch.empty(tokens, k, dtype=torch.int8, device=device),
                             torch.empty(tokens, g, device=device), torch.empty(tokens, g, device=device))

    def fits(self, tokens: int, k: int, group: int) -> bool:
        return self.hi.shape[0] >= tokens and self.hi.shape[1] == k and self.dd.shape[1] == k // group


@triton.jit
def _digits_kernel(x_ptr, hi_ptr, lo_ptr, dd_ptr, xs_ptr, K, G, stride_xm, GROUP: tl.constexpr,
                   BLOCK_G: tl.constexpr):
    """Program (t, b): token t's groups b * BLOCK_G.. as two int8 digits each (module docstring)."""
    t = tl.program_id(0)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = groups < G
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK_G, GROUP]
    x = tl.load(x_ptr + t * stride_xm + cols, mask=g_ok[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    hi = tl.floor(x * inv[:, None] + 0.5)  # -127..127
    lo = tl.minimum(tl.maximum(tl.floor((x * inv[:, None] - hi) * 256.0 + 0.5), -127.0), 127.0)
    tl.store(hi_ptr + t * K + cols, hi.to(tl.int8), mask=g_ok[:, None])
    tl.store(lo_ptr + t * K + cols, lo.to(tl.int8), mask=g_ok[:, None])
    tl.store(dd_ptr + t * G + groups, amax / (127.0 * 256.0), mask=g_ok)
    tl.store(xs_ptr + t * G + groups, tl.sum(x, axis=1), mask=g_ok)


def digits(x: torch.Tensor, group: int, scratch: DigitsScratch) -> DigitsScratch:
    """x [T, K] -> scratch's first T rows (module docstring)."""
    t, k = x.shape
    g = k // group
    block_g = min(triton.next_power_of_2(g), max(1, 1024 // group))
    _digits_kernel[(t, triton.cdiv(g, block_g))](x, scratch.hi, scratch.lo, scratch.dd, scratch.xs, k, g,
                                                 x.stride(0), GROUP=group, BLOCK_G=block_g, num_warps=4)
    return scratch


@triton.jit
def _group_codes(codes_ptr, rows, row_ok, g, K, INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                 TILE_N: tl.constexpr, TILE_KW: tl.constexpr):
    """Group g's codes of `rows` as int8 [BLOCK_N, GROUP] in column order (int4: 0..15); 0 past K."""
    if INT4:  # byte j of a row holds weights 2j (low nibble) and 2j + 1 (high nibble)
        half = g * (GROUP // 2) + tl.arange(0, GROUP // 2)
        if TILE_N > 0:
            at = tile_offsets(rows, half, K // 2, TILE_N, 4 * TILE_KW)
        else:
            at = rows[:, None] * (K // 2) + half[None, :]
        b = tl.load(codes_ptr + at, mask=row_ok[:, None] & (half < K // 2)[None, :], other=0)  # uint8 [N, GROUP / 2]
        q = tl.interleave(b & 0xF, b >> 4).to(tl.int8)
    else:
        cols = g * GROUP + tl.arange(0, GROUP)
        if TILE_N > 0:
            at = tile_offsets(rows, cols, K, TILE_N, 4 * TILE_KW)
        else:
            at = rows[:, None] * K + cols[None, :]
        q = tl.load(codes_ptr + at, mask=row_ok[:, None] & (cols < K)[None, :], other=0)
    return q


@triton.jit
def _gemm_digits_kernel(hi_ptr, lo_ptr, dd_ptr, xs_ptr, codes_ptr, scale_ptr, offset_ptr, b_ptr, out_ptr, part_ptr,
                        M, N, K, G, G_SPLIT, stride_om, INT4: tl.constexpr, HAS_OFFSET: tl.constexpr,
                        ZERO: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                        SPLITTING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                        GROUPS: tl.constexpr, TILE_N: tl.constexpr, TILE_KW: tl.constexpr):
    """Program (n, t, s): weight rows n * BLOCK_N.., tokens t * BLOCK_T.., groups s * G_SPLIT.. (G_SPLIT a
    multiple of GROUPS); acc [BLOCK_N, BLOCK_T] float32 (module docstring's sum)."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N * K may pass 2**31
    row_ok = rows < N
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < M
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    g_lo = pid_k * G_SPLIT
    for g0 in range(g_lo, tl.minimum(g_lo + G_SPLIT, G), GROUPS):
        for j in tl.static_range(GROUPS):
            g = g0 + j
            q = _group_codes(codes_ptr, rows, row_ok, g, K, INT4, GROUP, BLOCK_N, TILE_N, TILE_KW)
            gvec = g + tl.arange(0, 1)  # [1]: the group, as a vector for the masks
            cols = g * GROUP + tl.arange(0, GROUP)
            at = tokens[None, :] * K + cols[:, None]  # [GROUP, BLOCK_T]
            xmask = token_ok[None, :] & (cols < K)[:, None]
            hi = tl.load(hi_ptr + at, mask=xmask, other=0)
            lo = tl.load(lo_ptr + at, mask=xmask, other=0)
            dot = tl.dot(q, hi, out_dtype=tl.int32) * 256 + tl.dot(q, lo, out_dtype=tl.int32)  # [BLOCK_N, BLOCK_T]
            if TILE_N > 0:
                gat = tile_offsets(rows, gvec, G, TILE_N, TILE_KW * (8 if INT4 else 4) // GROUP)
            else:
                gat = rows[:, None] * G + gvec[None, :]
            gmask = row_ok[:, None] & (gvec < G)[None, :]
            s = tl.load(scale_ptr + gat, mask=gmask, other=0.0).to(tl.float32)  # [BLOCK_N, 1]
            tmask = token_ok[None, :] & (gvec < G)[:, None]
            dd = tl.load(dd_ptr + tokens[None, :] * G + gvec[:, None], mask=tmask, other=0.0)  # [1, BLOCK_T]
            acc += (s * dd) * dot.to(tl.float32)
            if HAS_OFFSET or ZERO != 0:
                xs = tl.load(xs_ptr + tokens[None, :] * G + gvec[:, None], mask=tmask, other=0.0)
                if HAS_OFFSET:
                    o = tl.load(offset_ptr + gat, mask=gmask, other=0.0).to(tl.float32)
                else:
                    o = -ZERO * s
                acc += o * xs
    at = out_ptr + tokens[None, :] * stride_om + rows[:, None]
    mask = row_ok[:, None] & token_ok[None, :]
    if SPLITTING:  # whole tiles of [SPLIT, grid_t * BLOCK_T, grid_n * BLOCK_N]: gemm_lowbit's layout
        m_pad = tl.num_programs(1) * BLOCK_T
        n_pad = tl.num_programs(0) * BLOCK_N
        tl.store(part_ptr + (pid_k * m_pad + tokens[None, :]).to(tl.int64) * n_pad + rows[:, None], acc)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if ACCUMULATE:
            acc += tl.load(at, mask=mask, other=0.0).to(tl.float32)
        tl.store(at, acc.to(at.dtype.element_ty), mask=mask)


def _g_split(groups: int, cfg: DigitsConfig) -> tuple[int, int]:
    """(groups per program, programs along K): whole loop steps, at most cfg.split programs."""
    per = triton.cdiv(triton.cdiv(groups, cfg.split), cfg.groups) * cfg.groups
    return per, triton.cdiv(groups, per)


def scratch_floats(tokens: int, n: int, k: int, group: int, cfg: DigitsConfig) -> int:
    """float32 partials a gemm over T = tokens and an [n, k] weight needs with cfg (0 unsplit)."""
    _, split = _g_split(k // group, cfg)
    if split == 1:
        return 0
    return split * triton.cdiv(tokens, cfg.block_t) * cfg.block_t * triton.cdiv(n, cfg.block_n) * cfg.block_n


def gemm(x: torch.Tensor, w: Int4Groups | Int8Groups, out: torch.Tensor, bias: torch.Tensor | None = None,
         accumulate: bool = False, cfg: DigitsConfig | None = None, scratch: SplitKScratch | None = None,
         digit_scratch: DigitsScratch | None = None) -> torch.Tensor:
    """x [T, K] (float16, bfloat16 or float32), w [N, K] (`supported`), bias [N] or None -> out [T, N] (x's dtype)
    = x @ W^T [+ bias]; with accumulate, out += x @ W^T [+ bias]. cfg None: `default_config`. Without scratch
    (a split config's partials, `scratch_floats`) or digit_scratch the call allocates its own (fine outside CUDA
    graphs)."""
    if not supported(w):
        raise ValueError(f"gemm_digits: int4 / int8 groups of 32, 64 or 128 only, got {type(w).__name__}"
                         f"{'' if not hasattr(w, 'group') else f' group {w.group}'}")
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in ACT_DTYPES or x.stride(1) != 1 or x.device != w.device:
        raise ValueError(f"x: expected [T, {k}] float rows (unit column stride) on {w.device}, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    t = x.shape[0]
    if out.shape != (t, n) or out.dtype != x.dtype or out.stride(1) != 1 or out.device != w.device:
        raise ValueError(f"out: expected [{t}, {n}] {x.dtype} (unit column stride), got {out.dtype} "
                         f"{tuple(out.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous() or bias.device != w.device):
        raise ValueError(f"bias: expected a contiguous [{n}] tensor on {w.device}, got {tuple(bias.shape)}")
    if t == 0:
        return out
    cfg = default_config(t, n, k) if cfg is None else cfg
    g = k // w.group
    per, split = _g_split(g, cfg)
    floats = scratch_floats(t, n, k, w.group, cfg)
    if scratch is None:
        scratch = SplitKScratch.zeros(floats, 0, w.device)
    elif scratch.partial.numel() < floats:
        raise ValueError(f"scratch: a [{t}, {k}] x [{n}, {k}] gemm with {cfg} needs {floats} floats, got "
                         f"{scratch.partial.numel()}")
    if digit_scratch is None:
        digit_scratch = DigitsScratch.allocate(t, k, w.group, w.device)
    elif not digit_scratch.fits(t, k, w.group):
        raise ValueError(f"digit_scratch: too small for [{t}, {k}] in groups of {w.group}")
    d = digits(x, w.group, digit_scratch)
    int4 = isinstance(w, Int4Groups)
    tile_n, tile_kw = w.tiles if w.tiles is not None else (0, 0)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(t, cfg.block_t), split)
    b = bias if bias is not None else out
    _gemm_digits_kernel[grid](d.hi, d.lo, d.dd, d.xs, w.codes, w.scale, w.offset if w.offset is not None else w.scale,
                              b, out, scratch.partial, t, n, k, g, per, out.stride(0), INT4=int4,
                              HAS_OFFSET=w.offset is not None, ZERO=INT4_ZERO if int4 and w.offset is None else 0,
                              GROUP=w.group, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, SPLITTING=split > 1,
                              BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, GROUPS=cfg.groups, TILE_N=tile_n,
                              TILE_KW=tile_kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        _gemm_reduce_kernel[grid[:2]](scratch.partial, w.scale, b, out, t, n, split, out.stride(0), FORMAT=0,
                                      HAS_BIAS=bias is not None, ACCUMULATE=accumulate, BLOCK_N=cfg.block_n,
                                      BLOCK_T=cfg.block_t, num_warps=4)
    return out
