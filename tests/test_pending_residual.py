"""An unsettled residual (gemv.PendingResidual: a split-K down_proj's partial sums left for the next kernels instead
of a reduce kernel, `FusedDecoder(defer_down=True)`): gemv.py's rmsnorm_gemv and gemv_residual settle it exactly as
the reduce kernel would have (the same bits), a whole decode step gives the same logits and KV cache with it as
without, and the decoder refuses it where it cannot apply. Under TRITON_INTERPRET=1 on a machine without a GPU; on a
GPU the same tests run there, and a cuda-marked one checks the SmolLM2-shaped step in float16."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.kernels import gemv, gemv_dense_splitk  # noqa: E402
from graph_executor.kernels.gemv import GemvConfig, GemvPlan, PendingResidual  # noqa: E402
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig  # noqa: E402
from graph_executor.kernels.gemv_splitk import SplitKScratch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def settled(x: torch.Tensor, partial: torch.Tensor, splits: int) -> torch.Tensor:
    """The reduce kernel's arithmetic in torch: the partials added in order from zero, then x, rounded to x's dtype."""
    n = x.numel()
    total = torch.zeros(n, dtype=torch.float32, device=x.device)
    for i in range(splits):
        total += partial[i * n:(i + 1) * n]
    return (total + x.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,splits", [(37, 100, 3), (64, 48, 1), (20, 300, 5)])
def test_the_gemvs_settle_a_pending_residual_as_the_reduce_kernel_would(dtype, n, k, splits) -> None:
    g = torch.Generator().manual_seed(n * k + splits)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE, dtype)
    nw = (torch.rand(k, generator=g) + 0.5).to(DEVICE, dtype)
    a = torch.randn(k, generator=g).to(DEVICE, dtype)
    cfg = GemvConfig(16, 64, 4, 2)
    # rmsnorm_gemv reads an unsettled x of K elements
    x = torch.randn(k, generator=g).to(DEVICE, dtype)
    partial = torch.randn(splits * k + 7, generator=g).to(DEVICE)  # longer than needed, as a shared scratch is
    pending = PendingResidual(partial, splits)
    out, want = (torch.full((n,), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2))
    gemv.rmsnorm_gemv(w, x, nw, 1e-5, out, cfg=cfg, pending=pending)
    gemv.rmsnorm_gemv(w, settled(x, partial, splits), nw, 1e-5, want, cfg=cfg)
    assert torch.isfinite(out).all() and torch.equal(out, want)
    # gemv_residual settles its own rows of an unsettled x of N elements and stores them with the product
    r = torch.randn(n, generator=g).to(DEVICE, dtype)
    partial = torch.randn(splits * n, generator=g).to(DEVICE)
    got = gemv.gemv_residual(w, a, r.clone(), cfg=cfg, pending=PendingResidual(partial, splits))
    ref = gemv.gemv_residual(w, a, settled(r, partial, splits), cfg=cfg)
    assert torch.equal(got, ref)
    full = settled(r, partial, splits).double() + w.double() @ a.double()  # and against float64, every element
    assert (got.double() - full).abs().max() <= 2e-3 * full.abs().max()


def test_the_split_k_down_proj_leaves_its_partials_where_the_reduce_kernel_reads_them() -> None:
    n, k = 40, 200
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE)
    gate_up = torch.randn(2 * k, generator=g).to(DEVICE)
    x = torch.randn(n, generator=g).to(DEVICE)
    cfg = DenseSplitKConfig(16, 64, 2, reduce_kernel=True)
    scratch = SplitKScratch.zeros(*gemv_dense_splitk.scratch_size(w, cfg), DEVICE)
    reduced = gemv_dense_splitk.silu_gemv_residual(w, gate_up, x.clone(), scratch, cfg)
    left = x.clone()
    pending = gemv_dense_splitk.silu_gemv_pending(w, gate_up, left, scratch, cfg)
    assert pending.splits == 4 and torch.equal(left, x), "x itself is not written"
    assert torch.equal(settled(left, pending.partial, pending.splits), reduced)
    with pytest.raises(ValueError, match="reduce_kernel"):
        gemv_dense_splitk.silu_gemv_pending(w, gate_up, x, scratch, DenseSplitKConfig(16, 64, 2))
    with pytest.raises(ValueError, match="partials"):
        gemv.rmsnorm_gemv(w, x[:k], x[:k], 1e-5, x.clone(), pending=PendingResidual(pending.partial[:10], 4))


def steps(model, decoder_kwargs: dict, count: int, start: int,
          context: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`count` decode steps from position `start` (a fresh copy of the cache each call): logits per step, the cache.
    `context`: FusedDecoder.step's."""
    from graph_executor.fused_decoder import FusedDecoder

    decoder = FusedDecoder(model, **decoder_kwargs)
    out = []
    for i in range(count):
        logits = torch.full((model.config.vocab_size,), float("nan"), device=DEVICE)
        decoder.step(torch.tensor([3 + 5 * i], device=DEVICE), torch.tensor([start + i], device=DEVICE), logits,
                     context=context)
        out.append(logits)
    return out, model.kv_cache.clone()


def graphed_logits(model, decoder_kwargs: dict, token: int, position: int,
                   cache: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step's logits from a CUDA graph of it (captured after one eager step compiles the kernels). `cache`:
    the KV cache is restored from it before the replay (the eager step appended the position's row already)."""
    from graph_executor.fused_decoder import FusedDecoder

    decoder = FusedDecoder(model, **decoder_kwargs)
    logits = torch.empty(model.config.vocab_size, device="cuda")
    token_t, position_t = torch.tensor([token], device="cuda"), torch.tensor([position], device="cuda")
    decoder.step(token_t, position_t, logits)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decoder.step(token_t, position_t, logits)
    if cache is not None:
        model.kv_cache.copy_(cache)
    graph.replay()
    torch.cuda.synchronize()
    return logits.clone()


def test_a_decode_step_with_the_down_partials_deferred_gives_the_same_logits(tmp_path) -> None:
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from tests.test_model_equivalence import load_hf_model

    model = load_hf_model(tmp_path, transformers.Qwen2Config, dict(num_key_value_heads=2, num_hidden_layers=3), 11,
                          str(DEVICE), max_context=32)  # Qwen2: qkv bias, which the settling kernel also adds
    prompt = torch.arange(1, 8, device=DEVICE)
    model(prompt, torch.arange(7, device=DEVICE), torch.tensor([6], device=DEVICE), 7)
    before = model.kv_cache.clone()
    # down on three K slices (the model's measured plan would take one at this size), the rest on gemv.py's kernels
    plan = GemvPlan(down=DenseSplitKConfig(16, 32, 2, reduce_kernel=True))
    runs = {}
    for defer in (False, True):
        model.kv_cache.copy_(before)
        runs[defer] = steps(model, dict(plan=plan, defer_down=defer), 3, 7)
    assert FusedDecoder(model, plan=plan, defer_down=True).defer_down
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert torch.equal(runs[False][1], runs[True][1])
    # where it cannot apply: asked for, refused; from the options, off
    for bad in (GemvPlan(), GemvPlan(down=DenseSplitKConfig(16, 32, 2)),
                GemvPlan(qkv=DenseSplitKConfig(16, 32, 2, reduce_kernel=True),
                         down=DenseSplitKConfig(16, 32, 2, reduce_kernel=True))):
        with pytest.raises(ValueError, match="defer_down"):
            FusedDecoder(model, plan=bad, defer_down=True)
        assert not FusedDecoder(model, plan=bad).defer_down


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_smollm2_shaped_step_in_float16_is_the_same_with_the_down_partials_deferred() -> None:
    """The production plan and options of a SmolLM2-135M-shaped model (down_proj on the split-K kernels with a
    reduce kernel, PDL, early weights, the split combine), eager and as a CUDA graph."""
    from graph_executor.loading.loader import LoadConfig, load_model

    model = load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float16", max_context=512,
                                  progress=False)).model
    before = model.kv_cache.clone()
    runs = {}
    for defer in (False, True):
        model.kv_cache.copy_(before)
        runs[defer] = steps(model, dict(defer_down=defer), 4, 300)
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert torch.equal(runs[False][1], runs[True][1])
    graphs = {defer: graphed_logits(model, dict(defer_down=defer), 9, 310) for defer in (False, True)}
    assert torch.equal(graphs[False], graphs[True])


@pytest.mark.parametrize("early", [False, True])
def test_the_residual_read_early_gives_the_same_bits(early) -> None:
    """GemvConfig.residual_early (the residual rows, settled, read right after the wait instead of after the sums):
    gemv_residual and silu_gemv_residual store the same bits, with a pending residual, FP8-style row scales, K over
    several chunks or one, and the early weights on or off."""
    import dataclasses

    g = torch.Generator().manual_seed(17)
    for n, k, block_k in ((37, 100, 64), (20, 300, 512)):
        w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE, torch.float16)
        a = torch.randn(2 * k, generator=g).to(DEVICE, torch.float16)
        x = torch.randn(n, generator=g).to(DEVICE, torch.float16)
        scale = (torch.rand(n, generator=g) + 0.5).to(DEVICE)
        partial = torch.randn(3 * n, generator=g).to(DEVICE)
        late = GemvConfig(16, block_k, 4, 2, early=early)
        soon = dataclasses.replace(late, residual_early=True)
        for pending in (None, PendingResidual(partial, 3)):
            got = gemv.gemv_residual(w, a[:k], x.clone(), cfg=soon, row_scale=scale, pending=pending)
            want = gemv.gemv_residual(w, a[:k], x.clone(), cfg=late, row_scale=scale, pending=pending)
            assert torch.isfinite(got).all() and torch.equal(got, want), (n, k, pending is not None)
        got = gemv.silu_gemv_residual(w, a, x.clone(), cfg=soon)
        assert torch.equal(got, gemv.silu_gemv_residual(w, a, x.clone(), cfg=late)), (n, k)
        full = x.double() + w.double() @ (torch.nn.functional.silu(a[:k].double()) * a[k:].double())
        assert (got.double() - full).abs().max() <= 2e-3 * full.abs().max()


def test_a_decode_step_with_gate_up_on_the_split_k_kernels_matches_the_plain_plan(tmp_path) -> None:
    """gate_up on the split-K GEMVs (Llama-3.2-1B's measured plan), RMSNorm in its prologue, partials added by the
    second kernel, SwiGLU in down's prologue: the same logits and cache as gate_up on gemv.py's kernels, within
    float32 summation-order differences, with RoPE inside the attention and its keys and values loaded early (1B's
    options) and outside."""
    import transformers

    from tests.test_model_equivalence import load_hf_model

    model = load_hf_model(tmp_path, transformers.LlamaConfig, dict(num_key_value_heads=2, num_hidden_layers=3), 12,
                          str(DEVICE), max_context=32)
    prompt = torch.arange(1, 8, device=DEVICE)
    model(prompt, torch.arange(7, device=DEVICE), torch.tensor([6], device=DEVICE), 7)
    before = model.kv_cache.clone()
    split = GemvPlan(gate_up=DenseSplitKConfig(16, 32, 2, reduce_kernel=True))  # gate_up's K on two slices
    for options in (dict(fuse_rope=True, kv_early=True, early_weights=False), dict(fuse_rope=False)):
        runs = {}
        for plan in (GemvPlan(), split):
            model.kv_cache.copy_(before)
            runs[plan] = steps(model, dict(plan=plan, **options), 3, 7)
        for a, b in zip(runs[GemvPlan()][0], runs[split][0], strict=True):
            assert torch.isfinite(b).all() and (a - b).abs().max() <= 1e-5 * a.abs().max(), options
        assert torch.allclose(runs[GemvPlan()][1], runs[split][1], rtol=0, atol=1e-5)


def test_a_1b_wide_model_s_production_step_matches_the_reference_forward(tmp_path) -> None:
    """A one-layer model of Llama-3.2-1B's hidden size (2048) and head size (64), with few heads, a narrow MLP and
    vocabulary (the interpreter's time): FusedDecoder with no arguments takes 1B's measured plan and options (qkv
    and gate_up on the split-K GEMVs, RoPE inside the attention with its keys and values loaded early), and its
    logits and KV rows at a step match the reference forward's (float32)."""
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.kernels import decode_plan
    from tests.test_model_equivalence import load_hf_model

    model = load_hf_model(tmp_path, transformers.LlamaConfig, dict(
        hidden_size=2048, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=1, vocab_size=256), 13, str(DEVICE), max_context=32)  # (4 heads of 64: fewer programs)
    decoder = FusedDecoder(model)
    assert isinstance(decoder.plan["gate_up"].dense, DenseSplitKConfig) and decoder.fuse_rope
    assert decoder.attention.kv_early and decode_plan.options_for(2048).kv_early
    prompt = torch.arange(1, 8, device=DEVICE)
    model(prompt, torch.arange(7, device=DEVICE), torch.tensor([6], device=DEVICE), 7)
    token, position = torch.tensor([5], device=DEVICE), torch.tensor([7], device=DEVICE)  # (one step: ~4 s here)
    before = model.kv_cache.clone()
    want = model(token, position, torch.tensor([0], device=DEVICE), 8)[0]  # [V]
    wanted_cache = model.kv_cache.clone()
    model.kv_cache.copy_(before)
    got = torch.full_like(want, float("nan"))
    decoder.step(token, position, got)
    assert torch.isfinite(got).all() and (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.allclose(model.kv_cache, wanted_cache, rtol=0, atol=1e-5)
