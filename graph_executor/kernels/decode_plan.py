"""The batch-1 decode step's GEMV config per projection for dense (fp16/bf16) weights: `gemv.GEMV_PLAN`'s kernels,
with the projections that the split-K kernels of `gemv_dense_splitk.py` were measured to speed up moved onto them.

Measured on an H200 (`bench.probes.dense_splitk`: 32 layers per graph, PDL on, each projection's fp16 kernel against
every split-K block config, then the whole step with the winners; bench/NOTES.md, issue 12):
- LLaMA-2-7B (hidden 4096, seventeenth session): down_proj 4096 x 11008 2.99 TB/s on gemv.py's 16x512 against 3.55
  split-K 16x1024 on 8 warps; o_proj did not gain (2.85 against 2.81 at best). Step 3.907 -> 3.830 ms at context 300,
  4.242 -> 4.143 at 2000.
- Llama-3.2-1B (hidden 2048, eighteenth session): qkv 3072 x 2048 1.59 -> 1.86 TB/s (split-K 16x256, 4 warps), down
  2048 x 8192 2.01 -> 2.83 (32x512, 8 warps), o lost (1.91 -> 1.68). Step 1.047 -> 0.957 ms at context 300 (0.914x),
  1.101 -> 1.009 at 2000.
- SmolLM2-135M (hidden 576, eighteenth session): down 576 x 1536 0.47 -> 0.52 TB/s (32x256, 8 warps), o lost badly
  (0.42 -> 0.25). Step 0.621 -> 0.609 ms at context 300 (0.981x), 0.661 -> 0.646 at 2000.
A model takes the plan of the largest measured hidden size not above its own (Mistral and Llama-3-8B: 7B's; Qwen2-1.5B
and TinyLlama: 1B's; Qwen2-0.5B: SmolLM2's).
"""

from __future__ import annotations

import dataclasses

from graph_executor.kernels.gemv import GEMV_PLAN, GemvPlan
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig

# (smallest hidden size, plan), largest first
MEASURED_PLANS: tuple[tuple[int, GemvPlan], ...] = (
    (4096, dataclasses.replace(GEMV_PLAN, down=DenseSplitKConfig(16, 1024, 8))),
    (2048, dataclasses.replace(GEMV_PLAN, qkv=DenseSplitKConfig(16, 256, 4), down=DenseSplitKConfig(32, 512, 8))),
    (0, dataclasses.replace(GEMV_PLAN, down=DenseSplitKConfig(32, 256, 8))),
)
DEFAULT_PLAN = MEASURED_PLANS[0][1]  # LLaMA-2-7B's


def plan_for(hidden_size: int) -> GemvPlan:
    """The decode plan for a model of this hidden size: the one measured on the largest hidden size not above it."""
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    return next(plan for smallest, plan in MEASURED_PLANS if hidden_size >= smallest)
