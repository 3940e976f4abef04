"""Prefill GEMM and embedding gather over packed low-bit weights (`graph_executor/quant/formats.py`: Int4Groups,
Int8Groups, Fp8Rows):

- `gemm`:      out = x @ W^T [+ bias], or out += x @ W^T (the residual add of o_proj / down_proj)
- `embedding`: out[t] = W[ids[t]] (a packed token-embedding table, decode and prefill)
- `dequantize`: the dense weights, for a long prompt's dense GEMM (kernels/projections.py chooses)

`gemm` is tiled like a plain Triton matmul: a program owns a BLOCK_M x BLOCK_N output tile and walks K in
BLOCK_K steps (whole groups, or a part of one: both are powers of two); each step loads the codes of a
[BLOCK_N, BLOCK_K] weight tile, dequantizes it in registers to the activation dtype and hands it to `tl.dot`
(float32 accumulator), so tensor cores do the math on a GPU and no dequantized weight ever reaches memory.
Fp8Rows' scale is one per output row, so it multiplies the accumulator once after the K loop instead.

Both kernels are CUDA-graph safe: no host sync, no allocation, launch parameters depend on shapes only.
K must be a multiple of the group (the formats guarantee it), not of BLOCK_K: groups past K are masked whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.quant.formats import INT4_ZERO, Fp8Rows, Int4Groups, Int8Groups, PackedWeight

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT4, INT8, FP8 = 0, 1, 2  # the kernels' FORMAT constexpr


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8  # output tiles walked GROUP_M row-blocks at a time, so a weight tile is reused from L2
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):  # tl.dot needs every dimension >= 16; tl.arange a power of two
                raise ValueError(f"GemmConfig: {name} {v} is not a power of two >= 16")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GemmConfig: group_m, num_warps and num_stages must be >= 1, got {self}")


# Measured on an H200 (python -m bench.probes.lowbit_gemm --sweep; LLaMA-2-7B's four projections, T = 16..512, int4,
# int8 and fp8): the best tile is the largest one that still gives about 1.5 waves of programs over the 132 SMs.
# Few tokens read each weight tile for little math, so narrow tiles (many programs, each streaming its weights) win
# there; many tokens want the large tiles of an ordinary matmul. Picking from this list by that rule came within 5%
# of each case's best config on average (35% in the worst case, down_proj at T = 64).
TILE_CONFIGS = (  # largest first
    GemmConfig(block_m=256, block_n=128, block_k=64, num_warps=8, num_stages=3),
    GemmConfig(block_m=128, block_n=64, block_k=64, num_warps=4, num_stages=3),
    GemmConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=4),
    GemmConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4),
    GemmConfig(block_m=16, block_n=32, block_k=256, num_warps=4, num_stages=3),
)
MIN_TILES = 200


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


def default_config(tokens: int, n: int) -> GemmConfig:
    """The block config for T = tokens and N = n output columns: the largest of TILE_CONFIGS whose BLOCK_M is at
    most T rounded up to a power of two and that makes MIN_TILES programs, else the smallest."""
    fits = [c for c in TILE_CONFIGS if c.block_m == 16 or c.block_m < 2 * tokens]
    return next((c for c in fits if triton.cdiv(tokens, c.block_m) * triton.cdiv(n, c.block_n) >= MIN_TILES), fits[-1])


@triton.jit
def _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr, STEP_GROUP: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """Weights of `rows` ([BLOCK_R] int64) at columns k0 .. k0 + BLOCK_K as [BLOCK_R, BLOCK_K] in DTYPE: the value
    is formed in float32 (formats.py's order of operations) and rounded to DTYPE once. Columns past K and rows
    not row_ok come out 0. STEP_GROUP = min(GROUP, BLOCK_K): a step holds BLOCK_K / STEP_GROUP groups, or lies
    inside one (K is a multiple of the group and both are powers of two). Fp8Rows: the codes alone (exact in
    float16, bfloat16 and float32); the caller applies the row scale."""
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    if FORMAT == 2:  # FP8
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(DTYPE)
    else:
        if FORMAT == 0:  # INT4: byte j of a row holds weights 2j (low nibble) and 2j + 1 (high nibble)
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(codes_ptr + rows[:, None] * (K // 2) + half[None, :],
                        mask=row_ok[:, None] & (half < K // 2)[None, :], other=0)  # uint8 [BLOCK_R, BLOCK_K / 2]
            q = tl.interleave(b & 0xF, b >> 4)  # [BLOCK_R, BLOCK_K], column order 2j, 2j + 1
        else:  # INT8
            q = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0)
        NG: tl.constexpr = BLOCK_K // STEP_GROUP
        groups = k0 // GROUP + tl.arange(0, NG)
        at = rows[:, None] * (K // GROUP) + groups[None, :]
        gmask = row_ok[:, None] & (groups < K // GROUP)[None, :]
        # masked groups get scale 0 (and offset 0), so their weights are 0 whatever the codes read as
        s = tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]  # [BLOCK_R, NG, 1]
        q = tl.reshape(q.to(tl.float32), [BLOCK_R, NG, STEP_GROUP])
        if HAS_OFFSET:
            o = tl.load(offset_ptr + at, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
            w = s * q + o
        else:
            w = s * (q - ZERO)
        w = tl.reshape(w, [BLOCK_R, BLOCK_K]).to(DTYPE)
    return w


@triton.jit
def _gemm_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                 FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr,
                 STEP_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order (Triton tutorial 03): consecutive programs share weight tiles while they sit in L2
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * grid_n) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_rows
    pid_n = (pid % (GROUP_M * grid_n)) // group_rows

    tokens = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token_ok = tokens < M
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # weight rows = output columns; N*K may pass 2**31
    row_ok = rows < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + tokens[:, None] * stride_xm + cols[None, :], mask=token_ok[:, None] & (cols < K)[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                         STEP_GROUP, BLOCK_N, BLOCK_K, dtype)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if FORMAT == 2:  # FP8: one scale per weight row, i.e. per output column
        acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    at = out_ptr + tokens[:, None] * stride_om + rows[None, :]
    mask = token_ok[:, None] & row_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(at, mask=mask, other=0.0).to(tl.float32)
    tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, offset_ptr, out_ptr, N, K, FORMAT: tl.constexpr,
                       HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr, STEP_GROUP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < N
    k0 = tl.program_id(1) * BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if FORMAT == 2:  # FP8: the codes times the row's scale, rounded once
        w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                         STEP_GROUP, BLOCK_R, BLOCK_K, tl.float32)
        w = (w * tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]).to(dtype)
    else:
        w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                         STEP_GROUP, BLOCK_R, BLOCK_K, dtype)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w, mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _embedding_kernel(codes_ptr, scale_ptr, offset_ptr, ids_ptr, out_ptr, T, V, K, stride_om,
                      FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr,
                      STEP_GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    rows = tl.load(ids_ptr + tokens, mask=token_ok, other=0).to(tl.int64)  # [BLOCK_T]
    # an id outside the table would read out of bounds: its row comes out 0 instead (no host check in a graph)
    row_ok = token_ok & (rows >= 0) & (rows < V)
    k0 = tl.program_id(1) * BLOCK_K
    w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                     STEP_GROUP, BLOCK_T, BLOCK_K, tl.float32)  # [BLOCK_T, BLOCK_K]
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
    return (w.codes, w.scale, offset), {"FORMAT": INT4 if int4 else INT8, "HAS_OFFSET": w.offset is not None,
                                        "ZERO": zero, "GROUP": w.group, "STEP_GROUP": min(w.group, block_k)}


def _check_matrix(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device,
                  dtypes: tuple[torch.dtype, ...]) -> None:
    """A 2-D float tensor of this shape, dtype and device with unit stride along its rows (a row-slice view of a
    wider buffer is fine)."""
    if t.dim() != 2 or tuple(t.shape) != shape or t.dtype not in dtypes or t.device != device or (
            shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a {list(shape)} tensor of {', '.join(map(str, dtypes))} on {device} "
                         f"with unit inner stride, got {t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


def gemm(x: torch.Tensor, w: PackedWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
         accumulate: bool = False, cfg: GemmConfig | None = None) -> torch.Tensor:
    """x [T, K] (float16, bfloat16 or float32), w packed [N, K], bias [N] or None -> out [T, N] (x's dtype) =
    x @ W^T [+ bias]; with accumulate, out += x @ W^T [+ bias] in place. cfg None: `default_config(T, N)`."""
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
    cfg = default_config(t, n) if cfg is None else cfg
    fmt_ptrs, fmt = _weights(w, cfg.block_k)
    grid = (triton.cdiv(t, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    # a float32 dot defaults to tf32 on tensor cores (~1e-3): float32 activations ask for float32 products
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _gemm_kernel[grid](x, *fmt_ptrs, bias if bias is not None else out, out, t, n, k, x.stride(0), out.stride(0),
                       **fmt, HAS_BIAS=bias is not None, ACCUMULATE=accumulate, PRECISION=precision,
                       BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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


def dequantize(w: PackedWeight, out: torch.Tensor, block_r: int = 16, block_k: int = 256) -> torch.Tensor:
    """out [N, K] (float16, bfloat16 or float32) = the weights w holds, each formed in float32 and rounded once
    (Fp8Rows: code * row scale). For long prompts, where a dense GEMM on tensor cores beats the low-bit one."""
    _check_weight(w)
    n, k = w.shape
    _check_matrix("out", out, (n, k), w.device, ACT_DTYPES)
    fmt_ptrs, fmt = _weights(w, block_k)
    _dequantize_kernel[(triton.cdiv(n, block_r), triton.cdiv(k, block_k))](*fmt_ptrs, out, n, k, **fmt,
                                                                           BLOCK_R=block_r, BLOCK_K=block_k)
    return out
