"""bench.probes.packed_plans' plan syntax (the probe itself needs a GPU): `default`, `all=`, per projection, and a
one-line error for anything else."""

from __future__ import annotations

import pytest

from bench.probes.packed_plans import parse_plan
from graph_executor.fused_decoder import FP8_PLAN, INT4_PLAN, INT8_PLAN
from graph_executor.kernels.gemv_fp8 import Fp8Config
from graph_executor.kernels.gemv_splitk import SplitKConfig


def test_default_is_the_shipped_plan() -> None:
    assert parse_plan("default", INT4_PLAN) is INT4_PLAN


def test_all_sets_every_projection_and_keeps_the_other_fields() -> None:
    base = INT8_PLAN
    plan = parse_plan("all=64x32x2", base)
    for name in ("qkv", "o", "gate_up", "down", "lm_head"):
        cfg = getattr(plan, name)
        assert (cfg.block_n, cfg.block_kw, cfg.num_warps) == (64, 32, 2)
        assert (cfg.pdl, cfg.early) == (getattr(base, name).pdl, getattr(base, name).early)


def test_items_change_only_their_projection() -> None:
    plan = parse_plan("gate_up=128x32x4,down=16x64x2", INT4_PLAN)
    assert plan.gate_up == SplitKConfig(128, 32, 4)
    assert plan.down == SplitKConfig(16, 64, 2)
    assert (plan.qkv, plan.o, plan.lm_head) == (INT4_PLAN.qkv, INT4_PLAN.o, INT4_PLAN.lm_head)


def test_r_and_f_change_only_how_the_partials_are_added() -> None:
    fixup = parse_plan("all=f", INT4_PLAN)
    for name in ("qkv", "o", "gate_up", "down", "lm_head"):
        shipped, cfg = getattr(INT4_PLAN, name), getattr(fixup, name)
        assert not cfg.reduce_kernel
        assert cfg == SplitKConfig(shipped.block_n, shipped.block_kw, shipped.num_warps, shipped.pdl, shipped.early)
    assert parse_plan("o=r", fixup).o.reduce_kernel and not parse_plan("o=r", fixup).qkv.reduce_kernel
    assert parse_plan("down=16x128x8r", fixup).down == SplitKConfig(16, 128, 8, reduce_kernel=True)


def test_fp8_plans_change_the_split_k_projections_only() -> None:
    plan = parse_plan("all=f", FP8_PLAN)
    assert (plan.qkv, plan.o) == (FP8_PLAN.qkv, FP8_PLAN.o)  # fp16-kernel projections: no partials to add
    assert not any(getattr(plan, name).reduce_kernel for name in ("gate_up", "down", "lm_head"))
    assert parse_plan("down=32x256x4r", FP8_PLAN).down == Fp8Config(32, 256, 4, reduce_kernel=True)
    blocks = parse_plan("all=64x1024x8r", FP8_PLAN)
    assert blocks.gate_up == Fp8Config(64, 1024, 8, reduce_kernel=True) and blocks.qkv == FP8_PLAN.qkv
    with pytest.raises(SystemExit, match="qkv runs GemvConfig"):
        parse_plan("qkv=r", FP8_PLAN)


@pytest.mark.parametrize("text", ["up=32x64x4", "qkv=", "qkv=x", "o=rr", "qkv=32x64", "qkv=32x64x4x1", "qkv=ax64x4",
                                  "qkv", "qkv=32x64x4fr"])
def test_a_bad_item_is_one_line_naming_it(text: str) -> None:
    with pytest.raises(SystemExit, match="bad plan item") as err:
        parse_plan(text, INT4_PLAN)
    assert "\n" not in str(err.value)
