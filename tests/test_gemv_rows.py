"""The multi-row GEMVs of the verify step (graph_executor/kernels/gemv_rows.py) against float64, every element
checked, outputs poisoned first: the three fusions, 1..64 token rows, K split over several programs or not, N and K not multiples of the blocks, a bias,
float32 (exact products) and float16 weights, rows written with a stride. On CPU under the Triton interpreter."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graph_executor.kernels.gemv_rows import (  # noqa: E402
    RowsConfig,
    gemv_residual_rows,
    rmsnorm_gemv_rows,
    scratch_size,
    silu_gemv_residual_rows,
)
from graph_executor.kernels.gemv_splitk import SplitKScratch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5
CASES = [  # rows T, N, K, config, dtype
    (1, 40, 96, RowsConfig(16, 32, 2, 1), torch.float32),
    (5, 70, 200, RowsConfig(32, 64, 4, 2), torch.float32),
    (9, 33, 130, RowsConfig(16, 128, 4, 1), torch.float16),
    (16, 64, 256, RowsConfig(64, 64, 4, 2), torch.float16),
    # split along K: the partials' fixup, a last slice shorter than the others, 32- and 64-row paddings
    (3, 50, 200, RowsConfig(16, 32, 2, 1, split=3), torch.float32),
    (21, 40, 96, RowsConfig(32, 16, 4, 1, split=4), torch.float32),
    (64, 48, 130, RowsConfig(16, 64, 4, 2, split=2), torch.float16),
]


def check(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Every element within tol of the reference's scale (|ref_i| or the rms of the row, whichever is larger)."""
    got = out.double().cpu()
    scale = torch.maximum(ref.abs(), ref.pow(2).mean(-1, keepdim=True).sqrt())
    assert torch.isfinite(got).all()
    worst = float(((got - ref).abs() / scale).max())
    assert worst <= tol, worst


@pytest.mark.parametrize("t,n,k,cfg,dtype", CASES)
def test_gemv_rows_match_float64(t, n, k, cfg, dtype) -> None:
    gen = torch.Generator().manual_seed(t * 1000 + n)
    w, x, nw, b = (torch.randn(*s, generator=gen) for s in ((n, k), (t, k), (k,), (n,)))
    gu, r = torch.randn(t, 2 * k, generator=gen), torch.randn(t, n, generator=gen)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    d = {name: v.to(dtype).double() for name, v in dict(w=w, x=x, nw=nw, b=b, gu=gu, r=r).items()}
    on = {name: v.to(DEVICE, dtype) for name, v in dict(w=w, x=x, nw=nw, b=b, gu=gu, r=r).items()}
    scratch = SplitKScratch.zeros(*scratch_size(t, n, k, cfg), DEVICE)  # one for the three calls, as a step shares

    normed = d["x"] * torch.rsqrt(d["x"].pow(2).mean(-1, keepdim=True) + EPS) * d["nw"]
    out = torch.full((t, n), float("nan"), device=DEVICE, dtype=torch.float32)  # float32 out, as the logits
    check(rmsnorm_gemv_rows(on["w"], on["x"], on["nw"], EPS, out, bias=on["b"], cfg=cfg, scratch=scratch),
          normed @ d["w"].T + d["b"], tol)

    wide = torch.full((t, n + 8), float("nan"), device=DEVICE, dtype=dtype)  # rows written with a stride
    wide[:, :n] = on["r"]
    gemv_residual_rows(on["w"], on["x"], wide[:, :n], cfg=cfg, scratch=scratch)
    check(wide[:, :n], d["r"] + d["x"] @ d["w"].T, tol)
    assert torch.isnan(wide[:, n:].float()).all()  # nothing written past the rows

    g, u = d["gu"][:, :k], d["gu"][:, k:]
    x2 = on["r"].clone()
    silu_gemv_residual_rows(on["w"], on["gu"], x2, cfg=cfg, scratch=scratch)
    check(x2, d["r"] + (g * torch.sigmoid(g) * u) @ d["w"].T, tol)
    assert not scratch.count.any()  # every split call left its counters at zero for the next call (or replay)


@pytest.mark.parametrize("t,n,k,cfg,dtype", [c for c in CASES if c[3].split > 1])
def test_a_reduce_kernel_gives_the_fixups_bits(t, n, k, cfg, dtype) -> None:
    """RowsConfig(reduce_kernel=True): the partials added by `_reduce_rows_kernel` give `_fixup_rows`' bits, each
    fusion (bias, strided rows), and the counters stay zero."""
    gen = torch.Generator().manual_seed(t * 7 + n)
    w, x, nw, b = (torch.randn(*s, generator=gen).to(DEVICE, dtype) for s in ((n, k), (t, k), (k,), (n,)))
    gu, r = torch.randn(t, 2 * k, generator=gen).to(DEVICE, dtype), torch.randn(t, n, generator=gen).to(DEVICE, dtype)
    results = []
    for reduce_kernel in (False, True):
        c = dataclasses.replace(cfg, reduce_kernel=reduce_kernel)
        scratch = SplitKScratch.zeros(*scratch_size(t, n, k, c), DEVICE)
        out = torch.full((t, n), float("nan"), device=DEVICE, dtype=torch.float32)
        rmsnorm_gemv_rows(w, x, nw, EPS, out, bias=b, cfg=c, scratch=scratch)
        wide = torch.full((t, n + 8), float("nan"), device=DEVICE, dtype=dtype)
        wide[:, :n] = r
        gemv_residual_rows(w, x, wide[:, :n], cfg=c, scratch=scratch)
        x2 = silu_gemv_residual_rows(w, gu, r.clone(), cfg=c, scratch=scratch)
        results.append((out, wide, x2))
        assert not scratch.count.any()
    for fixed_up, reduced in zip(*results):
        assert torch.equal(fixed_up.isnan(), reduced.isnan())
        assert torch.equal(fixed_up.nan_to_num(), reduced.nan_to_num())


def test_gemv_rows_refuse_bad_shapes() -> None:
    w = torch.zeros(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="T <= 64"):
        gemv_residual_rows(w, torch.zeros(65, 64, device=DEVICE), torch.zeros(65, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T <= 64, 128\]"):
        silu_gemv_residual_rows(w, torch.zeros(3, 64, device=DEVICE), torch.zeros(3, 32, device=DEVICE))
    with pytest.raises(ValueError, match="power-of-two"):
        RowsConfig(8, 128)
    with pytest.raises(ValueError, match="split >= 1"):
        RowsConfig(16, 128, split=0)
    with pytest.raises(ValueError, match="need a scratch of"):  # a split call given a scratch too small
        gemv_residual_rows(w, torch.zeros(3, 64, device=DEVICE), torch.zeros(3, 32, device=DEVICE),
                           cfg=RowsConfig(16, 16, split=2), scratch=SplitKScratch.zeros(1, 1, DEVICE))
