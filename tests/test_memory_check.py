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


def test_a_default_slot_count_falls_back_to_what_fits_and_a_chosen_one_fails(capsys) -> None:
    from graph_executor.loading.load_config import LoadConfig
    from graph_executor.loading.loader import _fitting_slots

    cfg = preset("llama-2-7b")
    cpu = torch.device("cpu")
    two = required_bytes(cfg, torch.float16, 4096, slots=2)  # room for 2 slots, not 4
    default = LoadConfig(model="dummy:llama-2-7b", device="cpu", max_num_seqs=4, fit_slots=True)
    assert _fitting_slots(default, cfg, torch.float16, 4096, cpu, None, available=two) == 2
    assert "4 KV caches of 4096 tokens do not fit next to dummy:llama-2-7b: serving 2 sequences" in capsys.readouterr().err
    assert _fitting_slots(default, cfg, torch.float16, 4096, cpu, None,
                          available=required_bytes(cfg, torch.float16, 4096, slots=4)) == 4
    with pytest.raises(ModelLoadError, match="x 4 sequences .* try a smaller --max-context, --max-num-seqs or"):
        chosen = LoadConfig(model="dummy:llama-2-7b", device="cpu", max_num_seqs=4)
        _fitting_slots(chosen, cfg, torch.float16, 4096, cpu, None, available=two)
    with pytest.raises(ModelLoadError, match="for 4096 tokens 2.0 GiB"):  # not even one: the one-slot error
        _fitting_slots(default, cfg, torch.float16, 4096, cpu, None, available=two // 2)
