"""The short-prompt plan (graph_executor/kernels/prefill_plan.py): which prompts take the multi-row GEMVs, per model
size, and the plan's checks. The kernels themselves: tests/test_gemv_rows.py; the prefill step with them against
the model's forward: tests/test_kernels.py."""

from __future__ import annotations

import pytest

from graph_executor.kernels.gemv_rows import RowsConfig
from graph_executor.kernels.prefill_plan import (
    CUBLAS_ONLY,
    DEFAULT_PLAN,
    ShortPromptConfigs,
    ShortPromptPlan,
    plan_for,
    with_pdl,
)


def test_plan_per_model_size() -> None:
    assert plan_for(4096) is DEFAULT_PLAN and plan_for(5120) is DEFAULT_PLAN  # LLaMA-2-7B's measurement and up
    assert plan_for(2048) is CUBLAS_ONLY and plan_for(3584) is CUBLAS_ONLY  # Llama-3.2-1B's: cuBLAS was faster
    small = plan_for(576)  # SmolLM2-135M's: the 7B configs with PDL
    assert small == with_pdl(DEFAULT_PLAN) and all(c.pdl for c in small.configs(16).all())
    assert not any(c.pdl for c in with_pdl(small, False).configs(16).all())
    with pytest.raises(ValueError, match="hidden_size"):
        plan_for(0)


def test_which_prompts_take_the_rows() -> None:
    assert DEFAULT_PLAN.max_rows == 16 and CUBLAS_ONLY.max_rows == 0
    assert DEFAULT_PLAN.configs(1) is DEFAULT_PLAN.configs(16) is not None
    assert DEFAULT_PLAN.configs(17) is None and DEFAULT_PLAN.configs(0) is None and CUBLAS_ONLY.configs(5) is None
    c = ShortPromptConfigs(*[RowsConfig(16, 64)] * 4)
    gap = ShortPromptPlan(((16, c), (64, c)))  # 17..32 rows pad to 32: no entry, cuBLAS
    assert gap.configs(20) is None and gap.configs(40) is c and gap.max_rows == 64


@pytest.mark.parametrize("rows", [(32, 16), (16, 16), (8,), (128,)])
def test_plan_refuses_bad_row_counts(rows) -> None:
    c = ShortPromptConfigs(*[RowsConfig(16, 64)] * 4)
    with pytest.raises(ValueError, match="padded row counts"):
        ShortPromptPlan(tuple((r, c) for r in rows))
