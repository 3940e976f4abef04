"""Decode attention with RoPE and the KV append inside (`DecodeAttention(..., rope=)`, `FusedDecoder(fuse_rope=True)`)
against `rope_append` followed by the plain attention, and against float64; outputs and caches poisoned first, every
cache element compared. Under TRITON_INTERPRET=1 on a machine without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.kernels.decode_attention import DecodeAttention  # noqa: E402
from graph_executor.kernels.rope_append import rope_append  # noqa: E402
from graph_executor.loading.config import ModelConfig  # noqa: E402
from graph_executor.rope import apply_rope, rope_tables  # noqa: E402
from tests.test_kernels import poison, reference_decode  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [  # heads, kv_heads, head_dim, cache, positions, window, dtype, split, fused reduce
    (4, 4, 64, 256, [0, 1, 63, 64, 200], None, torch.float32, None, False),
    (9, 3, 64, 256, [5, 130, 255], None, torch.float16, None, False),  # SmolLM2's grouping
    (8, 2, 128, 192, [0, 100, 191], None, torch.float16, 32, True),  # the last program combines the splits
    (4, 2, 64, 256, [10, 150], 40, torch.float16, None, False),  # a sliding window
]


def tables(heads: int, kv_heads: int, hd: int, cache: int) -> torch.Tensor:
    cfg = ModelConfig("llama", 10, 8, 8, 1, heads, kv_heads, hd, cache, rope_theta=10000.0)
    return rope_tables(cfg, cache, DEVICE)  # [C, 2, hd] float32


@pytest.mark.parametrize("heads,kv_heads,hd,cache,positions,window,dtype,split,fused", CASES)
def test_rope_inside_attention_equals_rope_append_then_attention(heads, kv_heads, hd, cache, positions, window, dtype,
                                                                 split, fused) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + cache)
    rope = tables(heads, kv_heads, hd, cache)
    plain = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                            fused_reduce=fused)
    inside = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                             fused_reduce=fused)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)  # the layer's [2, kvh, C, hd]
    kv_inside = kv.clone()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for pos in positions:
        qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE, dtype)
        position = torch.tensor([pos], device=DEVICE)
        q = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
        out, out_inside = (torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype) for _ in range(2))
        poison(plain), poison(inside)
        rope_append(qkv, position, rope, q, kv[0], kv[1], heads, kv_heads, hd)
        plain(q, kv[0], kv[1], position, out)
        inside(qkv, kv_inside[0], kv_inside[1], position, out_inside, rope=rope)
        assert torch.equal(kv_inside[1], kv[1]), "V: only position pos is written, with the same values"
        assert torch.allclose(kv_inside[0].float(), kv[0].float(), rtol=0, atol=1e-6 if dtype == torch.float32 else
                              2e-3), "K: only position pos is written, rotated as rope_append rotates it"
        assert torch.isfinite(out_inside).all() and not inside.counts.any()
        assert (out_inside.float() - out.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 2e-3)
        # and against float64: q and k rotated in float64, the cache before this step's row from the plain run
        cos, sin = rope[pos, 0].cpu().double().view(1, 1, hd), rope[pos, 1].cpu().double().view(1, 1, hd)
        q64, k64, v64 = qkv.cpu().double().split([heads * hd, kv_heads * hd, kv_heads * hd])
        k_ref, v_ref = kv[0].cpu().double().clone(), kv[1].cpu().double().clone()
        k_ref[:, pos] = apply_rope(k64.view(1, kv_heads, hd), cos, sin)[0]
        v_ref[:, pos] = v64.view(kv_heads, hd)
        ref = reference_decode(apply_rope(q64.view(1, heads, hd), cos, sin)[0], k_ref, v_ref, pos, window)
        err = (out_inside.cpu().double() - ref).norm() / ref.norm()
        assert err < tol, f"pos {pos}: relative error {err:.2e} against float64"


def test_v_loaded_with_k_gives_the_same_bits() -> None:
    """DecodeAttention(v_early=True): V's loads issued with K's change no output or cache element, with RoPE inside
    and without (SmolLM2's grouping, two positions, several blocks of keys)."""
    heads, kv_heads, hd, cache, _, window, dtype, split, fused = CASES[1]
    gen = torch.Generator().manual_seed(heads * 10 + cache)
    rope = tables(heads, kv_heads, hd, cache)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    for pos in (5, 200):
        qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE, dtype)
        position = torch.tensor([pos], device=DEVICE)
        got = []
        for v_early in (False, True):
            attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                                   fused_reduce=fused, v_early=v_early)
            cache_copy = kv.clone()
            out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
            attn(qkv, cache_copy[0], cache_copy[1], position, out, rope=rope)
            plain = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
            attn(qkv[: heads * hd].view(heads, hd), kv[0], kv[1], position, plain)
            got.append((out, cache_copy, plain))
        for a, b in zip(*got):
            assert torch.equal(a, b)


def test_a_batched_decode_appends_each_token_to_its_own_slot() -> None:
    """Three tokens, each in its own KV slot at its own position (a batched decode's `slots`)."""
    heads, kv_heads, hd, cache, slots = 4, 2, 64, 128, 3
    gen = torch.Generator().manual_seed(11)
    rope = tables(heads, kv_heads, hd, cache)
    caches = torch.randn(slots, 2, kv_heads, cache, hd, generator=gen).to(DEVICE)  # [slot, 2, kvh, C, hd]
    caches_inside = caches.clone()
    stride = caches.stride(0)
    slot_ids, positions = torch.tensor([2, 0, 1], device=DEVICE), torch.tensor([70, 5, 127], device=DEVICE)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE)
    plain, inside = (DecodeAttention(heads, kv_heads, hd, cache, DEVICE, max_tokens=3, batched=True) for _ in range(2))
    q = torch.full((3, heads, hd), float("nan"), device=DEVICE)
    out, out_inside = (torch.full((3, heads, hd), float("nan"), device=DEVICE) for _ in range(2))
    rope_append(qkv, positions, rope, q, caches[0, 0], caches[0, 1], heads, kv_heads, hd, slots=slot_ids,
                slot_stride=stride)
    plain(q, caches[0, 0], caches[0, 1], positions, out, slots=slot_ids, slot_stride=stride)
    inside(qkv, caches_inside[0, 0], caches_inside[0, 1], positions, out_inside, slots=slot_ids, slot_stride=stride,
           rope=rope)
    assert torch.allclose(caches_inside, caches, rtol=0, atol=1e-6)
    assert (out_inside - out).abs().max() <= 1e-6


def test_rope_inside_is_for_one_query_per_token() -> None:
    verify = DecodeAttention(4, 2, 64, 64, DEVICE, max_tokens=3)
    qkv = torch.zeros(3, 8 * 64, device=DEVICE)
    with pytest.raises(ValueError, match="one query per token"):
        verify(qkv, torch.zeros(2, 64, 64, device=DEVICE), torch.zeros(2, 64, 64, device=DEVICE),
               torch.tensor([1, 2, 3], device=DEVICE), torch.zeros(3, 4, 64, device=DEVICE),
               rope=tables(4, 2, 64, 64))
    with pytest.raises(ValueError, match="a QKV row each"):  # the plain q's size where the QKV row is due
        DecodeAttention(4, 2, 64, 64, DEVICE)(torch.zeros(4, 64, device=DEVICE), torch.zeros(2, 64, 64, device=DEVICE),
                                              torch.zeros(2, 64, 64, device=DEVICE), torch.tensor([1], device=DEVICE),
                                              torch.zeros(4, 64, device=DEVICE), rope=tables(4, 2, 64, 64))


def test_fused_decoder_with_rope_inside_gives_the_same_step(tmp_path) -> None:
    """The whole decode step (GQA + QKV bias) with and without `fuse_rope` (and with the attention's splits combined
    in its last program, `split_combine`): logits and the KV cache after it."""
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from tests.test_model_equivalence import BASE, load_hf_model

    model = load_hf_model(tmp_path, transformers.Qwen2Config, dict(num_key_value_heads=2), 23, str(DEVICE),
                          max_context=64)
    prompt = torch.randint(0, BASE["vocab_size"], (9,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    model(prompt, torch.arange(9, device=DEVICE), torch.tensor([8], device=DEVICE), 9)
    before = model.kv_cache.clone()
    token, position = torch.tensor([5], device=DEVICE), torch.tensor([9], device=DEVICE)
    logits = {}
    caches = {}
    for fuse, combine in ((False, False), (True, False), (True, True)):  # combine: the splits in the last program
        model.kv_cache.copy_(before)
        logits[fuse, combine] = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
        FusedDecoder(model, fuse_rope=fuse, split_combine=combine).step(token, position, logits[fuse, combine])
        caches[fuse, combine] = model.kv_cache.clone()
    plain = logits[False, False]
    for key in ((True, False), (True, True)):
        assert torch.isfinite(logits[key]).all()
        assert (logits[key] - plain).abs().max() <= 1e-5 * plain.abs().max(), key
        assert torch.allclose(caches[key], caches[False, False], rtol=0, atol=1e-6)
    assert not torch.equal(caches[True, False], before), "the step appended its K and V"


# the split combine under a sliding window (its live splits start past split 0)
EARLY_CASES = [*CASES, (8, 2, 64, 256, [150, 255], 40, torch.float16, None, True)]


def attention_runs(shape: tuple, positions, seed: int, variants, plain_q: bool):
    """Per position in `positions` and per variant of `variants(pos)` ((DecodeAttention kwargs, call kwargs) pairs),
    on an attention of `shape` (heads, kv_heads, head_dim, cache, window, dtype, split, DecodeAttention kwargs): a
    fresh poisoned attention's RoPE-inside output, with `plain_q` also its output for the un-rotated q of the same
    call's cache, and that cache. Yields (pos, [each variant's]); each position's calls start from the cache the
    previous position's first variant left, and every call must leave the split combine's counts at zero."""
    heads, kv_heads, hd, cache, window, dtype, split, options = shape
    gen = torch.Generator().manual_seed(seed)
    rope = tables(heads, kv_heads, hd, cache)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    for pos in positions:
        qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE, dtype)
        position = torch.tensor([pos], device=DEVICE)
        got = []
        for made, called in variants(pos):
            attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                                   **options, **made)
            poison(attn)
            cache_copy = kv.clone()
            out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
            attn(qkv, cache_copy[0], cache_copy[1], position, out, rope=rope, **called)
            outs = [out]
            if plain_q:
                plain = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
                attn(qkv[: heads * hd].view(heads, hd), cache_copy[0], cache_copy[1], position, plain, **called)
                outs.append(plain)
            assert not attn.counts.any()
            got.append((*outs, cache_copy))
        yield pos, got
        kv = got[0][-1]  # the next position attends to this one's row too


def off_and_on(case: int, seed: int, option: str, plain_q: bool):
    """`attention_runs` of EARLY_CASES[case] at its own positions, a split's last and first, one inside a later split
    and the cache's last, with the DecodeAttention option `option` False, then True."""
    heads, kv_heads, hd, cache, positions, window, dtype, split, fused = EARLY_CASES[case]
    size = split or 64
    yield from attention_runs((heads, kv_heads, hd, cache, window, dtype, split, dict(fused_reduce=fused)),
                              sorted({*positions, size - 1, size, 2 * size + 5, cache - 1}), case + seed,
                              lambda pos: [({option: on}, {}) for on in (False, True)], plain_q)


@pytest.mark.parametrize("case", range(len(EARLY_CASES)))
def test_keys_and_values_loaded_before_the_wait_give_the_same_bits(case) -> None:
    """DecodeAttention(kv_early=True): each split's K and V tiles loaded before the wait, the new position's row taken
    from registers: every output and cache element equal to the plain RoPE-inside call's, at positions on both sides
    of a split boundary (the new row first, last and inside its split), with and without the split combine, a sliding
    window, float32 and float16; poisoned outputs first."""
    for pos, ((out, cache_plain), (out_early, cache_early)) in off_and_on(case, 40, "kv_early", plain_q=False):
        assert torch.isfinite(out_early).all()
        assert torch.equal(out_early, out), f"pos {pos}"
        assert torch.equal(cache_early, cache_plain), f"pos {pos}: only the new row, with the same values"


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts the interpreter's calls of the early split")
def test_the_early_split_runs_once_per_split_holding_keys(monkeypatch) -> None:
    """With kv_early the kernel takes `_early_split` (not the loop), once per split that holds keys of the token; the
    rest return before it. Without kv_early, never."""
    from graph_executor.kernels import decode_attention

    calls = []
    real = decode_attention._early_split

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(decode_attention, "_early_split", spy)
    heads, kv_heads, hd, cache = 4, 2, 64, 256
    rope = tables(heads, kv_heads, hd, cache)
    kv = torch.randn(2, kv_heads, cache, hd)
    qkv = torch.randn((heads + 2 * kv_heads) * hd)
    out = torch.empty(heads, hd)
    for early, expected in ((False, 0), (True, heads * 3)):  # position 130: splits 0, 1 and 2 of 4
        calls.clear()
        DecodeAttention(heads, kv_heads, hd, cache, DEVICE, fused_reduce=True, kv_early=early)(
            qkv, kv[0], kv[1], torch.tensor([130]), out, rope=rope)
        assert len(calls) == expected


def test_keys_and_values_before_the_wait_need_one_block_a_split() -> None:
    with pytest.raises(ValueError, match="kv_early"):
        DecodeAttention(4, 4, 64, 256, DEVICE, split_size=128, kv_early=True)


def test_a_decode_step_with_the_keys_and_values_loaded_early_gives_the_same_logits(tmp_path) -> None:
    """FusedDecoder(kv_early=True) with RoPE inside: three steps' logits and the cache after them equal the plain
    step's, bit for bit (a tiny Llama with grouped KV heads); without RoPE inside it is refused."""
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from tests.test_model_equivalence import load_hf_model
    from tests.test_pending_residual import steps

    model = load_hf_model(tmp_path, transformers.LlamaConfig, dict(num_key_value_heads=2, num_hidden_layers=2), 13,
                          str(DEVICE), max_context=160)
    prompt = torch.arange(1, 71, device=DEVICE)  # 70 positions: the steps cross no split boundary at 64, their keys do
    model(prompt, torch.arange(70, device=DEVICE), torch.tensor([69], device=DEVICE), 70)
    before = model.kv_cache.clone()
    runs = {}
    for early in (False, True):
        model.kv_cache.copy_(before)
        runs[early] = steps(model, dict(fuse_rope=True, kv_early=early), 3, 70)
    assert FusedDecoder(model, fuse_rope=True, kv_early=True).attention.kv_early
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert torch.equal(runs[False][1], runs[True][1])
    with pytest.raises(ValueError, match="fuse_rope"):
        FusedDecoder(model, fuse_rope=False, kv_early=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.2-1b", "llama-2-7b"])
def test_the_production_steps_in_float16_are_the_same_with_the_keys_and_values_loaded_early(preset) -> None:
    """SmolLM2-135M's, Llama-3.2-1B's and LLaMA-2-7B's production plans and options (PDL on: the loads really precede the wait),
    eager and as a CUDA graph, at a position inside a split and at a split's first position."""
    from graph_executor.loading.loader import LoadConfig, load_model
    from tests.test_pending_residual import graphed_logits, steps

    model = load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16", max_context=512,
                                  progress=False)).model
    before = model.kv_cache.clone()
    runs = {}
    for early in (False, True):
        model.kv_cache.copy_(before)
        runs[early] = steps(model, dict(kv_early=early), 4, 318)  # 318..321: 320 starts a split
    for a, b in zip(runs[False][0], runs[True][0], strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert torch.equal(runs[False][1], runs[True][1])
    cache = model.kv_cache.clone()
    for position in (330, 384):  # each replay appends its row itself (the cache restored after the warm-up step)
        graphs = {early: graphed_logits(model, dict(kv_early=early), 9, position, cache) for early in (False, True)}
        assert torch.equal(graphs[False], graphs[True])


@pytest.mark.parametrize("case", range(len(EARLY_CASES)))
def test_the_position_read_before_the_wait_gives_the_same_bits(case) -> None:
    """DecodeAttention(early_position=True): the position read before the wait and the splits without keys returning
    there (the split combine counting only the rest): every output and cache element equal to the plain call's, with
    RoPE inside and outside (rope_append's q), at positions on both sides of a split boundary; poisoned outputs."""
    for pos, got in off_and_on(case, 70, "early_position", plain_q=True):
        for a, b in zip(*got, strict=True):
            assert torch.isfinite(b).all() and torch.equal(a, b), f"pos {pos}"


def test_a_batched_decode_reads_its_positions_before_the_wait_with_the_same_bits() -> None:
    """early_position with each token in its own KV slot (a batched decode), RoPE inside."""
    heads, kv_heads, hd, cache, slots = 4, 2, 64, 128, 3
    gen = torch.Generator().manual_seed(12)
    rope = tables(heads, kv_heads, hd, cache)
    caches = torch.randn(slots, 2, kv_heads, cache, hd, generator=gen).to(DEVICE)
    stride = caches.stride(0)
    slot_ids, positions = torch.tensor([2, 0, 1], device=DEVICE), torch.tensor([70, 5, 127], device=DEVICE)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE)
    got = []
    for early in (False, True):
        attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, max_tokens=3, batched=True, early_position=early)
        mine = caches.clone()
        out = torch.full((3, heads, hd), float("nan"), device=DEVICE)
        attn(qkv, mine[0, 0], mine[0, 1], positions, out, slots=slot_ids, slot_stride=stride, rope=rope)
        got.append((out, mine))
    assert torch.isfinite(got[1][0]).all()
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter ignores num_stages: the same code both ways")
@pytest.mark.parametrize("split,stages", [(128, 2), (256, 3)])
def test_a_pipelined_loop_over_a_split_s_blocks_gives_the_same_bits(split, stages) -> None:
    """DecodeAttention(loop_stages=): the one-query kernel's loop over a split of several blocks, software-pipelined
    (cp.async on sm_90), gives every output and cache element of the plain loop, with RoPE inside and outside, the
    reduce kernel and the split combine, at positions inside the first block, at a block's edge and deep in a later
    split."""
    heads, kv_heads, hd, cache = 4, 2, 64, 512
    gen = torch.Generator().manual_seed(split + stages)
    rope = tables(heads, kv_heads, hd, cache)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, torch.float16)
    for fused in (False, True):
        for pos in (5, 63, 64, split + 70, cache - 1):
            qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE, torch.float16)
            position = torch.tensor([pos], device=DEVICE)
            got = []
            for loop_stages in (0, stages):
                attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, split_size=split, fused_reduce=fused,
                                       loop_stages=loop_stages)
                poison(attn)
                mine = kv.clone()
                out, plain = (torch.full((heads, hd), float("nan"), device=DEVICE, dtype=torch.float16)
                              for _ in range(2))
                attn(qkv, mine[0], mine[1], position, out, rope=rope)
                attn(qkv[: heads * hd].view(heads, hd), mine[0], mine[1], position, plain)
                assert not attn.counts.any()
                got.append((out, plain, mine))
            for a, b in zip(*got, strict=True):
                assert torch.isfinite(b).all() and torch.equal(a, b), (fused, pos)


def test_a_pipelined_loop_needs_splits_of_several_blocks() -> None:
    with pytest.raises(ValueError, match="loop_stages"):
        DecodeAttention(4, 4, 64, 256, DEVICE, loop_stages=2)  # the default split: one block
    with pytest.raises(ValueError, match="kv_early"):
        DecodeAttention(4, 4, 64, 256, DEVICE, split_size=64, kv_early=True, loop_stages=2)
    assert DecodeAttention(4, 4, 64, 256, DEVICE, split_size=128, loop_stages=2).loop_stages == 2
