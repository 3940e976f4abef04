"""Batch-1 GEMVs over FP8 rows (`Fp8Rows`: e4m3 codes, one float32 scale per output row) for the decode step:
split-K, one shot per program. Same three fusions as the fp16 GEMVs of gemv.py and the int4/int8 ones of
gemv_splitk.py:

- `rmsnorm_gemv`:  out = W @ (rmsnorm(x) * norm_w) [+ bias]
- `gemv_residual`: x += W @ a
- `silu_gemv_residual`: x += W @ (silu(g) * u), [g, u] = gate_up

Why this shape: through the fp16 kernels (a program owns a few rows and loops over K) FP8 codes read at only
2.2-3.2 TB/s on an H200 (bench/NOTES.md, issue 10); the suspects are those the int4 kernels had: at one byte per
weight a loop iteration has half the fp16 kernel's bytes in flight, and the 4096-row projections have too few
programs to fill the card. What fixed int4/int8 (gemv_splitk.py) is done here too: a program owns BLOCK_N rows and
one slice of BLOCK_K codes along K and has no loop, so all its loads are in flight at once, and the grid is
N / BLOCK_N x K / BLOCK_K programs (bench/probes/fp8_splitk.py measures it against the old path). Per program:
the codes become float32 in registers (e4m3 -> f16 -> f32 converts, exact), are multiplied by the slice's
activation and summed per row in float32; the row scale is one multiply per row, in the fixup.

Partial sums go to the float32 scratch of gemv_splitk (`SplitKScratch`: [SPLIT, N] partials, then the sum of
squares of each program's x slice for RMSNorm); the last program of a row block to finish (a counter per block)
adds the SPLIT partials in order, applies the row scale, 1 / rms and the bias or the residual, writes the output
and resets the counter: deterministic, and the scratch is clean for the next call (and the next graph replay).
Calls on one stream may share a scratch with each other and with the int4/int8 split-K kernels.

The kernel (`launch_rows`) also serves dense float weights without a row scale: gemv_dense_splitk.py.

Under the Triton interpreter (CPU tests) the e4m3 codes of a CPU tensor convert exactly, as compiled
(tests/test_gemv_fp8.py reads every finite code back through the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_splitk import (
    SplitKScratch,
    activation_slice,
    check_call,
    fixup,
    launch_reduce,
    splitk_floats,
    store_partial,
)
from graph_executor.kernels.pdl import launch_options, wait_for_prior
from graph_executor.quant.formats import Fp8Rows


@dataclass(frozen=True)
class Fp8Config:
    block_n: int = 32  # output rows per program
    block_k: int = 512  # codes (one byte each) along K per program: the K slice
    num_warps: int = 4
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)
    early: bool = False  # load the weights before waiting for the previous kernel (pdl.with_early_weights)
    reduce_kernel: bool = False  # the partials added by a second kernel (gemv_splitk.SplitKConfig.reduce_kernel)

    def __post_init__(self) -> None:
        check_block_config(self)


def check_block_config(cfg) -> None:
    """ValueError unless a rows split-K config's block_n, block_k and num_warps are powers of two (tl.arange and the
    warp layout need them): Fp8Config's and gemv_dense_splitk.DenseSplitKConfig's check."""
    for name in ("block_n", "block_k", "num_warps"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"{type(cfg).__name__}.{name} must be a power of two >= 1, got {v}")


DEFAULT = Fp8Config()

RMSNORM, RESIDUAL, SILU_RESIDUAL = 0, 1, 2  # the kernel's MODE: which fusion


@dataclass(frozen=True)
class Fp8Plan:
    """A config per projection of the decode step: an Fp8Config runs the split-K kernels here, a gemv.GemvConfig
    the fp16 GEMVs over the codes (kernels/projections.py dispatches on the type), so a plan may mix the two."""

    qkv: Fp8Config | GemvConfig = DEFAULT
    o: Fp8Config | GemvConfig = DEFAULT
    gate_up: Fp8Config | GemvConfig = DEFAULT
    down: Fp8Config | GemvConfig = DEFAULT
    lm_head: Fp8Config | GemvConfig = DEFAULT


def split(w: Fp8Rows, cfg: Fp8Config) -> int:
    """K slices (programs along K) of one call."""
    return triton.cdiv(w.shape[1], cfg.block_k)


def scratch_size(w: Fp8Rows, cfg: Fp8Config) -> tuple[int, int]:
    """(float32 partials, int32 counters) one call over w needs: what a shared SplitKScratch must hold."""
    n = w.shape[0]
    return splitk_floats(n, split(w, cfg), cfg.block_n), triton.cdiv(n, cfg.block_n)


def allocate_scratch(w: Fp8Rows, cfg: Fp8Config) -> SplitKScratch:
    """A scratch for calls over w alone (a decoder sizes one shared scratch over all its slots instead)."""
    return SplitKScratch.zeros(*scratch_size(w, cfg), w.device)


@triton.jit
def _rows_splitk_kernel(w_ptr, scale_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, part_ptr, count_ptr, N, K, eps,
                        MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, SPLIT: tl.constexpr,
                        SPLIT_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                        EARLY: tl.constexpr, FIXUP: tl.constexpr = True):
    """MODE 0 (RMSNORM): out = W @ (rmsnorm(a) * nw) [+ b]; 1 (RESIDUAL): out += W @ a; 2 (SILU_RESIDUAL):
    out += W @ (silu(a[:K]) * a[K:]). W [N, K] row-major: e4m3 codes with a float32 scale [N] per row (ROW_SCALE),
    or dense float weights (gemv_dense_splitk.py). EARLY: the weights are loaded before the wait for the previous
    kernel (constant in a step: no race), so that with PDL they are in flight during its last wave."""
    if not EARLY:
        wait_for_prior(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    # the weights first, so that the bulk of the bytes is in flight while the activation is prepared
    q = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
    if EARLY:
        wait_for_prior(PDL)
    a, ss = activation_slice(a_ptr, nw_ptr, cols, col_ok, K, MODE)  # [BLOCK_K], this slice's share of sum(x^2)
    partial = tl.sum(q.to(tl.float32) * a[None, :], axis=1)  # [BLOCK_N], in code units (no row scale yet)
    if FIXUP:
        fixup(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, count_ptr, scale_ptr, b_ptr, out_ptr, N, K, eps,
              MODE, HAS_BIAS, ROW_SCALE, SPLIT, SPLIT_P2, BLOCK_N)
    else:  # launch_rows' second kernel adds the partials
        store_partial(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, N, MODE, SPLIT)


def _check(w: Fp8Rows, scratch: SplitKScratch, cfg: Fp8Config, vectors: dict[str, tuple[torch.Tensor, int]]) -> None:
    if not isinstance(w, Fp8Rows):
        raise ValueError(f"expected Fp8Rows weights, got {type(w).__name__}")
    if not isinstance(cfg, Fp8Config):
        raise ValueError(f"expected an Fp8Config, got {type(cfg).__name__}")
    if scratch.partial.device != w.device or scratch.count.device != w.device:
        raise ValueError(f"split-K scratch on {scratch.partial.device}, weights on {w.device}")
    check_call(w, scratch, scratch_size(w, cfg), cfg, vectors)


def _kernel_call(w, scale, a, nw, bias, out, partial, count, n: int, k: int, eps: float, mode: int,
                 cfg) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, arguments, meta-parameters) of one launch; `scale` None: no row scale (dense weights). The pointer
    arguments are tensors, or their torch dtypes for `compile_rows` (Triton's warmup takes a dtype for a tensor)."""
    s = triton.cdiv(k, cfg.block_k)
    args = (w, scale if scale is not None else w, a, nw if nw is not None else a, bias if bias is not None else out,
            out, partial, count, n, k, eps)
    meta = dict(MODE=mode, HAS_BIAS=bias is not None, ROW_SCALE=scale is not None, SPLIT=s,
                SPLIT_P2=triton.next_power_of_2(s), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=1, PDL=cfg.pdl, EARLY=cfg.early, FIXUP=not cfg.reduce_kernel,
                **launch_options(cfg.pdl))
    return (triton.cdiv(n, cfg.block_n), s), args, meta


def launch_rows(w: torch.Tensor, scale: torch.Tensor | None, a: torch.Tensor, nw: torch.Tensor | None,
                bias: torch.Tensor | None, out: torch.Tensor, eps: float, mode: int, scratch: SplitKScratch,
                cfg, reduce: bool = True) -> torch.Tensor:
    """One split-K GEMV over row-major weights w [N, K] (e4m3 codes with their row `scale`, or dense float weights
    with `scale` None) with cfg (an Fp8Config or a DenseSplitKConfig); the callers check their inputs first.
    `reduce` False (with cfg.reduce_kernel): the partials stay in scratch.partial ([split, N], float32), added by
    the caller's next kernels (gemv.PendingResidual)."""
    n, k = w.shape
    grid, args, meta = _kernel_call(w, scale, a, nw, bias, out, scratch.partial, scratch.count, n, k, eps, mode, cfg)
    _rows_splitk_kernel[grid](*args, **meta)
    if cfg.reduce_kernel and reduce:
        launch_reduce(scratch, scale, bias, out, n, k, eps, mode, grid[1], cfg.pdl)
    return out


def compile_rows(n: int, k: int, cfg, mode: int, w_dtype: torch.dtype, scaled: bool, act_dtype: torch.dtype,
                 out_dtype: torch.dtype, bias_dtype: torch.dtype | None = None) -> None:
    """Compile (into Triton's cache, without launching) the kernel `launch_rows` takes for an [n, k] weight of
    w_dtype (`scaled`: with a float32 row scale) with cfg: `mode` one of RMSNORM, RESIDUAL, SILU_RESIDUAL, the
    activation (and norm weight) in act_dtype, the output in out_dtype. Needs a GPU: the interpreter compiles
    nothing."""
    if mode not in (RMSNORM, RESIDUAL, SILU_RESIDUAL):
        raise ValueError(f"precompile: unknown mode {mode}")
    if bias_dtype is not None and mode != RMSNORM:
        raise ValueError("precompile: only rmsnorm_gemv takes a bias")
    grid, args, meta = _kernel_call(w_dtype, torch.float32 if scaled else None, act_dtype,
                                    act_dtype if mode == RMSNORM else None, bias_dtype, out_dtype, torch.float32,
                                    torch.int32, n, k, 1e-5 if mode == RMSNORM else 0.0, mode, cfg)
    _rows_splitk_kernel.warmup(*args, grid=grid, **meta)


def _launch(w: Fp8Rows, a: torch.Tensor, nw: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor,
            eps: float, mode: int, scratch: SplitKScratch, cfg: Fp8Config) -> torch.Tensor:
    return launch_rows(w.codes, w.scale, a, nw, bias, out, eps, mode, scratch, cfg)


def precompile(n: int, k: int, cfg: Fp8Config, mode: int, act_dtype: torch.dtype, out_dtype: torch.dtype,
               bias_dtype: torch.dtype | None = None) -> None:
    """Compile (into Triton's cache, without launching) the kernel one call over an [n, k] weight with cfg takes:
    `mode` one of RMSNORM, RESIDUAL, SILU_RESIDUAL, the activation (and norm weight) in act_dtype, the output in
    out_dtype. A sweep can fill the cache from a pool of processes first (compiling is CPU-bound and holds the
    GIL). Needs a GPU: the interpreter compiles nothing."""
    compile_rows(n, k, cfg, mode, torch.float8_e4m3fn, True, act_dtype, out_dtype, bias_dtype)


def rmsnorm_gemv(w: Fp8Rows, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 scratch: SplitKScratch, bias: torch.Tensor | None = None, cfg: Fp8Config = DEFAULT) -> torch.Tensor:
    """w [N, K], x [K], norm_w [K], bias [N] or None -> out [N] = W @ (rmsnorm(x) * norm_w) [+ bias] (any float
    dtype: logits may be float32)."""
    n, k = w.shape
    vectors = dict(x=(x, k), norm_w=(norm_w, k), out=(out, n))
    if bias is not None:
        vectors["bias"] = (bias, n)
    _check(w, scratch, cfg, vectors)
    return _launch(w, x, norm_w, bias, out, eps, RMSNORM, scratch, cfg)


def gemv_residual(w: Fp8Rows, a: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                  cfg: Fp8Config = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ a [K], in place."""
    n, k = w.shape
    _check(w, scratch, cfg, dict(a=(a, k), x=(x, n)))
    return _launch(w, a, None, None, x, 0.0, RESIDUAL, scratch, cfg)


def silu_gemv_residual(w: Fp8Rows, gate_up: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                       cfg: Fp8Config = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ (silu(gate_up[:K]) * gate_up[K:]), in place."""
    n, k = w.shape
    _check(w, scratch, cfg, dict(gate_up=(gate_up, 2 * k), x=(x, n)))
    return _launch(w, gate_up, None, None, x, 0.0, SILU_RESIDUAL, scratch, cfg)
