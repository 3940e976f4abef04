"""o_proj combining the decode attention's split partials in its prologue (kernels/gemv_combine.py,
`FusedDecoder(combine_o=True)`): against the attention's own combine followed by gemv.py's o_proj, and against a
float64 reference, every element of x; a whole decode step with it against without (logits and KV cache); where it
cannot apply, refused. Under TRITON_INTERPRET=1 on a machine without a GPU; on a GPU the same tests run there, and a
cuda-marked one checks the SmolLM2-shaped step in float16 with PDL, early weights and a CUDA graph."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.kernels import gemv  # noqa: E402
from graph_executor.kernels.decode_attention import DecodeAttention  # noqa: E402
from graph_executor.kernels.gemv import GemvConfig, GemvPlan, PendingResidual  # noqa: E402
from graph_executor.kernels.gemv_combine import COMBINE_SB, combine_gemv_residual  # noqa: E402
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig  # noqa: E402
from tests.test_pending_residual import graphed_logits, steps  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(q, k, v, pos: int, window: int | None, w, x, partial=None, splits=0) -> torch.Tensor:
    """float64: softmax attention of q [heads, hd] over positions [start, pos] of k/v [kv_heads, C, hd] (GQA), then
    x (settled) + w @ out."""
    heads, hd = q.shape
    group = heads // k.shape[0]
    start = max(pos + 1 - window, 0) if window else 0
    kk = k[:, start:pos + 1].double().repeat_interleave(group, 0)  # [heads, T, hd]
    vv = v[:, start:pos + 1].double().repeat_interleave(group, 0)
    p = torch.softmax(torch.einsum("hd,htd->ht", q.double(), kk) * hd ** -0.5, dim=-1)
    out = torch.einsum("ht,htd->hd", p, vv).reshape(-1)
    base = x.double()
    if splits:
        base = base + partial[:splits * x.numel()].view(splits, -1).double().sum(0)
    return base + w.double() @ out


CASES = [  # dtype, heads, kv_heads, hd, N, positions (each run), split, window, block_n
    (torch.float16, 9, 3, 64, 100, (0, 64, 700), 64, None, 16),  # SmolLM2's heads; > COMBINE_SB splits at 700
    (torch.float32, 9, 3, 64, 100, (63, 700), 64, None, 16),
    (torch.float32, 4, 4, 32, 48, (1, 129), 16, None, 8),  # MHA, small splits: 9 splits at 129
    (torch.float16, 8, 2, 16, 70, (90, 400), 16, 200, 32),  # a sliding window: 14 live splits from split 12
]


@pytest.mark.parametrize("dtype,heads,kv_heads,hd,n,positions,split,window,block_n", CASES)
def test_the_combine_in_o_proj_equals_the_attention_s_combine_then_o_proj(dtype, heads, kv_heads, hd, n, positions,
                                                                          split, window, block_n) -> None:
    context = 768
    g = torch.Generator().manual_seed(heads * n + hd)
    k = torch.randn(kv_heads, context, hd, generator=g).to(DEVICE, dtype)
    v = torch.randn(kv_heads, context, hd, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, heads * hd, generator=g) * 0.05).to(DEVICE, dtype)
    attention = DecodeAttention(heads, kv_heads, hd, context, DEVICE, window, split)
    assert max(positions) // split + 1 > COMBINE_SB  # the combine loops more than once
    for i, pos in enumerate(positions):
        q = torch.randn(heads, hd, generator=g).to(DEVICE, dtype)
        x = torch.randn(n, generator=g).to(DEVICE, dtype)
        position = torch.tensor([pos], device=DEVICE)
        # the attention's own combine, then gemv.py's o_proj
        out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
        attention(q, k, v, position, out)
        # the partials only, combined by o_proj; every split poisoned first (a huge maximum, NaN sums), so that
        # reading one the attention did not write now (outside the position's live range) shows
        attention.m.fill_(1e30)
        attention.l.fill_(1.0)
        attention.acc.fill_(float("nan"))
        untouched = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
        attention(q, k, v, position, untouched, partials_only=True)
        assert torch.isnan(untouched).all()  # out is not written
        for early, pending in ((False, False), (True, True)) if i == len(positions) - 1 else ((i % 2 == 1, i > 0),):
            cfg = GemvConfig(block_n, 64, 4, early=early)
            partial = torch.randn(3 * n, generator=g).to(DEVICE) if pending else None
            settle = PendingResidual(partial, 3) if pending else None
            want = gemv.gemv_residual(w, out.view(-1), x.clone(), cfg=cfg, pending=settle)
            got = combine_gemv_residual(w, attention, position, x.clone(), cfg, pending=settle)
            assert torch.isfinite(got).all()
            tol = 1e-5 if dtype == torch.float32 else 4e-3
            scale = want.double().abs().max()
            assert (got.double() - want.double()).abs().max() <= tol * scale, (pos, early)
            full = reference(q, k, v, pos, window, w, x, partial, 3 if pending else 0)
            assert (got.double() - full).abs().max() <= (2e-5 if dtype == torch.float32 else 4e-3) * \
                full.abs().max(), (pos, early)


def test_bad_calls_are_refused() -> None:
    attention = DecodeAttention(4, 4, 16, 64, DEVICE)
    w = torch.zeros(8, 64, device=DEVICE)
    position = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="combine_gemv_residual"):
        combine_gemv_residual(torch.zeros(8, 60, device=DEVICE), attention, position, torch.zeros(8, device=DEVICE),
                              GemvConfig())
    with pytest.raises(ValueError, match="combine_gemv_residual"):
        combine_gemv_residual(w, DecodeAttention(4, 4, 16, 64, DEVICE, max_tokens=3), position,
                              torch.zeros(8, device=DEVICE), GemvConfig())
    wide = DecodeAttention(32, 8, 64, 64, DEVICE)  # 32 heads x 64: wider than one program holds (MAX_WIDTH)
    with pytest.raises(ValueError, match="fits"):
        combine_gemv_residual(torch.zeros(8, 2048, device=DEVICE), wide, position, torch.zeros(8, device=DEVICE),
                              GemvConfig())
    with pytest.raises(ValueError, match="partials_only"):
        DecodeAttention(4, 4, 16, 64, DEVICE, max_tokens=3)(
            torch.zeros(3, 4, 16, device=DEVICE), torch.zeros(4, 64, 16, device=DEVICE),
            torch.zeros(4, 64, 16, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE),
            torch.zeros(3, 4, 16, device=DEVICE), partials_only=True)


def test_a_decode_step_with_o_proj_combining_gives_the_same_logits(tmp_path) -> None:
    """A tiny Qwen2 (qkv bias, GQA) in float32, with and without the down partials deferred (then o_proj settles the
    residual too): the same logits as the attention's own combine within float32 rounding, the same KV cache."""
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from tests.test_model_equivalence import load_hf_model

    model = load_hf_model(tmp_path, transformers.Qwen2Config, dict(num_key_value_heads=2, num_hidden_layers=3), 11,
                          str(DEVICE), max_context=96)
    prompt = torch.arange(1, 71, device=DEVICE)
    model(prompt, torch.arange(70, device=DEVICE), torch.tensor([69], device=DEVICE), 70)
    before = model.kv_cache.clone()
    split_down = GemvPlan(down=DenseSplitKConfig(16, 32, 2, reduce_kernel=True))
    for plan, defer in ((GemvPlan(o=GemvConfig(8, 64, 4)), False), (split_down, True)):
        runs = {}
        for combine in (False, True):
            model.kv_cache.copy_(before)
            runs[combine] = steps(model, dict(plan=plan, defer_down=defer, combine_o=combine, split_size=16), 3, 70)
        assert FusedDecoder(model, plan=plan, combine_o=True).combine_o
        for a, b in zip(runs[False][0], runs[True][0], strict=True):
            assert torch.isfinite(b).all() and (a - b).abs().max() <= 1e-5 * a.abs().max()
        assert torch.allclose(runs[False][1], runs[True][1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="combine_o"):  # o_proj on the split-K kernels
        FusedDecoder(model, plan=GemvPlan(o=DenseSplitKConfig(16, 32, 2)), combine_o=True)
    assert not FusedDecoder(model, plan=GemvPlan(o=DenseSplitKConfig(16, 32, 2))).combine_o
    assert not FusedDecoder(model).combine_o  # off in every measured option set


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_smollm2_shaped_step_in_float16_with_o_proj_combining() -> None:
    """The production plan and options of a SmolLM2-135M-shaped model (PDL, early weights, deferred down partials),
    o_proj on 16-row programs, eager and as a CUDA graph, at contexts of 1 and many combine loop steps."""
    import dataclasses

    from graph_executor.kernels.decode_plan import plan_for
    from graph_executor.loading.loader import LoadConfig, load_model

    model = load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float16", max_context=2048,
                                  progress=False)).model
    plan = dataclasses.replace(plan_for(model.config.hidden_size), o=GemvConfig(16, 1024, 8))
    before = model.kv_cache.clone()
    for start in (0, 300, 1500):
        runs = {}
        for combine in (False, True):
            model.kv_cache.copy_(before)
            runs[combine] = steps(model, dict(plan=plan, combine_o=combine), 3, start)
        for a, b in zip(runs[False][0], runs[True][0], strict=True):
            assert torch.isfinite(b).all() and (a - b).abs().max() <= 2e-2 * a.abs().max(), start
        graphs = {combine: graphed_logits(model, dict(plan=plan, combine_o=combine), 9, start + 5)
                  for combine in (False, True)}
        assert (graphs[False] - graphs[True]).abs().max() <= 2e-2 * graphs[False].abs().max(), start
