"""Prefill GEMM and embedding gather over packed low-bit weights (`graph_executor/quant/formats.py`: Int4Groups,
Int8Groups, Fp8Rows):

- `gemm`:      out = x @ W^T [+ bias], or out += x @ W^T (the residual add of o_proj / down_proj)
- `embedding`: out[t] = W[ids[t]] (a packed token-embedding table, decode and prefill)
- `dequantize`: the dense weights, for a long prompt's dense GEMM (kernels/projections.py chooses)

`gemm` is for short prompts (projections.py sends long ones to cuBLAS over `dequantize`). Its operands are
swapped against a plain Triton matmul: a program owns BLOCK_N weight rows x BLOCK_T tokens and walks its slice of
K in BLOCK_K steps (whole groups, or a part of one: both are powers of two); each step loads the codes of a
[BLOCK_N, BLOCK_K] weight tile, dequantizes it in registers to the activation dtype and makes it the left operand
of `tl.dot` (float32 accumulator): the weight rows fill the tensor core's M, the few tokens its N (a short prompt
pads 16, not 64 rows), and no dequantized weight ever reaches memory. K is split over up to `split` programs so
that even a 4096-row projection fills the card; their partial sums go to a float32 scratch and the last program
of each tile (a counter) adds them in order, applies the epilogue and resets the counter (the decode GEMVs' scheme,
gemv_splitk.py). Fp8Rows' scale is one per output row, so it multiplies the sum once, in the epilogue.

The kernels are CUDA-graph safe: no host sync, launch parameters depend on shapes only, and `gemm` allocates
nothing when given its scratch.
K must be a multiple of the group (the formats guarantee it), not of BLOCK_K: groups past K are masked whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv_splitk import SplitKScratch, tile_offsets
from graph_executor.quant.formats import INT4_ZERO, Fp8Rows, Int4Groups, Int8Groups, PackedWeight

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT4, INT8, FP8 = 0, 1, 2  # the kernels' FORMAT constexpr


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 64  # weight rows (output columns) per program: the tensor core's M
    block_t: int = 16  # tokens per program: its N
    block_k: int = 128
    split: int = 1  # programs along K (at most): > 1 sums partials in a SplitKScratch
    num_warps: int = 4
    num_stages: int = 3
    # split > 1: the partials added by a second kernel (`_gemm_reduce_kernel`, same order, same bits) instead of by
    # the last program of each tile (gemv_splitk.SplitKConfig.reduce_kernel)
    reduce_kernel: bool = False
    # float16 activations and scales: each code becomes float16 through the 0x6400 magic number and the group's
    # s q + o is one float16 FMA (`_weight_tile`'s F16), instead of an int-to-float conversion and float32 math
    f16_math: bool = True

    def __post_init__(self) -> None:
        for name in ("block_n", "block_t", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):  # tl.dot needs every dimension >= 16; tl.arange a power of two
                raise ValueError(f"GemmConfig: {name} {v} is not a power of two >= 16")
        if self.split < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GemmConfig: split, num_warps and num_stages must be >= 1, got {self}")


# Measured on an H200 (python -m bench.probes.lowbit_gemm_swap; LLaMA-2-7B's four projections, T = 16 and 64, int4
# and int8, 36-56 configs each; bench/results/2026-11-30-h200-lowbit-gemm-swap): 64 weight rows a program and
# BLOCK_K = 128 were best or within ~10% everywhere; what varies is the split along K. Fewer tokens a program want
# more programs: the largest power-of-two split that keeps the grid within TARGET_PROGRAMS[block_t] is the best
# measured BLOCK_K = 128 split, or within ~3% of it, in each of those cases (at 16 tokens: gate_up 4 ways, qkv 8,
# o and down 8; at 64: qkv 2, o and down 4, gate_up 1). 32 tokens, unmeasured, sits between.
TARGET_PROGRAMS = {16: 2048, 32: 1024, 64: 384}
MAX_SPLIT = 8


@dataclass(frozen=True)
class EmbeddingConfig:
    block_t: int = 4  # tokens per program
    block_k: int = 256
    num_warps: int = 4

    def __post_init__(self) -> None:
        if self.block_t < 1 or self.block_t & (self.block_t - 1) or self.block_k < 16 or self.block_k & (
                self.block_k - 1) or self.num_warps < 1:
            raise ValueError(f"EmbeddingConfig: block_t and block_k must be powers of two (block_k >= 16), got {self}")


EMBEDDING_DEFAULT = EmbeddingConfig()


def default_config(tokens: int, n: int, k: int) -> GemmConfig:
    """The config for T = tokens, an [n, k] weight: 64 rows, T rounded up to a power of two (16..64) tokens, and
    the largest power-of-two split (<= MAX_SPLIT, <= K's steps) whose grid stays within TARGET_PROGRAMS."""
    block_t = min(64, max(16, triton.next_power_of_2(tokens)))
    tiles = triton.cdiv(n, 64) * triton.cdiv(tokens, block_t)
    split = 1
    while (split < MAX_SPLIT and tiles * split * 2 <= TARGET_PROGRAMS[block_t]
           and split * 2 <= triton.cdiv(k, 128)):
        split *= 2
    return GemmConfig(block_n=64, block_t=block_t, block_k=128, split=split)


def _k_split(k: int, cfg: GemmConfig) -> tuple[int, int]:
    """(K columns per program, programs along K): whole BLOCK_K steps, at most cfg.split programs."""
    per = triton.cdiv(triton.cdiv(k, cfg.split), cfg.block_k) * cfg.block_k
    return per, triton.cdiv(k, per)


def scratch_size(tokens: int, n: int, k: int, cfg: GemmConfig) -> tuple[int, int]:
    """(float32 partials, int32 counters) a gemm over T = tokens and an [n, k] weight needs with cfg; (0, 0) when
    it runs unsplit."""
    _, split = _k_split(k, cfg)
    if split == 1:
        return 0, 0
    grid_n, grid_t = triton.cdiv(n, cfg.block_n), triton.cdiv(tokens, cfg.block_t)
    return split * grid_t * cfg.block_t * grid_n * cfg.block_n, grid_n * grid_t


@triton.jit
def _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr, STEP_GROUP: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr, TILE_N: tl.constexpr,
                 TILE_KW: tl.constexpr, FAST: tl.constexpr = False):
    """Weights of `rows` ([BLOCK_R] int64) at columns k0 .. k0 + BLOCK_K as [BLOCK_R, BLOCK_K] in DTYPE: the value
    is formed in float32 (formats.py's order of operations) and rounded to DTYPE once. Columns past K and rows
    not row_ok come out 0. STEP_GROUP = min(GROUP, BLOCK_K): a step holds BLOCK_K / STEP_GROUP groups, or lies
    inside one (K is a multiple of the group and both are powers of two). Fp8Rows: the codes alone (exact in
    float16, bfloat16 and float32); the caller applies the row scale. TILE_N > 0: the codes, scales and offsets
    are stored tile-major in tiles of TILE_N rows x TILE_KW 32-bit words of codes (`formats.tile_major`). FAST (the
    GEMM's `GemmConfig.f16_math`) with a float16 DTYPE and float16 scales: formed as one float16 FMA instead."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    # float16 GEMM over float16 scales: codes to float16 exactly (`_f16_of_code`) and the group's s q + o as one
    # float16 FMA (one rounding, as the float32 form rounded once, but for a double rounding's rare last bit)
    F16: tl.constexpr = FAST and DTYPE == tl.float16 and scale_ptr.dtype.element_ty == tl.float16
    MATH: tl.constexpr = tl.float16 if F16 else tl.float32
    if FORMAT == 2:  # FP8
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(DTYPE)
    else:
        if FORMAT == 0:  # INT4: byte j of a row holds weights 2j (low nibble) and 2j + 1 (high nibble)
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            if TILE_N > 0:
                at = tile_offsets(rows, half, K // 2, TILE_N, 4 * TILE_KW)
            else:
                at = rows[:, None] * (K // 2) + half[None, :]
            b = tl.load(codes_ptr + at, mask=row_ok[:, None] & (half < K // 2)[None, :], other=0)  # uint8 [R, K / 2]
            if F16:
                q = tl.interleave(_f16_of_code(b & 0xF, 0), _f16_of_code(b >> 4, 0))
            else:
                q = tl.interleave(b & 0xF, b >> 4)  # [BLOCK_R, BLOCK_K], column order 2j, 2j + 1
        else:  # INT8
            if TILE_N > 0:
                at = tile_offsets(rows, cols, K, TILE_N, 4 * TILE_KW)
            else:
                at = rows[:, None] * K + cols[None, :]
            q = tl.load(codes_ptr + at, mask=mask, other=0)
            if F16:
                q = _f16_of_code((q.to(tl.int16) + 128).to(tl.uint8), 128)
        NG: tl.constexpr = BLOCK_K // STEP_GROUP
        groups = k0 // GROUP + tl.arange(0, NG)
        if TILE_N > 0:  # a tile's groups: TILE_KW words of (2 x 4) int4 or 4 int8 weights
            at = tile_offsets(rows, groups, K // GROUP, TILE_N, TILE_KW * (8 if FORMAT == 0 else 4) // GROUP)
        else:
            at = rows[:, None] * (K // GROUP) + groups[None, :]
        gmask = row_ok[:, None] & (groups < K // GROUP)[None, :]
        # masked groups get scale 0 (and offset 0), so their weights are 0 whatever the codes read as
        s = tl.load(scale_ptr + at, mask=gmask, other=0.0).to(MATH)[:, :, None]  # [BLOCK_R, NG, 1]
        q = tl.reshape(q.to(MATH), [BLOCK_R, NG, STEP_GROUP])
        if HAS_OFFSET:
            o = tl.load(offset_ptr + at, mask=gmask, other=0.0).to(MATH)[:, :, None]
            w = s * q + o
        else:
            w = s * (q - ZERO)
        w = tl.reshape(w, [BLOCK_R, BLOCK_K]).to(DTYPE)
    return w


@triton.jit
def _f16_of_code(c, BIAS: tl.constexpr):
    """uint8 codes 0..255 -> float16 c - BIAS, exact, without an integer-to-float conversion (a quarter-rate
    instruction on the card, 32 a thread per step in the GEMM's loop): 0x6400 | c is the float16 1024 + c."""
    return (c.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + BIAS)


@triton.jit
def _gemm_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, K_SPLIT, SPLIT,
                 stride_xm, stride_om, FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr,
                 GROUP: tl.constexpr, STEP_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                 PRECISION: tl.constexpr, SPLITTING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_K: tl.constexpr, FIXUP: tl.constexpr = True, TILE_N: tl.constexpr = 0,
                 TILE_KW: tl.constexpr = 0, FAST: tl.constexpr = True):
    """Program (n, t, s): weight rows n * BLOCK_N.., tokens t * BLOCK_T.., K columns s * K_SPLIT.. (SPLIT programs
    along K). acc [BLOCK_N, BLOCK_T] = W_tile @ x_tile^T: the dequantized weights are the dot's left operand."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N * K may pass 2**31
    row_ok = rows < N
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < M
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + tokens[None, :] * stride_xm + cols[:, None],
                     mask=token_ok[None, :] & (cols < K)[:, None], other=0.0)  # [BLOCK_K, BLOCK_T]
        w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                         STEP_GROUP, BLOCK_N, BLOCK_K, dtype, TILE_N, TILE_KW, FAST)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(w, xt, acc, input_precision=PRECISION)
    at = out_ptr + tokens[None, :] * stride_om + rows[:, None]
    mask = row_ok[:, None] & token_ok[None, :]
    if SPLITTING:
        # partials to the scratch (whole tiles: [SPLIT, grid_t * BLOCK_T, grid_n * BLOCK_N]); the last program of
        # this tile to finish (the counter) adds them in order: deterministic, and it resets the counter
        grid_n = tl.num_programs(0)
        m_pad = tl.num_programs(1) * BLOCK_T
        n_pad = grid_n * BLOCK_N
        tile = part_ptr + (pid_k * m_pad + tokens[None, :]).to(tl.int64) * n_pad + rows[:, None]
        tl.store(tile, acc)
        if FIXUP:  # else `_gemm_reduce_kernel` adds the partials
            tl.debug_barrier()  # every thread's stores are issued before the release below
            counter = count_ptr + pid_t * grid_n + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
                acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
                for i in range(SPLIT):
                    acc += tl.load(tile + (i - pid_k) * m_pad * n_pad, cache_modifier=".cg")
                _epilogue(acc, at, mask, rows, row_ok, scale_ptr, b_ptr, FORMAT, HAS_BIAS, ACCUMULATE)
                tl.atomic_xchg(counter, 0)
    else:
        _epilogue(acc, at, mask, rows, row_ok, scale_ptr, b_ptr, FORMAT, HAS_BIAS, ACCUMULATE)


@triton.jit
def _gemm_reduce_kernel(part_ptr, scale_ptr, b_ptr, out_ptr, M, N, SPLIT, stride_om, FORMAT: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """The second kernel of a split `gemm` with `reduce_kernel`: tile (n, t) = the SPLIT partials added in order, then
    `_epilogue`, as the fixup's last program does (same bits)."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_pad = tl.num_programs(1) * BLOCK_T
    n_pad = tl.num_programs(0) * BLOCK_N
    tile = part_ptr + tokens[None, :].to(tl.int64) * n_pad + rows[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    for i in range(SPLIT):
        acc += tl.load(tile + i * m_pad * n_pad)
    at = out_ptr + tokens[None, :] * stride_om + rows[:, None]
    _epilogue(acc, at, row_ok[:, None] & (tokens < M)[None, :], rows, row_ok, scale_ptr, b_ptr, FORMAT, HAS_BIAS,
              ACCUMULATE)


@triton.jit
def _epilogue(acc, at, mask, rows, row_ok, scale_ptr, b_ptr, FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACCUMULATE: tl.constexpr):
    """out tile (at, mask) [+]= acc [BLOCK_N, BLOCK_T] (x FP8's row scale) [+ bias]."""
    if FORMAT == 2:  # FP8: one scale per weight row, i.e. per output column
        acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if ACCUMULATE:
        acc += tl.load(at, mask=mask, other=0.0).to(tl.float32)
    tl.store(at, acc.to(at.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, offset_ptr, out_ptr, N, K, FORMAT: tl.constexpr,
                       HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr, STEP_GROUP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TILE_N: tl.constexpr = 0,
                       TILE_KW: tl.constexpr = 0):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < N
    k0 = tl.program_id(1) * BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if FORMAT == 2:  # FP8: the codes times the row's scale, rounded once
        w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                         STEP_GROUP, BLOCK_R, BLOCK_K, tl.float32, TILE_N, TILE_KW)
        w = (w * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]).to(dtype)
    else:
        w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                         STEP_GROUP, BLOCK_R, BLOCK_K, dtype, TILE_N, TILE_KW)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w, mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _embedding_kernel(codes_ptr, scale_ptr, offset_ptr, ids_ptr, out_ptr, T, V, K, stride_om,
                      FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr,
                      STEP_GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                      TILE_N: tl.constexpr = 0, TILE_KW: tl.constexpr = 0):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    rows = tl.load(ids_ptr + tokens, mask=token_ok, other=0).to(tl.int64)  # [BLOCK_T]
    # an id outside the table would read out of bounds: its row comes out 0 instead (no host check in a graph)
    row_ok = token_ok & (rows >= 0) & (rows < V)
    k0 = tl.program_id(1) * BLOCK_K
    w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                     STEP_GROUP, BLOCK_T, BLOCK_K, tl.float32, TILE_N, TILE_KW)  # [BLOCK_T, BLOCK_K]
    if FORMAT == 2:
        w *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + tokens[:, None] * stride_om + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=token_ok[:, None] & (cols < K)[None, :])


def _check_weight(w: PackedWeight) -> None:
    if not isinstance(w, (Int4Groups, Int8Groups, Fp8Rows)):
        raise ValueError(f"w: expected Int4Groups, Int8Groups or Fp8Rows, got {type(w).__name__}")


def _weights(w: PackedWeight, block_k: int) -> tuple:
    """The kernels' pointer arguments and the format's constexprs for K steps of block_k."""
    if isinstance(w, Fp8Rows):  # offset_ptr unused: pass the scale
        return (w.codes, w.scale, w.scale), {"FORMAT": FP8, "HAS_OFFSET": False, "ZERO": 0.0, "GROUP": 1,
                                             "STEP_GROUP": 1}
    int4 = isinstance(w, Int4Groups)
    offset = w.offset if w.offset is not None else w.scale  # unused when HAS_OFFSET is False
    zero = float(INT4_ZERO) if int4 and w.offset is None else 0.0  # symmetric Int4Groups' codes centre on 8
    tile_n, tile_kw = w.tiles or (0, 0)
    return (w.codes, w.scale, offset), {"FORMAT": INT4 if int4 else INT8, "HAS_OFFSET": w.offset is not None,
                                        "ZERO": zero, "GROUP": w.group, "STEP_GROUP": min(w.group, block_k),
                                        "TILE_N": tile_n, "TILE_KW": tile_kw}


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device,
                  dtypes: tuple[torch.dtype, ...]) -> None:
    """A 2-D float tensor of this shape, dtype and device with unit stride along its rows (a row-slice view of a
    wider buffer is fine)."""
    if t.dim() != 2 or tuple(t.shape) != shape or t.dtype not in dtypes or t.device != device or (
            shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a {list(shape)} tensor of {', '.join(map(str, dtypes))} on {device} "
                         f"with unit inner stride, got {t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


def gemm(x: torch.Tensor, w: PackedWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
         accumulate: bool = False, cfg: GemmConfig | None = None,
         scratch: SplitKScratch | None = None) -> torch.Tensor:
    """x [T, K] (float16, bfloat16 or float32), w packed [N, K], bias [N] or None -> out [T, N] (x's dtype) =
    x @ W^T [+ bias]; with accumulate, out += x @ W^T [+ bias] in place. cfg None: `default_config(T, N, K)`.
    A config split along K needs `scratch_size` of scratch (calls on one stream may share one); without it the
    call allocates its own, which is fine outside CUDA graphs."""
    _check_weight(w)
    n, k = w.shape
    t = x.shape[0] if x.dim() == 2 else -1
    _check_matrix("x", x, (t, k), w.device, ACT_DTYPES)
    _check_matrix("out", out, (t, n), w.device, (x.dtype,))
    if bias is not None and (bias.dim() != 1 or bias.numel() != n or not bias.is_contiguous()
                             or bias.dtype not in ACT_DTYPES or bias.device != w.device):
        raise ValueError(f"bias: expected a contiguous [{n}] float tensor on {w.device}, got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")
    if t == 0:
        return out
    cfg = default_config(t, n, k) if cfg is None else cfg
    k_split, split = _k_split(k, cfg)
    floats, counters = scratch_size(t, n, k, cfg)
    if scratch is None:
        scratch = SplitKScratch.zeros(floats, counters, w.device)
    elif scratch.partial.numel() < floats or scratch.count.numel() < counters:
        raise ValueError(f"scratch: a [{t}, {k}] x [{n}, {k}] gemm with {cfg} needs {floats} floats and {counters} "
                         f"counters, got {scratch.partial.numel()} and {scratch.count.numel()}")
    fmt_ptrs, fmt = _weights(w, cfg.block_k)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(t, cfg.block_t), split)
    # a float32 dot defaults to tf32 on tensor cores (~1e-3): float32 activations ask for float32 products
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _gemm_kernel[grid](x, *fmt_ptrs, bias if bias is not None else out, out, scratch.partial, scratch.count, t, n,
                       k, k_split, split, x.stride(0), out.stride(0), **fmt, HAS_BIAS=bias is not None,
                       ACCUMULATE=accumulate, PRECISION=precision, SPLITTING=split > 1, BLOCK_N=cfg.block_n,
                       BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                       FIXUP=not cfg.reduce_kernel, FAST=cfg.f16_math)
    if split > 1 and cfg.reduce_kernel:
        _gemm_reduce_kernel[grid[:2]](scratch.partial, fmt_ptrs[1], bias if bias is not None else out, out, t, n, split,
                                      out.stride(0), FORMAT=fmt["FORMAT"], HAS_BIAS=bias is not None,
                                      ACCUMULATE=accumulate, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t, num_warps=4)
    return out


def embedding(w: PackedWeight, ids: torch.Tensor, out: torch.Tensor,
              cfg: EmbeddingConfig = EMBEDDING_DEFAULT) -> torch.Tensor:
    """w packed [V, K], ids [T] (int64 or int32, on w's device) -> out [T, K] (float16, bfloat16 or float32) =
    the dequantized rows W[ids], formed in float32 and rounded once to out's dtype. An id outside 0..V-1
    gives a row of zeros (a graph cannot check ids on the host)."""
    _check_weight(w)
    v, k = w.shape
    if (ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32) or not ids.is_contiguous()
            or ids.device != w.device):
        raise ValueError(f"ids: expected a contiguous 1-D int64 tensor on {w.device}, got {ids.dtype} "
                         f"{tuple(ids.shape)} on {ids.device}")
    t = ids.numel()
    _check_matrix("out", out, (t, k), w.device, ACT_DTYPES)
    if t == 0:
        return out
    fmt_ptrs, fmt = _weights(w, cfg.block_k)
    grid = (triton.cdiv(t, cfg.block_t), triton.cdiv(k, cfg.block_k))
    # no FMA contraction of scale * q + offset: the rows match dequantize() bit for bit on a GPU too (the gather
    # is memory-bound, the separate multiply and add cost nothing)
    _embedding_kernel[grid](*fmt_ptrs, ids, out, t, v, k, out.stride(0), **fmt, BLOCK_T=cfg.block_t,
                            BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, enable_fp_fusion=False)
    return out


def dequantize(w: PackedWeight, out: torch.Tensor, block_r: int = 16, block_k: int = 256,
               num_warps: int = 4) -> torch.Tensor:
    """out [N, K] (float16, bfloat16 or float32) = the weights w holds, each formed in float32 and rounded once
    (Fp8Rows: code * row scale). For long prompts, where a dense GEMM on tensor cores beats the low-bit one."""
    _check_weight(w)
    n, k = w.shape
    _check_matrix("out", out, (n, k), w.device, ACT_DTYPES)
    fmt_ptrs, fmt = _weights(w, block_k)
    # no FMA contraction of scale * q + offset (as in `embedding`): the weights match the format's own float32
    # dequantization bit for bit on a GPU too
    _dequantize_kernel[(triton.cdiv(n, block_r), triton.cdiv(k, block_k))](*fmt_ptrs, out, n, k, **fmt,
                                                                           BLOCK_R=block_r, BLOCK_K=block_k,
                                                                           num_warps=num_warps,
                                                                           enable_fp_fusion=False)
    return out
