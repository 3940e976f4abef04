"""One entry per projection kind of the fused steps, whatever the weight's storage: dense weights go to the
fp16 GEMVs (`gemv.py`, or the split-K ones of `gemv_dense_splitk.py` where the plan gives a `DenseSplitKConfig`) and
cuBLAS, `Int4Groups` and `Int8Groups` to the split-K dp4a GEMVs (`gemv_splitk.py`), FP8 rows to the split-K FP8
GEMVs (`gemv_fp8.py`), and packed weights in prefill to the low-bit GEMM (`gemm_lowbit.py`) for short prompts, to
cuBLAS over a dequantized copy for long ones (`matmul`). The fused decoder and prefill call
only these, so a model may mix formats per slot.

Each decode projection takes a `ProjectionConfig`: a block config per format, and packed weights a `SplitKScratch`
(the decoder owns one, sized by `decode_scratch_size`; without it a call allocates its own, which is fine outside
CUDA graphs). An FP8 slot whose config is a `GemvConfig` instead of an `Fp8Config` runs the fp16 GEMVs over its
codes with the row scale: the path before the split-K kernels, kept for comparison (bench/probes/fp8_splitk.py).

A dense split-K down_proj may leave the residual unsettled (`silu_gemv_pending`: no reduce kernel) for the next
layer's qkv and o_proj, or the lm_head, on gemv.py's kernels to settle (`pending=`; `on_gemv_kernels` says where).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from graph_executor.kernels import fp8_scaled_mm, gemm_lowbit, gemv, gemv_dense_splitk, gemv_fp8, gemv_splitk
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig
from graph_executor.kernels.gemv_fp8 import Fp8Config
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch
from graph_executor.kernels.l2_prefetch import L2Prefetch
from graph_executor.quant.formats import Fp8Rows, Int4Groups, Int8Groups
from graph_executor.quant.rows import Weight


@dataclass(frozen=True)
class ProjectionConfig:
    dense: gemv.GemvConfig | DenseSplitKConfig = gemv.DEFAULT  # a DenseSplitKConfig: the split-K dense kernels
    int4: SplitKConfig = gemv_splitk.DEFAULT
    int8: SplitKConfig = gemv_splitk.DEFAULT_INT8
    fp8: Fp8Config | gemv.GemvConfig = gemv_fp8.DEFAULT  # a GemvConfig: the fp16 kernels over the codes (old path)


def packed_config(w: Int4Groups | Int8Groups, plan: ProjectionConfig) -> SplitKConfig:
    """The split-K config a packed int4/int8 weight runs with."""
    return plan.int4 if isinstance(w, Int4Groups) else plan.int8


def decode_scratch_size(w: Weight, plan: ProjectionConfig) -> tuple[int, int]:
    """(float32 partials, int32 counters) of SplitKScratch a decode GEMV over this slot needs with this plan; (0, 0)
    for the kernels that need none (dense weights, FP8 through the fp16 kernels). A decoder's one scratch holds the
    largest of each over its slots."""
    if isinstance(w, (Int4Groups, Int8Groups)):
        cfg = packed_config(w, plan)
        return gemv_splitk.scratch_floats(w, cfg), triton.cdiv(w.shape[0], cfg.block_n)
    if isinstance(w, Fp8Rows) and isinstance(plan.fp8, Fp8Config):
        return gemv_fp8.scratch_size(w, plan.fp8)
    if isinstance(w, torch.Tensor) and isinstance(plan.dense, DenseSplitKConfig):
        return gemv_dense_splitk.scratch_size(w, plan.dense)
    return 0, 0


def _packed(w: Int4Groups | Int8Groups, plan: ProjectionConfig,
            scratch: SplitKScratch | None) -> tuple[SplitKConfig, SplitKScratch]:
    cfg = packed_config(w, plan)
    return cfg, scratch if scratch is not None else SplitKScratch.allocate([w], [cfg], w.device)


def _fp8(w: Fp8Rows, plan: ProjectionConfig, scratch: SplitKScratch | None) -> tuple[Fp8Config, SplitKScratch]:
    return plan.fp8, scratch if scratch is not None else gemv_fp8.allocate_scratch(w, plan.fp8)


def _dense_splitk(w: torch.Tensor, plan: ProjectionConfig,
                  scratch: SplitKScratch | None) -> tuple[DenseSplitKConfig, SplitKScratch]:
    return plan.dense, scratch if scratch is not None else gemv_dense_splitk.allocate_scratch(w, plan.dense)


def on_gemv_kernels(w: Weight, cfg: ProjectionConfig) -> bool:
    """Whether this slot runs gemv.py's kernels (dense weights on a GemvConfig): the ones that take a tail
    `prefetch` and settle an unsettled residual (`pending=`)."""
    return isinstance(w, torch.Tensor) and isinstance(cfg.dense, gemv.GemvConfig)


def _check_prefetch(w: Weight, cfg: ProjectionConfig, prefetch: L2Prefetch | None) -> None:
    if prefetch is not None and not on_gemv_kernels(w, cfg):
        raise ValueError("a tail L2 prefetch rides only on gemv.py's kernels (dense weights on a GemvConfig)")


def pending_source_ok(w: Weight, cfg: ProjectionConfig) -> bool:
    """Whether a down_proj can leave the residual unsettled (`silu_gemv_pending`): dense weights on the split-K
    kernels with a reduce kernel (whose work then moves into the next kernels)."""
    return isinstance(w, torch.Tensor) and isinstance(cfg.dense, DenseSplitKConfig) and cfg.dense.reduce_kernel


def _check_pending(w: Weight, cfg: ProjectionConfig, pending: gemv.PendingResidual | None) -> None:
    if pending is not None and not on_gemv_kernels(w, cfg):
        raise ValueError("an unsettled residual is settled only by gemv.py's kernels (dense weights on a GemvConfig)")


def rmsnorm_gemv(w: Weight, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 bias: torch.Tensor | None = None, cfg: ProjectionConfig = ProjectionConfig(),
                 scratch: SplitKScratch | None = None, prefetch: L2Prefetch | None = None,
                 pending: gemv.PendingResidual | None = None) -> torch.Tensor:
    """out [N] = W @ (rmsnorm(x [K]) * norm_w) [+ bias]. `prefetch` (`on_gemv_kernels` slots only): weights the
    kernel's programs ask L2 for once their rows are done (kernels/l2_prefetch.py). `pending` (`on_gemv_kernels` slots
    only): x is unsettled (gemv.PendingResidual)."""
    _check_prefetch(w, cfg, prefetch)
    _check_pending(w, cfg, pending)
    if isinstance(w, (Int4Groups, Int8Groups)):
        c, sc = _packed(w, cfg, scratch)
        return gemv_splitk.rmsnorm_gemv(w, x, norm_w, eps, out, sc, bias, c)
    if isinstance(w, Fp8Rows) and isinstance(cfg.fp8, gemv.GemvConfig):
        return gemv.rmsnorm_gemv(w.codes, x, norm_w, eps, out, bias, cfg.fp8, row_scale=w.scale)
    if isinstance(w, Fp8Rows):
        c, sc = _fp8(w, cfg, scratch)
        return gemv_fp8.rmsnorm_gemv(w, x, norm_w, eps, out, sc, bias, c)
    if isinstance(cfg.dense, DenseSplitKConfig):
        c, sc = _dense_splitk(w, cfg, scratch)
        return gemv_dense_splitk.rmsnorm_gemv(w, x, norm_w, eps, out, sc, bias, c)
    return gemv.rmsnorm_gemv(w, x, norm_w, eps, out, bias, cfg.dense, prefetch=prefetch, pending=pending)


def gemv_residual(w: Weight, a: torch.Tensor, x: torch.Tensor, cfg: ProjectionConfig = ProjectionConfig(),
                  scratch: SplitKScratch | None = None, prefetch: L2Prefetch | None = None,
                  pending: gemv.PendingResidual | None = None) -> torch.Tensor:
    """x [N] += W @ a [K]. `prefetch`: as rmsnorm_gemv's. `pending` (`on_gemv_kernels` slots only): x is unsettled; the
    call settles it."""
    _check_prefetch(w, cfg, prefetch)
    _check_pending(w, cfg, pending)
    if isinstance(w, (Int4Groups, Int8Groups)):
        c, sc = _packed(w, cfg, scratch)
        return gemv_splitk.gemv_residual(w, a, x, sc, c)
    if isinstance(w, Fp8Rows) and isinstance(cfg.fp8, gemv.GemvConfig):
        return gemv.gemv_residual(w.codes, a, x, cfg.fp8, row_scale=w.scale)
    if isinstance(w, Fp8Rows):
        c, sc = _fp8(w, cfg, scratch)
        return gemv_fp8.gemv_residual(w, a, x, sc, c)
    if isinstance(cfg.dense, DenseSplitKConfig):
        c, sc = _dense_splitk(w, cfg, scratch)
        return gemv_dense_splitk.gemv_residual(w, a, x, sc, c)
    return gemv.gemv_residual(w, a, x, cfg.dense, prefetch=prefetch, pending=pending)


def silu_gemv_residual(w: Weight, gate_up: torch.Tensor, x: torch.Tensor,
                       cfg: ProjectionConfig = ProjectionConfig(),
                       scratch: SplitKScratch | None = None, prefetch: L2Prefetch | None = None) -> torch.Tensor:
    """x [N] += W @ (silu(gate_up[:K]) * gate_up[K:]). `prefetch`: as rmsnorm_gemv's."""
    _check_prefetch(w, cfg, prefetch)
    if isinstance(w, (Int4Groups, Int8Groups)):
        c, sc = _packed(w, cfg, scratch)
        return gemv_splitk.silu_gemv_residual(w, gate_up, x, sc, c)
    if isinstance(w, Fp8Rows) and isinstance(cfg.fp8, gemv.GemvConfig):
        return gemv.silu_gemv_residual(w.codes, gate_up, x, cfg.fp8, row_scale=w.scale)
    if isinstance(w, Fp8Rows):
        c, sc = _fp8(w, cfg, scratch)
        return gemv_fp8.silu_gemv_residual(w, gate_up, x, sc, c)
    if isinstance(cfg.dense, DenseSplitKConfig):
        c, sc = _dense_splitk(w, cfg, scratch)
        return gemv_dense_splitk.silu_gemv_residual(w, gate_up, x, sc, c)
    return gemv.silu_gemv_residual(w, gate_up, x, cfg.dense, prefetch=prefetch)


def silu_gemv_pending(w: Weight, gate_up: torch.Tensor, x: torch.Tensor, cfg: ProjectionConfig,
                      scratch: SplitKScratch | None = None) -> gemv.PendingResidual:
    """silu_gemv_residual leaving x unsettled (`pending_source_ok` slots only): the partial sums stay in the
    scratch for the next kernels that read x (`pending=`)."""
    if not pending_source_ok(w, cfg):
        raise ValueError("only a dense down_proj on the split-K kernels with a reduce kernel leaves x unsettled")
    c, sc = _dense_splitk(w, cfg, scratch)
    return gemv_dense_splitk.silu_gemv_pending(w, gate_up, x, sc, c)


@dataclass(frozen=True)
class DequantizeRows:
    """Prompt rows from which a packed weight, per format, is dequantized to x's dtype (a temporary the size of one
    projection) for cuBLAS, rather than multiplied by the low-bit GEMM (`matmul`).

    The defaults, measured on an H200 (LLaMA-2-7B shapes): int4 from bench/probes/lowbit_gemm_swap.py (the low-bit
    GEMM 0.17 ms a layer at 64 rows against 0.28 for dequantize + cuBLAS, both 0.30 at 128); int8 and FP8 from whole
    prefill steps (bench/probes/dequantize_rows.py, 2026-12-02): at 128 rows the GEMM is faster for int8 (9.65
    against 10.55 ms) and FP8 (7.27 against 10.37: FP8 codes convert in one instruction), at 192 only for FP8 (10.05
    against 11.21), at 256 for neither (13.16 against 12.27); int4 at 128 10.20 dequantized against 11.46. The prefill
    buckets step by 32 rows: the interpolated crossings (~146 and ~228 rows) put int8's switch at 160, FP8's at 224."""

    int4: int = 128
    int8: int = 160
    fp8: int = 224

    def for_weight(self, w: Weight) -> int:
        return self.int4 if isinstance(w, Int4Groups) else self.int8 if isinstance(w, Int8Groups) else self.fp8


DEQUANTIZE_ROWS = DequantizeRows()


def prefill_scratch(weights: list[Weight], max_tokens: int, device: torch.device,
                    dequantize_rows: DequantizeRows = DEQUANTIZE_ROWS) -> SplitKScratch | None:
    """The scratch `matmul` needs for any prompt of up to max_tokens rows over any of these weights (None when none
    is packed): the prefill step owns one, so that its CUDA graphs allocate nothing."""
    shapes = {(tuple(w.shape), dequantize_rows.for_weight(w)) for w in weights if not isinstance(w, torch.Tensor)}
    if not shapes:
        return None
    floats = counters = 0
    for (n, k), rows in shapes:
        for t in range(1, min(max_tokens, rows - 1) + 1):
            f, c = gemm_lowbit.scratch_size(t, n, k, gemm_lowbit.default_config(t, n, k))
            floats, counters = max(floats, f), max(counters, c)
    return SplitKScratch.zeros(floats, counters, device)


def matmul(x: torch.Tensor, w: Weight, out: torch.Tensor, bias: torch.Tensor | None = None,
           accumulate: bool = False, scratch: SplitKScratch | None = None,
           fp8_scaled_mm_rows: int | None = None, dequantize_rows: DequantizeRows = DEQUANTIZE_ROWS) -> torch.Tensor:
    """Prefill projection: out [T, N] = x [T, K] @ W^T (+ bias), or out += x @ W^T (a residual add). A packed w
    below `dequantize_rows` rows (its format's) takes the low-bit GEMM with `scratch` (see prefill_scratch).
    `fp8_scaled_mm_rows`: from this many rows an FP8 weight takes the FP8 tensor cores with the rows quantized per token
    (`fp8_scaled_mm.matmul`: W8A8) instead; None: never."""
    if fp8_scaled_mm_rows is not None and isinstance(w, Fp8Rows) and x.shape[0] >= fp8_scaled_mm_rows:
        return fp8_scaled_mm.matmul(x, w, out, bias=bias, accumulate=accumulate)
    if not isinstance(w, torch.Tensor):
        if x.shape[0] < dequantize_rows.for_weight(w):
            return gemm_lowbit.gemm(x, w, out, bias=bias, accumulate=accumulate, scratch=scratch)
        w = gemm_lowbit.dequantize(w, torch.empty(w.shape, dtype=x.dtype, device=x.device))  # [N, K]
    if accumulate:
        return out.addmm_(x, w.t())
    if bias is not None:
        return torch.addmm(bias, x, w.t(), out=out)
    return torch.mm(x, w.t(), out=out)


def embedding(w: Weight, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [T, H] = rows `ids` [T] of the embedding table."""
    if isinstance(w, torch.Tensor):
        return torch.index_select(w, 0, ids, out=out)
    return gemm_lowbit.embedding(w, ids, out)
