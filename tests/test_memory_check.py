"""The fit check that loading runs before allocating: weights + KV cache + headroom against free memory."""

from __future__ import annotations

import pytest
import torch

from graph_executor.loading.presets import preset
from graph_executor.memory import HEADROOM_BYTES, check_fits, needed_bytes, required_bytes
from ipc.errors import ModelLoadError


def test_check_fits_at_the_boundary() -> None:
    cfg = preset("llama-2-7b")
    weights, kv = needed_bytes(cfg, torch.float16, 4096)
    need = weights + kv + HEADROOM_BYTES
    assert required_bytes(cfg, torch.float16, 4096) == need
    cpu = torch.device("cpu")
    check_fits("m", cfg, torch.float16, 4096, cpu, available=need)  # exactly enough
    expected = r"m \(float16\) does not fit on cpu: it needs about 14\.8 GiB \(weights 12\.6 GiB \+ KV cache for 4096"
    with pytest.raises(ModelLoadError, match=expected):
        check_fits("m", cfg, torch.float16, 4096, cpu, available=need - 1)
