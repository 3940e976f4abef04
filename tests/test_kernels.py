"""Triton kernels against float64 torch references on fresh random inputs, outputs poisoned before each run.

On a machine without a GPU they run under TRITON_INTERPRET=1 (set here before the kernels are imported).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from graph_executor.kernels.decode_attention import DecodeAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference_decode(q, k, v, pos: int, window: int | None) -> torch.Tensor:
    """q [h, hd], k/v [kvh, C, hd] -> [h, hd] in float64."""
    h, hd = q.shape
    group = h // k.shape[0]
    start = 0 if window is None else max(0, pos + 1 - window)
    kk = k[:, start:pos + 1].double().repeat_interleave(group, 0)  # [h, L, hd]
    vv = v[:, start:pos + 1].double().repeat_interleave(group, 0)
    scores = torch.einsum("hd,hld->hl", q.double(), kk) / hd ** 0.5
    return torch.einsum("hl,hld->hd", scores.softmax(-1), vv)


def poison(attn: DecodeAttention) -> None:
    """NaN in the split partials: the reduce must read only what this call's split kernels wrote."""
    for t in (attn.acc, attn.m, attn.l):
        t.fill_(float("nan"))


CASES = [  # heads, kv_heads, head_dim, cache length, positions, window, dtype
    (4, 4, 64, 512, [0, 1, 63, 64, 300, 511], None, torch.float32),
    (8, 2, 64, 768, [5, 400, 767], None, torch.float16),  # many splits, the cache's last position
    (4, 1, 128, 600, [0, 599], None, torch.bfloat16),
    (4, 2, 64, 512, [10, 200, 511], 100, torch.float16),
]


# the reduce kernel (the default), the splits combined by the split kernel's last program, other splits and warps
@pytest.mark.parametrize("split,warps,fused", [(None, None, True), (None, None, False), (32, 1, True), (64, 2, False)])
@pytest.mark.parametrize("heads,kv_heads,hd,cache,positions,window,dtype", CASES)
def test_decode_attention_matches_reference(heads, kv_heads, hd, cache, positions, window, dtype, split,
                                            warps, fused) -> None:
    gen = torch.Generator(device="cpu").manual_seed(heads * 1000 + cache)
    attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                           num_warps=warps, fused_reduce=fused)
    # The cache as the model lays it out: one layer's K and V are strided views of [2, kv_heads, C, hd].
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for pos in positions:
        q = torch.randn(heads, hd, generator=gen).to(DEVICE, dtype)
        out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
        poison(attn)
        attn(q, kv[0], kv[1], torch.tensor([pos], device=DEVICE), out)
        ref = reference_decode(q.cpu(), kv[0].cpu(), kv[1].cpu(), pos, window)
        assert torch.isfinite(out).all()
        assert not attn.counts.any(), "the split programs' counters are reset for the next call (a graph replay)"
        err = (out.cpu().double() - ref).norm() / ref.norm()
        assert err < tol, f"pos {pos}: relative error {err:.2e}"


@pytest.mark.parametrize("heads,kv_heads,hd,cache,positions,window,dtype", [CASES[0], CASES[1], CASES[3]])
def test_a_decode_on_the_rows_kernel_matches_the_reference(heads, kv_heads, hd, cache, positions, window,
                                                           dtype) -> None:
    """DecodeAttention(rows_kernel=True): one token's decode on the verify step's kernel (the group's queries as rows
    of tensor-core products) against float64 and within rounding of the one-query kernel; poisoned workspaces."""
    gen = torch.Generator(device="cpu").manual_seed(heads * 77 + cache)
    rows = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, rows_kernel=True)
    plain = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for pos in positions:
        q = torch.randn(heads, hd, generator=gen).to(DEVICE, dtype)
        outs = []
        for attn in (rows, plain):
            out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
            poison(attn)
            attn(q, kv[0], kv[1], torch.tensor([pos], device=DEVICE), out)
            outs.append(out)
        ref = reference_decode(q.cpu(), kv[0].cpu(), kv[1].cpu(), pos, window)
        assert torch.isfinite(outs[0]).all()
        err = (outs[0].cpu().double() - ref).norm() / ref.norm()
        assert err < tol, f"pos {pos}: relative error {err:.2e}"
        assert (outs[0].float() - outs[1].float()).abs().max() <= (2e-5 if dtype == torch.float32 else 4e-3)


def test_the_rows_kernel_decode_takes_none_of_the_one_query_options() -> None:
    with pytest.raises(ValueError, match="rows_kernel"):
        DecodeAttention(4, 2, 64, 128, DEVICE, rows_kernel=True, fused_reduce=True)
    with pytest.raises(ValueError, match="rows_kernel"):
        DecodeAttention(4, 2, 64, 128, DEVICE, rows_kernel=True, max_tokens=3, batched=True)
    attn = DecodeAttention(4, 2, 64, 128, DEVICE, rows_kernel=True)
    qkv = torch.zeros((4 + 4) * 64, device=DEVICE)
    kv = torch.zeros(2, 2, 128, 64, device=DEVICE)
    with pytest.raises(ValueError, match="rows kernel"):
        attn(qkv, kv[0], kv[1], torch.tensor([3], device=DEVICE), torch.empty(4, 64, device=DEVICE),
             rope=torch.zeros(128, 2, 64, device=DEVICE))


def test_one_query_attention_warps_follow_the_query_width(monkeypatch) -> None:
    """2 warps from a 4096-wide query (LLaMA-2-7B's 32 x 128), 4 below (SmolLM2's 9 x 64); a probe's setting wins."""
    from graph_executor.kernels import decode_attention as da

    assert DecodeAttention(32, 32, 128, 256, DEVICE).warps == {"num_warps": 2}
    assert DecodeAttention(9, 3, 64, 256, DEVICE, batched=True, max_tokens=4).warps == {"num_warps": 4}
    assert DecodeAttention(9, 3, 64, 256, DEVICE, split_size=32).warps == {}  # a sweep's split: Triton's default
    monkeypatch.setattr(da, "ROW_WARPS", 1)
    assert DecodeAttention(32, 32, 128, 256, DEVICE).warps == {"num_warps": 1}
    assert DecodeAttention(32, 32, 128, 256, DEVICE, batched=True, max_tokens=2).warps == {"num_warps": 2}


MULTI_CASES = [  # heads, kv_heads, head_dim, cache length, max tokens, the tokens' positions, window, dtype
    (4, 4, 64, 300, 5, [0, 1, 2, 3, 4], None, torch.float32),
    (4, 4, 64, 300, 5, [120, 121, 122, 123, 124], None, torch.float32),
    (9, 3, 64, 512, 9, [250, 251, 252, 253, 254, 255, 256, 257, 258], None, torch.float16),  # SmolLM2's group
    (8, 2, 128, 256, 9, [63, 64, 65], None, torch.float16),  # 3 of 9 rows; a split boundary inside
    (8, 2, 128, 256, 9, [63, 64, 65], None, torch.bfloat16),
    (4, 2, 64, 512, 4, [400, 7, 511, 130], 100, torch.float16),  # not consecutive, a sliding window
]


@pytest.mark.parametrize("heads,kv_heads,hd,cache,max_tokens,positions,window,dtype", MULTI_CASES)
def test_multi_token_decode_attention_matches_reference(heads, kv_heads, hd, cache, max_tokens, positions, window,
                                                        dtype) -> None:
    """The verify step's attention: T queries, each at its own position, one program per KV head and split."""
    if dtype == torch.bfloat16 and DEVICE.type != "cuda":
        pytest.skip("the Triton interpreter's tl.dot gives garbage for bfloat16 operands (GPU only)")
    gen = torch.Generator(device="cpu").manual_seed(heads * 1000 + cache + len(positions))
    attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, max_tokens=max_tokens)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    t = len(positions)
    q = torch.randn(t, heads, hd, generator=gen).to(DEVICE, dtype)
    out = torch.full((t, heads, hd), float("nan"), device=DEVICE, dtype=dtype)
    poison(attn)
    attn(q, kv[0], kv[1], torch.tensor(positions, device=DEVICE), out)
    assert torch.isfinite(out).all()
    tol = 1e-4 if dtype == torch.float32 else 1.5e-2
    for i, pos in enumerate(positions):
        ref = reference_decode(q[i].cpu(), kv[0].cpu(), kv[1].cpu(), pos, window)
        err = (out[i].cpu().double() - ref).norm() / ref.norm()
        assert err < tol, f"token {i} at {pos}: relative error {err:.2e}"


from graph_executor.kernels.gemv import GemvConfig, gemv_residual, rmsnorm_gemv, silu_gemv_residual  # noqa: E402
from graph_executor.kernels.rope_append import rope_append  # noqa: E402

GEMV_SHAPES = [(96, 200), (64, 512), (33, 1030)]  # ragged N and K exercise the masks
SMALL = GemvConfig(block_n=16, block_k=128, num_warps=4, num_stages=1)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.cpu().double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_gemv(n, k, dtype) -> None:
    gen = torch.Generator().manual_seed(n + k)
    w, x, nw, b = (torch.randn(*s, generator=gen) for s in ((n, k), (k,), (k,), (n,)))
    ref = w.double() @ (x.double() * torch.rsqrt(x.double().pow(2).mean() + 1e-5) * nw.double()) + b.double()
    out = torch.full((n,), float("nan"), device=DEVICE, dtype=torch.float32)
    rmsnorm_gemv(*(t.to(DEVICE, dtype) for t in (w, x, nw)), 1e-5, out, bias=b.to(DEVICE, dtype), cfg=SMALL)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)


@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("swiglu", [False, True])
def test_gemv_residual(n, k, swiglu) -> None:
    gen = torch.Generator().manual_seed(n * k)
    w, residual = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
    a = torch.randn(2 * k if swiglu else k, generator=gen)
    act = torch.nn.functional.silu(a[:k].double()) * a[k:].double() if swiglu else a.double()
    ref = residual.double() + w.double() @ act
    x = residual.to(DEVICE).clone()
    fn = silu_gemv_residual if swiglu else gemv_residual
    fn(w.to(DEVICE), a.to(DEVICE), x, cfg=SMALL)
    assert rel(x, ref) < 1e-5


def test_rope_append_writes_q_and_the_cache_slot() -> None:
    from graph_executor.loading.config import ModelConfig
    from graph_executor.rope import apply_rope, rope_tables

    heads, kv_heads, hd, cache_len, pos = 4, 2, 64, 32, 17
    cfg = ModelConfig("llama", 10, 8, 8, 1, heads, kv_heads, hd, cache_len, rope_theta=500.0)
    rope = rope_tables(cfg, cache_len, DEVICE)
    qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=torch.Generator().manual_seed(5))
    kv = torch.full((2, kv_heads, cache_len, hd), float("nan"))
    q_out = torch.full((heads, hd), float("nan"))
    kv_dev, q_dev = kv.to(DEVICE), q_out.to(DEVICE)
    rope_append(qkv.to(DEVICE), torch.tensor([pos], device=DEVICE), rope, q_dev, kv_dev[0], kv_dev[1], heads,
                kv_heads, hd)
    cos, sin = rope[pos, 0].cpu().view(1, 1, hd), rope[pos, 1].cpu().view(1, 1, hd)
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd])
    assert torch.allclose(q_dev.cpu(), apply_rope(q.view(1, heads, hd), cos, sin)[0], atol=1e-5)
    assert torch.allclose(kv_dev[0, :, pos].cpu(), apply_rope(k.view(1, kv_heads, hd), cos, sin)[0], atol=1e-5)
    assert torch.equal(kv_dev[1, :, pos].cpu(), v.view(kv_heads, hd))
    others = torch.cat([kv_dev[:, :, :pos], kv_dev[:, :, pos + 1:]], dim=2)
    assert torch.isnan(others).all(), "only the slot at `pos` may be written"


@pytest.mark.parametrize("block_h", [None, 1, 4, 16])
def test_rope_append_over_several_tokens_writes_every_q_head_and_cache_row(block_h) -> None:
    """T = 5 tokens at scattered positions, 6 query heads and 2 KV heads (a block of 4 heads leaves a ragged last
    block, 16 one block of each kind): every q element and each token's K / V cache row against apply_rope, the
    other cache rows left as they were."""
    from graph_executor.loading.config import ModelConfig
    from graph_executor.rope import apply_rope, rope_tables

    heads, kv_heads, hd, cache_len = 6, 2, 64, 40
    positions = torch.tensor([3, 0, 17, 39, 8])
    t = positions.numel()
    cfg = ModelConfig("llama", 10, 8, 8, 1, heads, kv_heads, hd, cache_len, rope_theta=500.0)
    rope = rope_tables(cfg, cache_len, DEVICE)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * hd, generator=torch.Generator().manual_seed(6))
    kv_dev = torch.full((2, kv_heads, cache_len, hd), float("nan"), device=DEVICE)
    q_dev = torch.full((t, heads, hd), float("nan"), device=DEVICE)
    rope_append(qkv.to(DEVICE), positions.to(DEVICE), rope, q_dev, kv_dev[0], kv_dev[1], heads, kv_heads, hd,
                block_h=block_h)
    cos, sin = rope[positions, 0].cpu().view(t, 1, hd), rope[positions, 1].cpu().view(t, 1, hd)
    q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=1)
    assert torch.allclose(q_dev.cpu(), apply_rope(q.view(t, heads, hd), cos, sin), atol=1e-5)
    want_k = apply_rope(k.view(t, kv_heads, hd), cos, sin)
    for i, p in enumerate(positions.tolist()):
        assert torch.allclose(kv_dev[0, :, p].cpu(), want_k[i], atol=1e-5)
        assert torch.equal(kv_dev[1, :, p].cpu(), v[i].view(kv_heads, hd))
    untouched = torch.ones(cache_len, dtype=torch.bool)
    untouched[positions] = False
    assert torch.isnan(kv_dev[:, :, untouched.to(DEVICE)]).all(), "only the tokens' cache rows may be written"


def test_rope_append_refuses_a_block_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        rope_append(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), torch.zeros(4, 2, 16), torch.zeros(2, 2, 16),
                    torch.zeros(1, 4, 16), torch.zeros(1, 4, 16), 2, 1, 16, block_h=3)


def test_fused_decoder_matches_model_decode(tmp_path) -> None:
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.loading.loader import LoadConfig, load_model
    from tests.test_model_equivalence import BASE, make_hf_model

    hf = make_hf_model(transformers.Qwen2Config, dict(num_key_value_heads=2), seed=21)  # GQA + QKV bias
    hf.save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device=str(DEVICE), dtype="float32", max_context=64,
                                  progress=False)).model
    prompt = torch.randint(0, BASE["vocab_size"], (9,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    model(prompt, torch.arange(9, device=DEVICE), torch.tensor([8], device=DEVICE), 9)
    decoder = FusedDecoder(model)
    token, position = torch.tensor([5], device=DEVICE), torch.tensor([9], device=DEVICE)
    logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
    decoder.step(token, position, logits)
    cache_after_fused = model.kv_cache.clone()
    ref = model(token, position, torch.tensor([0], device=DEVICE), 10)[0]
    assert rel(logits, ref.double().cpu()) < 1e-4
    assert torch.allclose(cache_after_fused, model.kv_cache, atol=1e-5)


from graph_executor.kernels.rows import rmsnorm_rows, silu_mul_rows  # noqa: E402


def test_rmsnorm_and_silu_rows() -> None:
    gen = torch.Generator().manual_seed(8)
    x, w, gu = torch.randn(5, 300, generator=gen), torch.randn(300, generator=gen), torch.randn(5, 2 * 1500, generator=gen)
    out = torch.full((5, 300), float("nan"), device=DEVICE)
    rmsnorm_rows(x.to(DEVICE), w.to(DEVICE), 1e-6, out)
    ref = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert rel(out, ref) < 1e-6
    act = torch.full((5, 1500), float("nan"), device=DEVICE)
    silu_mul_rows(gu.to(DEVICE), act)
    assert rel(act, torch.nn.functional.silu(gu[:, :1500].double()) * gu[:, 1500:].double()) < 1e-6


PREFILL_ARCHS = {  # GQA; QKV bias; a sliding window shorter than the prompt
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "mistral-window-6": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=6)),
}


@pytest.mark.parametrize("case,arch", [(c, a) for c in ("from_zero", "chunk", "from_zero_cublas", "chunk_split")
                                       for a in sorted(PREFILL_ARCHS) if c != "chunk_split" or a == "llama"])
def test_fused_prefill_matches_model_forward(case, arch, tmp_path) -> None:
    """12 prompt rows: the multi-row GEMVs of the short-prompt plan, or, `_cublas`, the GEMMs with separate row
    kernels that longer prompts take, or, `_split`, the multi-row GEMVs with K split 4 ways on every projection."""
    import transformers

    from graph_executor.fused_prefill import FusedPrefill
    from graph_executor.kernels.gemv_rows import RowsConfig
    from graph_executor.kernels.prefill_plan import CUBLAS_ONLY, ShortPromptConfigs, ShortPromptPlan
    from graph_executor.loading.loader import LoadConfig, load_model
    from tests.test_model_equivalence import BASE, make_hf_model

    config_name, extra = PREFILL_ARCHS[arch]
    make_hf_model(getattr(transformers, config_name), extra, seed=22).save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device=str(DEVICE), dtype="float32", max_context=64,
                                  progress=False)).model
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, BASE["vocab_size"], (20,), generator=gen).to(DEVICE)
    split = RowsConfig(16, 16, 2, 1, split=4)
    plans = {"_cublas": CUBLAS_ONLY, "_split": ShortPromptPlan(((16, ShortPromptConfigs(split, split, split, split)),))}
    plan = next((p for suffix, p in plans.items() if case.endswith(suffix)), None)
    prefill = FusedPrefill(model, 16, short_plan=plan)
    assert (prefill.short_plan.configs(12) is None) == case.endswith("_cublas")  # the path this case means to take
    if DEVICE.type == "cpu":  # the plan's PDL (below hidden 2048) only where the device has it
        assert not any(c.pdl for _, configs in prefill.short_plan.by_rows for c in configs.all())
    logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
    if case.startswith("from_zero"):
        prefill.run(ids[:12], torch.arange(12, device=DEVICE), torch.tensor([11], device=DEVICE), logits)
        ref = model(ids[:12], torch.arange(12, device=DEVICE), torch.tensor([11], device=DEVICE), 12)[0]
    else:  # the first 8 tokens through the model, then 12 more as a chunk attending to the cache
        model(ids[:8], torch.arange(8, device=DEVICE), torch.tensor([7], device=DEVICE), 8)
        positions = torch.arange(8, 20, device=DEVICE)
        prefill.run(ids[8:], positions, torch.tensor([11], device=DEVICE), logits, from_cache=True)
        ref = model(ids[8:], positions, torch.tensor([11], device=DEVICE), 20)[0]
    assert rel(logits, ref.double().cpu()) < 1e-4
