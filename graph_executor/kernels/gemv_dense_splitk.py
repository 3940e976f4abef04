"""Batch-1 GEMVs over dense (fp16, bf16 or float32) row-major weights, split along K, one shot per program: the
structure of the packed and FP8 split-K kernels (gemv_splitk.py, gemv_fp8.py) for the fp16 decode step's
projections with few rows (issue 12: decode <= 1.15x the bandwidth floor). Same three fusions as gemv.py:

- `rmsnorm_gemv`:  out = W @ (rmsnorm(x) * norm_w) [+ bias]
- `gemv_residual`: x += W @ a
- `silu_gemv_residual`: x += W @ (silu(g) * u), [g, u] = gate_up

Why: the fp16 kernels of gemv.py (a program owns a few rows and loops over K) read LLaMA-2-7B's 4096-row
projections at 3.0 (o_proj) and 3.28 TB/s (down_proj, K = 11008) against 3.9-4.0 for the wide ones on an H200
(bench/NOTES.md, probe 2): 4096 rows make few programs, each walking a long K, so too few bytes are in flight at a
time. Here a program owns BLOCK_N rows and one K slice of BLOCK_K weights with no loop (all its loads in flight at
once), and the grid is N / BLOCK_N x K / BLOCK_K programs. The partial sums go to the float32 scratch of
gemv_splitk (`SplitKScratch`), and the last program of a row block adds them in order (`gemv_splitk.fixup`):
deterministic, graph-safe, the scratch left clean. Whether it beats gemv.py per projection is the card's to say
(bench/probes/dense_splitk.py); `GemvPlan` takes either config per projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv_splitk import SplitKScratch, activation_slice, check_call, fixup, splitk_floats
from graph_executor.kernels.pdl import launch_options, wait_for_prior

RMSNORM, RESIDUAL, SILU_RESIDUAL = 0, 1, 2  # the kernel's MODE: which fusion (as gemv_fp8's)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DenseSplitKConfig:
    block_n: int = 16  # output rows per program
    block_k: int = 1024  # weights along K per program: the K slice
    num_warps: int = 4
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):  # tl.arange and the warp layout need powers of two
                raise ValueError(f"DenseSplitKConfig.{name} must be a power of two >= 1, got {v}")


DEFAULT = DenseSplitKConfig()


def split(w: torch.Tensor, cfg: DenseSplitKConfig) -> int:
    """K slices (programs along K) of one call."""
    return triton.cdiv(w.shape[1], cfg.block_k)


def scratch_size(w: torch.Tensor, cfg: DenseSplitKConfig) -> tuple[int, int]:
    """(float32 partials, int32 counters) one call over w needs: what a shared SplitKScratch must hold."""
    n = w.shape[0]
    return splitk_floats(n, split(w, cfg), cfg.block_n), triton.cdiv(n, cfg.block_n)


def allocate_scratch(w: torch.Tensor, cfg: DenseSplitKConfig) -> SplitKScratch:
    """A scratch for calls over w alone (a decoder sizes one shared scratch over all its slots instead)."""
    return SplitKScratch.zeros(*scratch_size(w, cfg), w.device)


@triton.jit
def _dense_splitk_kernel(w_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, part_ptr, count_ptr, N, K, eps,
                         MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """MODE 0 (RMSNORM): out = W @ (rmsnorm(a) * nw) [+ b]; 1 (RESIDUAL): out += W @ a; 2 (SILU_RESIDUAL):
    out += W @ (silu(a[:K]) * a[K:]). W [N, K] row-major, any float dtype."""
    wait_for_prior(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    # the weights first, so that the bulk of the bytes is in flight while the activation is prepared
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0.0)  # [BLOCK_N, BLOCK_K]
    a, ss = activation_slice(a_ptr, nw_ptr, cols, col_ok, K, MODE)  # [BLOCK_K], this slice's share of sum(x^2)
    partial = tl.sum(w.to(tl.float32) * a[None, :], axis=1)  # [BLOCK_N]
    fixup(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, count_ptr, w_ptr, b_ptr, out_ptr, N, K, eps,
          MODE, HAS_BIAS, False, SPLIT, SPLIT_P2, BLOCK_N)


def _check(w: torch.Tensor, scratch: SplitKScratch, cfg: DenseSplitKConfig,
           vectors: dict[str, tuple[torch.Tensor, int]]) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_contiguous() or w.dtype not in WEIGHT_DTYPES:
        raise ValueError(f"expected a contiguous 2-D float16/bfloat16/float32 weight, got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    if not isinstance(cfg, DenseSplitKConfig):
        raise ValueError(f"expected a DenseSplitKConfig, got {type(cfg).__name__}")
    if scratch.partial.device != w.device or scratch.count.device != w.device:
        raise ValueError(f"split-K scratch on {scratch.partial.device}, weights on {w.device}")
    check_call(w, scratch, scratch_size(w, cfg), cfg, vectors)


def _kernel_call(w, a, nw, bias, out, partial, count, n: int, k: int, eps: float, mode: int,
                 cfg: DenseSplitKConfig) -> tuple[tuple[int, int], tuple, dict]:
    """(grid, arguments, meta-parameters) of one launch. The pointer arguments are tensors, or their torch dtypes
    for `precompile` (Triton's warmup takes a dtype for a tensor)."""
    s = triton.cdiv(k, cfg.block_k)
    args = (w, a, nw if nw is not None else a, bias if bias is not None else out, out, partial, count, n, k, eps)
    meta = dict(MODE=mode, HAS_BIAS=bias is not None, SPLIT=s, SPLIT_P2=triton.next_power_of_2(s),
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=1, PDL=cfg.pdl,
                **launch_options(cfg.pdl))
    return (triton.cdiv(n, cfg.block_n), s), args, meta


def _launch(w: torch.Tensor, a: torch.Tensor, nw: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor,
            eps: float, mode: int, scratch: SplitKScratch, cfg: DenseSplitKConfig) -> torch.Tensor:
    n, k = w.shape
    grid, args, meta = _kernel_call(w, a, nw, bias, out, scratch.partial, scratch.count, n, k, eps, mode, cfg)
    _dense_splitk_kernel[grid](*args, **meta)
    return out


def precompile(n: int, k: int, cfg: DenseSplitKConfig, mode: int, dtype: torch.dtype, out_dtype: torch.dtype,
               bias_dtype: torch.dtype | None = None) -> None:
    """Compile (into Triton's cache, without launching) the kernel one call over an [n, k] weight of `dtype` with
    cfg takes (`mode` one of RMSNORM, RESIDUAL, SILU_RESIDUAL; the activation in `dtype`, the output in
    out_dtype), so that a sweep can fill the cache from a pool of processes first. Needs a GPU."""
    if mode not in (RMSNORM, RESIDUAL, SILU_RESIDUAL):
        raise ValueError(f"precompile: unknown mode {mode}")
    if bias_dtype is not None and mode != RMSNORM:
        raise ValueError("precompile: only rmsnorm_gemv takes a bias")
    grid, args, meta = _kernel_call(dtype, dtype, dtype if mode == RMSNORM else None, bias_dtype, out_dtype,
                                    torch.float32, torch.int32, n, k, 1e-5 if mode == RMSNORM else 0.0, mode, cfg)
    _dense_splitk_kernel.warmup(*args, grid=grid, **meta)


def rmsnorm_gemv(w: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 scratch: SplitKScratch, bias: torch.Tensor | None = None,
                 cfg: DenseSplitKConfig = DEFAULT) -> torch.Tensor:
    """w [N, K], x [K], norm_w [K], bias [N] or None -> out [N] = W @ (rmsnorm(x) * norm_w) [+ bias] (any float
    dtype: logits may be float32)."""
    n, k = w.shape
    vectors = dict(x=(x, k), norm_w=(norm_w, k), out=(out, n))
    if bias is not None:
        vectors["bias"] = (bias, n)
    _check(w, scratch, cfg, vectors)
    return _launch(w, x, norm_w, bias, out, eps, RMSNORM, scratch, cfg)


def gemv_residual(w: torch.Tensor, a: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                  cfg: DenseSplitKConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ a [K], in place."""
    n, k = w.shape
    _check(w, scratch, cfg, dict(a=(a, k), x=(x, n)))
    return _launch(w, a, None, None, x, 0.0, RESIDUAL, scratch, cfg)


def silu_gemv_residual(w: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                       cfg: DenseSplitKConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ (silu(gate_up[:K]) * gate_up[K:]), in place."""
    n, k = w.shape
    _check(w, scratch, cfg, dict(gate_up=(gate_up, 2 * k), x=(x, n)))
    return _launch(w, gate_up, None, None, x, 0.0, SILU_RESIDUAL, scratch, cfg)
