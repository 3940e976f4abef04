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
once), and the grid is N / BLOCK_N x K / BLOCK_K programs: the FP8 kernel itself without its row scale
(`gemv_fp8.launch_rows`). The partial sums go to the float32 scratch of gemv_splitk (`SplitKScratch`), and the last
program of a row block adds them in order (`gemv_splitk.fixup`): deterministic, graph-safe, the scratch left clean. Whether it beats gemv.py per projection is the card's to say
(bench/probes/dense_splitk.py); `GemvPlan` takes either config per projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from graph_executor.kernels.gemv import PendingResidual
from graph_executor.kernels.gemv_fp8 import (
    RESIDUAL,
    RMSNORM,
    SILU_RESIDUAL,
    check_block_config,
    compile_rows,
    launch_rows,
)
from graph_executor.kernels.gemv_splitk import SplitKScratch, check_call, splitk_floats

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class DenseSplitKConfig:
    block_n: int = 16  # output rows per program
    block_k: int = 1024  # weights along K per program: the K slice
    num_warps: int = 4
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)
    early: bool = False  # load the weights before waiting for the previous kernel (pdl.with_early_weights)
    reduce_kernel: bool = False  # the partials added by a second kernel (gemv_splitk.SplitKConfig.reduce_kernel)

    def __post_init__(self) -> None:
        check_block_config(self)


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


def _launch(w: torch.Tensor, a: torch.Tensor, nw: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor,
            eps: float, mode: int, scratch: SplitKScratch, cfg: DenseSplitKConfig) -> torch.Tensor:
    return launch_rows(w, None, a, nw, bias, out, eps, mode, scratch, cfg)


def precompile(n: int, k: int, cfg: DenseSplitKConfig, mode: int, dtype: torch.dtype, out_dtype: torch.dtype,
               bias_dtype: torch.dtype | None = None) -> None:
    """Compile (into Triton's cache, without launching) the kernel one call over an [n, k] weight of `dtype` with
    cfg takes (`mode` one of RMSNORM, RESIDUAL, SILU_RESIDUAL; the activation in `dtype`, the output in
    out_dtype), so that a sweep can fill the cache from a pool of processes first. Needs a GPU."""
    compile_rows(n, k, cfg, mode, dtype, False, dtype, out_dtype, bias_dtype)


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


def silu_gemv_pending(w: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                      cfg: DenseSplitKConfig) -> PendingResidual:
    """silu_gemv_residual's first kernel alone (cfg.reduce_kernel): x [N] is left unsettled, its partial sums in
    scratch until the next kernels that read x add them (gemv.rmsnorm_gemv / gemv_residual with `pending`); nothing
    else may use the scratch before they have run."""
    if not cfg.reduce_kernel:
        raise ValueError("a pending residual needs a config with reduce_kernel (the fixup adds the partials itself)")
    n, k = w.shape
    _check(w, scratch, cfg, dict(gate_up=(gate_up, 2 * k), x=(x, n)))
    launch_rows(w, None, gate_up, None, None, x, 0.0, SILU_RESIDUAL, scratch, cfg, reduce=False)
    return PendingResidual(scratch.partial, split(w, cfg))
