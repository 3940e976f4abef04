"""Which prompts the prefill step runs through the multi-row GEMVs (kernels/gemv_rows.py: RMSNorm, SwiGLU and the
residual fused, K split over several programs) rather than cuBLAS plus separate row kernels, and with which config
per projection: one `ShortPromptConfigs` per padded row count (16, 32, 64). A prompt of more rows than the plan's
largest entry, and any packed weight, takes cuBLAS / the low-bit GEMM (kernels/projections.py).

Why (bench/NOTES.md, issue 12, twenty-second session): on an H200 a 10-token prefill of LLaMA-2-7B took 4.48 ms
(graph replay) against a 3.04 ms floor; its cuBLAS GEMMs read the weights at 3.05 (o_proj) to 3.83 TB/s (gate_up)
and the layer's 10 launches include RMSNorm twice, SwiGLU and two split-K reductions. The rows kernels read each
weight once with those fused: 6 launches a layer.
"""

from __future__ import annotations

import dataclasses

from graph_executor.kernels.gemv_rows import MAX_ROWS, RowsConfig, padded_rows


@dataclasses.dataclass(frozen=True)
class ShortPromptConfigs:
    """The multi-row GEMV config of each projection for one padded row count."""
    qkv: RowsConfig
    o: RowsConfig
    gate_up: RowsConfig
    down: RowsConfig

    def all(self) -> tuple[RowsConfig, ...]:
        return self.qkv, self.o, self.gate_up, self.down


@dataclasses.dataclass(frozen=True)
class ShortPromptPlan:
    """(padded rows, configs) pairs, ascending: a prompt of t rows takes the entry of padded_rows(t), if any."""
    by_rows: tuple[tuple[int, ShortPromptConfigs], ...] = ()

    def __post_init__(self) -> None:
        rows = [r for r, _ in self.by_rows]
        if rows != sorted(set(rows)) or any(r not in (16, 32, 64) or r > MAX_ROWS for r in rows):
            raise ValueError(f"ShortPromptPlan: padded row counts must be distinct, ascending, of 16, 32, 64; "
                             f"got {rows}")

    @property
    def max_rows(self) -> int:
        """The most prompt rows that take the multi-row GEMVs (0: none)."""
        return self.by_rows[-1][0] if self.by_rows else 0

    def configs(self, t: int) -> ShortPromptConfigs | None:
        """The configs for a prompt of t rows; None: cuBLAS."""
        if t < 1 or t > self.max_rows:
            return None
        return dict(self.by_rows).get(padded_rows(t))


CUBLAS_ONLY = ShortPromptPlan()

# Unmeasured starting point, before the H200 sweep (bench.probes.gemv_rows --rows 16,32,64): the verify step's 5-row
# choice for the wide projections (64 x 128, 4 warps, 3 stages) and K split 4 ways for the 4096-row ones, whose
# 64 row blocks alone would leave half the card idle.
_WIDE, _NARROW = RowsConfig(64, 128, 4, 3), RowsConfig(64, 128, 4, 3, split=4)
DEFAULT_PLAN = ShortPromptPlan(tuple((r, ShortPromptConfigs(qkv=_WIDE, o=_NARROW, gate_up=_WIDE, down=_NARROW))
                                     for r in (16, 32, 64)))

# (smallest hidden size, plan), largest first
MEASURED_PLANS: tuple[tuple[int, ShortPromptPlan], ...] = (
    (0, DEFAULT_PLAN),
)


def plan_for(hidden_size: int) -> ShortPromptPlan:
    """The short-prompt plan for a model of this hidden size: the one measured on the largest hidden size not
    above it."""
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    return next(plan for smallest, plan in MEASURED_PLANS if hidden_size >= smallest)
