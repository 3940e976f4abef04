"""The batch-1 decode step's GEMV config per projection for dense (fp16/bf16) weights: `gemv.GEMV_PLAN`'s kernels,
with down_proj on the split-K kernels of `gemv_dense_splitk.py` where that was measured to win.

Measured on an H200 (bench/NOTES.md, issue 12, seventeenth session; `bench.probes.dense_splitk`, 32 layers of
LLaMA-2-7B per graph, PDL on): down_proj (4096 x 11008) 2.99 TB/s on gemv.py's 16x512 against 3.55 TB/s split-K
16x1024 on 8 warps; o_proj did not gain (2.85 against 2.81 at best). The whole step 3.907 -> 3.830 ms at context
300 and 4.242 -> 4.143 at 2000. Smaller models' shapes (Llama-3.2-1B's down 2048 x 8192, SmolLM2's 576 x 1536)
are not measured yet (`device_session.sh densesplitk1b`): they keep gemv.py's kernels.
"""

from __future__ import annotations

import dataclasses

from graph_executor.kernels.gemv import GEMV_PLAN, GemvPlan
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig

DEFAULT_PLAN = dataclasses.replace(GEMV_PLAN, down=DenseSplitKConfig(16, 1024, 8))
SPLITK_DOWN_MIN_ROWS = 4096  # the down_proj rows (hidden size) from which DEFAULT_PLAN's down was measured to win


def plan_for(hidden_size: int) -> GemvPlan:
    """The decode plan for a model of this hidden size (down_proj's rows): DEFAULT_PLAN where it was measured to win,
    else gemv.py's kernels everywhere."""
    return DEFAULT_PLAN if hidden_size >= SPLITK_DOWN_MIN_ROWS else GEMV_PLAN
