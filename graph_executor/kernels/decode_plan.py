"""The batch-1 decode step's GEMV config per projection for dense (fp16/bf16) weights: `gemv.GEMV_PLAN`'s kernels,
with down_proj on the split-K kernels of `gemv_dense_splitk.py`.

Measured on an H200 (bench/NOTES.md, issue 12, seventeenth session; `bench.probes.dense_splitk`, 32 layers of
LLaMA-2-7B per graph, PDL on): down_proj (4096 x 11008) 2.99 TB/s on gemv.py's 16x512 against 3.55 TB/s split-K
16x1024 on 8 warps; o_proj did not gain (2.85 against 2.81 at best). The whole step 3.907 -> 3.830 ms at context
300 and 4.242 -> 4.143 at 2000.
"""

from __future__ import annotations

import dataclasses

from graph_executor.kernels.gemv import GEMV_PLAN
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig

DEFAULT_PLAN = dataclasses.replace(GEMV_PLAN, down=DenseSplitKConfig(16, 1024, 8))
