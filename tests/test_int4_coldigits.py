"""The column-layout int4 GEMV experiment (bench/probes/int4_coldigits.py: the activation's digits formed in the
codes tile's column layout) against a float64 matmul, every output checked, for the cases the shipped kernel's
tests use: ragged N and K, groups of 16 (no offset), 32 and 128 (several activation groups a weight group). On the
CPU under the Triton interpreter (dp4a emulated), on a GPU with the PTX dp4a."""

from __future__ import annotations

import pytest
import torch

from bench.probes.int4_coldigits import gemv_residual
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch
from tests.test_gemv_splitk import rel, weight

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("n,k,group,symmetric,cfg", [
    (40, 512, 32, False, SplitKConfig(32, 16, 4)),
    (37, 320, 16, True, SplitKConfig(16, 16, 2)),
    (32, 1024, 128, False, SplitKConfig(32, 64, 8)),
])
def test_column_digits_gemv_matches_float64(n: int, k: int, group: int, symmetric: bool, cfg: SplitKConfig) -> None:
    w = weight(4, n, k, group, symmetric, DEVICE, seed=n + k)
    g = torch.Generator().manual_seed(k)
    a = torch.randn(k, generator=g)
    a[5] = 40.0  # a large value in one group: that group's digits scale, the others keep theirs
    r = torch.randn(n, generator=g)
    scratch = SplitKScratch.allocate([w], [cfg], DEVICE)
    out = gemv_residual(w, a.to(DEVICE), r.clone().to(DEVICE), scratch, cfg)
    ref = r.double() + w.dequantize().double().cpu() @ a.double()
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-4
    assert int(scratch.count.abs().sum()) == 0  # the counters are reset for the next call
