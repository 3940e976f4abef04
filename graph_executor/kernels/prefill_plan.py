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

# Measured on an H200 (twenty-second session; `bench.probes.gemv_rows --rows 16,32,64`: 14 block configs x splits
# 1/2/4/8 per projection over 32 layers' weights, then `bench.probes.prefill_rows`: the whole prefill step as a CUDA
# graph, 5 alternating rounds; bench/results/2026-12-02-h200-short-prompts/). LLaMA-2-7B, 16 rows: 4.451 ms with
# cuBLAS against 4.277 with these (0.961x); each kernel reads at about cuBLAS's rate plus its row kernel's
# (qkv 3.40 TB/s, o 2.73, gate_up 3.77, down 3.01), so the gain is the four launches a layer fewer. At 32 rows
# the same kernels were 1.014x cuBLAS's step and at 64 rows 1.22x (the sweep's best per projection read at 0.68-0.86x
# cuBLAS's rate there): those take cuBLAS.
ROWS_16 = ShortPromptConfigs(qkv=RowsConfig(64, 64, 4, 4, split=2), o=RowsConfig(64, 128, 4, 4, split=2),
                              gate_up=RowsConfig(64, 64, 4, 4), down=RowsConfig(128, 64, 8, 3, split=8))
DEFAULT_PLAN = ShortPromptPlan(((16, ROWS_16),))


def with_pdl(plan: ShortPromptPlan, pdl: bool = True) -> ShortPromptPlan:
    """The plan with every config launched with (or without) programmatic dependent launch (kernels/pdl.py); the
    prefill step's RoPE kernel follows qkv's config."""
    return ShortPromptPlan(tuple((rows, ShortPromptConfigs(*(dataclasses.replace(c, pdl=pdl) for c in configs.all())))
                                 for rows, configs in plan.by_rows))


# (smallest hidden size, plan), largest first. The 7B configs on smaller models (prefill_rows, same session, 16 rows):
# Llama-3.2-1B shape 1.034x cuBLAS's step (1.030x with PDL): cuBLAS; SmolLM2-135M 1.036x, with PDL 0.934x (0.976 ->
# 0.911 ms; 7B with PDL 0.984x, worse than without): taken below hidden 2048 once the GGUF identity tests (batching,
# prefix reuse, packed model, speculation: 12 passed) had run with it on the card.
MEASURED_PLANS: tuple[tuple[int, ShortPromptPlan], ...] = (
    (4096, DEFAULT_PLAN),
    (2048, CUBLAS_ONLY),
    (0, with_pdl(DEFAULT_PLAN)),
)


def plan_for(hidden_size: int) -> ShortPromptPlan:
    """The short-prompt plan for a model of this hidden size: the one measured on the largest hidden size not
    above it."""
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    return next(plan for smallest, plan in MEASURED_PLANS if hidden_size >= smallest)
