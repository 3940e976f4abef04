"""The GEMVs with `early` set (their weights loaded before the wait for the previous kernel: kernels/pdl.py
`with_early_weights`) give the same bits as without, for every kernel family of the decode step (gemv.py's, whose
first K chunk is then peeled off the loop, the dense and FP8 split-K rows kernel, the int4/int8 split-K kernel), the
three fusions, K shorter than, equal to and not a multiple of the chunk; gemv.py's also against float64; and a whole
decode step. Under TRITON_INTERPRET=1 on a machine without a GPU (there PDL is off: the wait is a no-op, and what is
checked is that the reordered and peeled code computes the same thing)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.kernels import gemv, gemv_dense_splitk, gemv_fp8, gemv_splitk  # noqa: E402
from graph_executor.kernels.gemv import GemvConfig, GemvPlan  # noqa: E402
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig  # noqa: E402
from graph_executor.kernels.gemv_fp8 import Fp8Config  # noqa: E402
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch  # noqa: E402
from graph_executor.kernels.pdl import with_early_weights  # noqa: E402
from graph_executor.quant.formats import quantize_fp8, quantize_int4, quantize_int8  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def vectors(n: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = {"w": torch.randn(n, k, generator=g) * 0.05, "x": torch.randn(k, generator=g),
         "nw": torch.rand(k, generator=g) + 0.5, "bias": torch.randn(n, generator=g), "r": torch.randn(n, generator=g),
         "gate_up": torch.randn(2 * k, generator=g)}
    return {name: t.to(DEVICE) for name, t in v.items()}


def three_calls(module, w, v: dict[str, torch.Tensor], cfg, scratch=None) -> list[torch.Tensor]:
    """rmsnorm_gemv (with a bias), gemv_residual and silu_gemv_residual of one kernel family with cfg."""
    extra = {} if scratch is None else {"scratch": scratch}  # gemv.py's kernels take none
    out = torch.full((v["r"].numel(),), float("nan"), device=DEVICE)
    module.rmsnorm_gemv(w, v["x"], v["nw"], 1e-5, out, bias=v["bias"], cfg=cfg, **extra)
    res = module.gemv_residual(w, v["x"], v["r"].clone(), cfg=cfg, **extra)
    swi = module.silu_gemv_residual(w, v["gate_up"], v["r"].clone(), cfg=cfg, **extra)
    return [out, res, swi]


@pytest.mark.parametrize("n,k,block_k", [(37, 100, 128), (37, 128, 128), (20, 300, 128), (16, 512, 64)],
                         ids=["k<chunk", "k=chunk", "k-not-a-multiple", "8-chunks"])
def test_gemv_with_its_first_chunk_peeled_gives_the_same_bits_and_matches_float64(n, k, block_k) -> None:
    v = vectors(n, k, seed=n + k)
    cfg = GemvConfig(16, block_k, 4, 2)
    plain = three_calls(gemv, v["w"], v, cfg)
    early = three_calls(gemv, v["w"], v, dataclasses.replace(cfg, early=True))
    for a, b in zip(plain, early, strict=True):
        assert torch.equal(a, b)
    w, d = v["w"].double().cpu(), {name: t.double().cpu() for name, t in v.items()}
    ref = w @ (d["x"] * d["nw"]) / torch.sqrt((d["x"] ** 2).mean() + 1e-5) + d["bias"]
    g, u = d["gate_up"][:k], d["gate_up"][k:]
    for got, want in zip(early, [ref, d["r"] + w @ d["x"], d["r"] + w @ (g * torch.sigmoid(g) * u)], strict=True):
        assert (got.cpu().double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("slot", ["qkv", "o", "gate_up", "lm_head"])
def test_the_small_models_plan_matches_float64_on_a_smollm2_width(slot) -> None:
    """decode_plan's configs below hidden 2048 read K = 576 in one masked chunk of 1024 (qkv on 8 warps): every row
    (N = 75, not a multiple of any BLOCK_N) against float64, with and without the early weights, the same bits."""
    from graph_executor.kernels.decode_plan import plan_for

    cfg = getattr(plan_for(576), slot)
    assert isinstance(cfg, GemvConfig) and (slot == "lm_head" or cfg.block_k >= 576)
    n, k = 75, 576
    v = vectors(n, k, seed=len(slot))
    plain = three_calls(gemv, v["w"], v, cfg)
    early = three_calls(gemv, v["w"], v, dataclasses.replace(cfg, early=True))
    w, d = v["w"].double().cpu(), {name: t.double().cpu() for name, t in v.items()}
    ref = w @ (d["x"] * d["nw"]) / torch.sqrt((d["x"] ** 2).mean() + 1e-5) + d["bias"]
    g, u = d["gate_up"][:k], d["gate_up"][k:]
    for a, b, want in zip(plain, early, [ref, d["r"] + w @ d["x"], d["r"] + w @ (g * torch.sigmoid(g) * u)],
                          strict=True):
        assert torch.equal(a, b)
        assert (a.cpu().double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_the_split_k_kernels_give_the_same_bits_with_early_weights() -> None:
    n, k = 40, 256
    v = vectors(n, k, seed=7)
    cases = [
        (gemv_dense_splitk, v["w"], DenseSplitKConfig(16, 128, 2)),
        (gemv_fp8, quantize_fp8(v["w"]), Fp8Config(16, 128, 2)),
        (gemv_splitk, quantize_int4(v["w"], 32), SplitKConfig(16, 16, 2)),
        (gemv_splitk, quantize_int8(v["w"], 32), SplitKConfig(16, 32, 2)),
    ]
    for module, w, cfg in cases:
        scratch = SplitKScratch.zeros(4096, 64, DEVICE)
        plain = three_calls(module, w, v, cfg, scratch)
        early = three_calls(module, w, v, dataclasses.replace(cfg, early=True), scratch)
        for a, b in zip(plain, early, strict=True):
            assert torch.isfinite(a).all() and torch.equal(a, b), type(cfg).__name__
        assert int(scratch.count.abs().sum()) == 0


def test_with_early_weights_sets_every_config_of_a_plan() -> None:
    plan = GemvPlan(o=DenseSplitKConfig(16, 1024, 8))
    early = with_early_weights(plan)
    assert all(getattr(early, f.name).early for f in dataclasses.fields(early))
    assert early.o == DenseSplitKConfig(16, 1024, 8, early=True) and not plan.qkv.early


def test_a_decode_step_with_early_weights_gives_the_same_logits(tmp_path) -> None:
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.kernels.decode_plan import plan_for
    from tests.test_model_equivalence import BASE, load_hf_model

    model = load_hf_model(tmp_path, transformers.LlamaConfig, dict(num_key_value_heads=2), 29, str(DEVICE),
                          max_context=32)
    prompt = torch.arange(1, 8, device=DEVICE)
    model(prompt, torch.arange(7, device=DEVICE), torch.tensor([6], device=DEVICE), 7)
    before = model.kv_cache.clone()
    token, position = torch.tensor([5], device=DEVICE), torch.tensor([7], device=DEVICE)
    logits = {}
    plan = plan_for(model.config.hidden_size)  # the model's measured plan: a split-K projection among gemv.py's
    for early in (False, True):
        model.kv_cache.copy_(before)
        logits[early] = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
        FusedDecoder(model, plan=plan, early_weights=early).step(token, position, logits[early])
    assert torch.isfinite(logits[True]).all() and torch.equal(logits[True], logits[False])
