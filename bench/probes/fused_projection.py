"""The decode step's fused projections as the GEMV probes drive them (`bench.probes.fp8_splitk`, `dense_splitk`): the
fusion each projection takes, one call through projections.py as FusedDecoder.step makes it, its float64 reference,
and the error the probes report. `v` holds the vectors: `x` [K] (the input of qkv, o, gate_up, lm_head), `nw` [K]
(the RMSNorm weight), `gu` [2K] (down's gate and up), `r` [N] (o's and down's residual stream), `out` [N]."""

from __future__ import annotations

import torch

from graph_executor.kernels import projections
from graph_executor.kernels.gemv_fp8 import RESIDUAL, RMSNORM, SILU_RESIDUAL
from graph_executor.kernels.projections import ProjectionConfig

EPS = 1e-5


def mode(name: str) -> int:
    """The fusion the decoder uses for this projection."""
    return {"o": RESIDUAL, "down": SILU_RESIDUAL}.get(name, RMSNORM)


def call(name: str, w, v: dict, pc: ProjectionConfig, scratch) -> torch.Tensor:
    """The projection's fused GEMV through projections.py, as FusedDecoder.step calls it."""
    fused = mode(name)
    if fused == RMSNORM:
        return projections.rmsnorm_gemv(w, v["x"], v["nw"], EPS, v["out"], cfg=pc, scratch=scratch)
    if fused == RESIDUAL:
        return projections.gemv_residual(w, v["x"], v["r"], cfg=pc, scratch=scratch)
    return projections.silu_gemv_residual(w, v["gu"], v["r"], cfg=pc, scratch=scratch)


def reference(name: str, dense: torch.Tensor, v: dict) -> torch.Tensor:
    """float64 [N] on the weights' device: `dense` (the weights in float64, [N, K]) times the fused input."""
    d = {key: t.double() for key, t in v.items()}
    fused = mode(name)
    if fused == RMSNORM:
        return dense @ (d["x"] * d["nw"]) / torch.sqrt((d["x"] * d["x"]).mean() + EPS)
    if fused == RESIDUAL:
        return d["r"] + dense @ d["x"]
    k = dense.shape[1]
    g, u = d["gu"][:k], d["gu"][k:]
    return d["r"] + dense @ (g * torch.sigmoid(g) * u)


def error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max over elements of |got - ref| / max(|ref_i|, rms(ref)); inf if anything is not finite."""
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float(((got - ref).abs() / torch.maximum(ref.abs(), ref.pow(2).mean().sqrt())).max())
