"""bench.probes.step_variants' variant parser: flags and per-projection gemv.py configs (the probe needs a GPU)."""

import pytest

from bench.probes.step_variants import parse_variant
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig


def test_flags_and_projection_configs():
    variant = parse_variant("dd=1,qkv=8x1024x4,lm_head=16x512x4x2,down=s32x256x8")
    assert variant == {"fused": 1, "dd": 1, "qkv": GemvConfig(8, 1024, 4), "lm_head": GemvConfig(16, 512, 4, 2),
                       "down": DenseSplitKConfig(32, 256, 8, reduce_kernel=True)}


@pytest.mark.parametrize("text", ["qkv=8x1024", "qkv=8x0x4", "o=1", "split=a", "bogus=1", "warps=2x2x2",
                                  "down=s32x256x8x2", "down=sx256x8", "qkv=3x1000x4", "down=s3x256x8",
                                  "qkv=8x1024x4,qkv=16x1024x8"])
def test_bad_items_are_refused(text):
    with pytest.raises(SystemExit, match="bad variant item"):
        parse_variant(text)
