"""bench.probes.persistent_splitk under the Triton interpreter: its tiles, taken by fewer programs than tiles in a
loop, give the shipped split-K call's output bit for bit (same per-tile arithmetic, same partials, same reduce)."""

from __future__ import annotations

import pytest
import torch

from bench.probes.persistent_splitk import persistent_gemv
from bench.probes.tiled_int4 import launch, random_packed
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch, scratch_floats

CPU = torch.device("cpu")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("tiled", [False, True])
def test_the_persistent_loop_writes_what_the_split_k_call_writes(bits: int, mode: int, tiled: bool) -> None:
    torch.manual_seed(bits * 10 + mode)
    n, k = 96, 512  # 3 row blocks x 2 K slices of 32 x 64 words (int4) / 4 slices (int8): 6-12 tiles, 5 programs
    w = random_packed(bits, n, k, CPU)
    if tiled:
        w = w.tiled((32, 64))
    a = torch.randn(2 * k if mode == 2 else k)
    nw = torch.rand(k) + 0.5
    init = torch.randn(n)
    cfg = SplitKConfig(32, 64, 4, reduce_kernel=True)
    want = init.clone()
    launch(w, a, nw, want, mode, SplitKScratch.zeros(scratch_floats(w, cfg), 3, CPU), cfg)
    got = init.clone()
    persistent_gemv(w, a, nw if mode == 0 else None, got, mode, (32, 64, 4, 2), SplitKScratch.zeros(
        scratch_floats(w, cfg), 1, CPU), programs=5)
    assert not torch.equal(want, init)
    assert torch.equal(got, want)
