"""The multi-row GEMVs of the verify step (graph_executor/kernels/gemv_rows.py) against float64, every element
checked, outputs poisoned first: the three fusions, 1..16 token rows, N and K not multiples of the blocks, a bias,
float32 (exact products) and float16 weights, rows written with a stride. On CPU under the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graph_executor.kernels.gemv_rows import (  # noqa: E402
    RowsConfig,
    gemv_residual_rows,
    rmsnorm_gemv_rows,
    silu_gemv_residual_rows,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5
CASES = [  # rows T, N, K, config, dtype
    (1, 40, 96, RowsConfig(16, 32, 2, 1), torch.float32),
    (5, 70, 200, RowsConfig(32, 64, 4, 2), torch.float32),
    (9, 33, 130, RowsConfig(16, 128, 4, 1), torch.float16),
    (16, 64, 256, RowsConfig(64, 64, 4, 2), torch.float16),
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

    normed = d["x"] * torch.rsqrt(d["x"].pow(2).mean(-1, keepdim=True) + EPS) * d["nw"]
    out = torch.full((t, n), float("nan"), device=DEVICE, dtype=torch.float32)  # float32 out, as the logits
    check(rmsnorm_gemv_rows(on["w"], on["x"], on["nw"], EPS, out, bias=on["b"], cfg=cfg),
          normed @ d["w"].T + d["b"], tol)

    wide = torch.full((t, n + 8), float("nan"), device=DEVICE, dtype=dtype)  # rows written with a stride
    wide[:, :n] = on["r"]
    gemv_residual_rows(on["w"], on["x"], wide[:, :n], cfg=cfg)
    check(wide[:, :n], d["r"] + d["x"] @ d["w"].T, tol)
    assert torch.isnan(wide[:, n:].float()).all()  # nothing written past the rows

    g, u = d["gu"][:, :k], d["gu"][:, k:]
    x2 = on["r"].clone()
    silu_gemv_residual_rows(on["w"], on["gu"], x2, cfg=cfg)
    check(x2, d["r"] + (g * torch.sigmoid(g) * u) @ d["w"].T, tol)


def test_gemv_rows_refuse_bad_shapes() -> None:
    w = torch.zeros(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="T <= 16"):
        gemv_residual_rows(w, torch.zeros(17, 64, device=DEVICE), torch.zeros(17, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T <= 16, 128\]"):
        silu_gemv_residual_rows(w, torch.zeros(3, 64, device=DEVICE), torch.zeros(3, 32, device=DEVICE))
    with pytest.raises(ValueError, match="power-of-two"):
        RowsConfig(8, 128)
