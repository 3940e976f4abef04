"""The decode step as one persistent kernel (graph_executor/persistent_decoder.py) against FusedDecoder's kernels and
the reference step, on tiny Llama-family models (MHA, GQA with llama3 RoPE, a sliding window, a QKV bias, tied
embeddings): logits and every KV-cache element after each of several decode steps whose positions cross attention
splits. Under TRITON_INTERPRET=1 on a machine without a GPU (there each phase is its own launch); on a GPU the one
launch with its grid barriers, in a CUDA graph."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.fused_decoder import FusedDecoder  # noqa: E402
from graph_executor.kernels.persistent_step import PersistentConfig, pieces, rows_per_unit  # noqa: E402
from graph_executor.persistent_decoder import PersistentDecoder, unsupported  # noqa: E402
from tests.test_model_equivalence import BASE, CASES, load_hf_model  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROMPT = 13  # the decode steps start past one 16-position split and cross into the next ones
STEPS = (13, 14, 15, 16, 17, 31, 32, 40)  # positions decoded (the cache is filled by the prefill up to each)


def decode_positions(model, decoders, steps=STEPS, slot=None):
    """Each decoder from the same cache state at each position: its logits, its cache after, and the reference's."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, vocab, (max(steps) + 1,), generator=gen).to(DEVICE)
    model(prompt[:PROMPT], torch.arange(PROMPT, device=DEVICE), torch.tensor([PROMPT - 1], device=DEVICE), PROMPT)
    results = []
    for pos in steps:
        # the cache holds the prompt's keys up to pos - 1 (written by the reference)
        model(prompt[:pos], torch.arange(pos, device=DEVICE), torch.tensor([pos - 1], device=DEVICE), pos)
        before = model.kv_caches.clone()
        token, position = prompt[pos:pos + 1], torch.tensor([pos], device=DEVICE)
        ref = model(token, position, torch.tensor([0], device=DEVICE), pos + 1)[0].float()
        ref_cache = model.kv_caches.clone()
        outs = []
        for decoder in decoders:
            model.kv_caches.copy_(before)
            logits = torch.full((vocab,), float("nan"), device=DEVICE)
            decoder.step(token, position, logits, **({} if slot is None else {"slot": slot}))
            outs.append((logits.clone(), model.kv_caches.clone()))
        results.append((pos, ref, ref_cache, outs))
        model.kv_caches.copy_(before)
    return results


@pytest.mark.parametrize("case", ["llama2-mha", "llama3-gqa-rope-llama3", "mistral-sliding-window",
                                  "qwen2-qkv-bias", "tied-embeddings"])
def test_persistent_step_equals_the_fused_kernels_and_the_reference(tmp_path, case) -> None:
    config_cls, extra = CASES[case]
    model = load_hf_model(tmp_path, config_cls, extra, 5, str(DEVICE), max_context=64)
    assert unsupported(model) is None
    fused = FusedDecoder(model, split_size=16)
    persistent = PersistentDecoder(model, PersistentConfig(split=16, max_rows=16))
    for pos, ref, ref_cache, ((lf, cf), (lp, cp)) in decode_positions(model, [fused, persistent]):
        assert torch.isfinite(lp).all(), f"{case} pos {pos}: a logit was not written"
        err = float((lp - lf).abs().max() / lf.abs().max())
        assert err <= 2e-5, f"{case} pos {pos}: persistent vs fused kernels, relative error {err:.2e}"
        err_ref = float((lp - ref).abs().max() / ref.abs().max())
        assert err_ref <= 1e-4, f"{case} pos {pos}: persistent vs the reference step {err_ref:.2e}"
        assert torch.allclose(cp, cf, rtol=0, atol=1e-6), f"{case} pos {pos}: KV cache differs from the fused step's"
        assert torch.allclose(cp, ref_cache, rtol=0, atol=1e-5), f"{case} pos {pos}: KV cache vs the reference"


def test_persistent_step_in_fp16_with_every_unit_shape(tmp_path) -> None:
    """fp16, with one row a unit (every phase many units a program) and 16: against the fused kernels. (On the GPU with
    3 programs; under the interpreter the grid is always one program.)"""
    config_cls, extra = CASES["llama3-gqa-rope-llama3"]
    model = load_hf_model(tmp_path, config_cls, extra, 9, str(DEVICE), dtype="float16", max_context=64)
    fused = FusedDecoder(model, split_size=16)
    decoders = [PersistentDecoder(model, PersistentConfig(split=16, max_rows=p), programs=3)
                for p in (1, 16)]
    for pos, _, _, ((lf, cf), *others) in decode_positions(model, [fused, *decoders], steps=(13, 33)):
        for lp, cp in others:
            err = float((lp - lf).abs().max() / lf.abs().max())
            assert err <= 2e-3, f"fp16 pos {pos}: relative error {err:.2e} against the fused kernels"
            assert torch.allclose(cp.float(), cf.float(), rtol=0, atol=2e-3)


def test_persistent_step_decodes_the_slot_it_is_given(tmp_path) -> None:
    """With KV slots, the step reads and writes the slot read from the device, and no other."""
    from graph_executor.loading.loader import LoadConfig, load_model
    from tests.test_model_equivalence import make_hf_model

    config_cls, extra = CASES["llama3-gqa-rope-llama3"]
    make_hf_model(config_cls, extra, 3).save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device=str(DEVICE), dtype="float32", max_context=64,
                                  progress=False, max_num_seqs=2)).model
    assert model.slots == 2
    persistent = PersistentDecoder(model, PersistentConfig(split=16))
    fused = FusedDecoder(model, split_size=16)
    model.kv_caches.normal_()
    before = model.kv_caches.clone()
    token, position, slot = torch.tensor([3], device=DEVICE), torch.tensor([20], device=DEVICE), \
        torch.tensor([1], device=DEVICE)
    out = []
    for decoder in (fused, persistent):
        model.kv_caches.copy_(before)
        logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
        decoder.step(token, position, logits, slot=slot)
        out.append((logits, model.kv_caches.clone()))
    (lf, cf), (lp, cp) = out
    assert float((lp - lf).abs().max() / lf.abs().max()) <= 2e-5
    assert torch.equal(cp[0], before[0]), "slot 0 was touched"
    assert torch.allclose(cp, cf, rtol=0, atol=1e-6)


def test_rows_per_unit_covers_a_phase_in_one_round_and_k_splits_in_two_tiles() -> None:
    assert rows_per_unit(960, 132, 32) == 8 and rows_per_unit(576, 132, 32) == 8
    assert rows_per_unit(12288, 132, 32) == 32 and rows_per_unit(5, 132, 32) == 1
    assert pieces(576) == (512, 64) and pieces(1536) == (1024, 512) and pieces(2048) == (2048, 0)
    assert pieces(96) == (64, 32) and pieces(100) == (64, 64) and pieces(1) == (1, 0)
    with pytest.raises(ValueError):
        pieces(0)


def test_packed_weights_and_tensor_parallel_ranks_are_refused(tmp_path) -> None:
    from graph_executor.loading.loader import LoadConfig, load_model
    from tests.test_model_equivalence import make_hf_model

    make_hf_model(*CASES["llama2-mha"], 1).save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device=str(DEVICE), dtype="float32", max_context=32,
                                  progress=False, quantize="int8")).model
    if DEVICE.type == "cpu":  # the CPU path dequantizes at load: nothing packed is left to refuse
        assert unsupported(model) is None
    else:
        assert "packed" in unsupported(model)
        with pytest.raises(ValueError, match="packed"):
            PersistentDecoder(model)


@pytest.mark.cuda
def test_persistent_step_replays_in_a_cuda_graph(tmp_path) -> None:
    """On the GPU: the one launch with its grid barriers captured in a graph, replayed 300 times at moving positions,
    each replay's logits equal to an eager run of the same kernel and close to FusedDecoder's; the counters are back
    to zero after every replay (the next one's barriers start from 0)."""
    config_cls, extra = CASES["llama3-gqa-rope-llama3"]
    model = load_hf_model(tmp_path, config_cls, extra, 9, "cuda", dtype="float16", max_context=64)
    persistent = PersistentDecoder(model, PersistentConfig(split=16))
    fused = FusedDecoder(model, split_size=16)
    token, position = torch.tensor([5], device="cuda"), torch.tensor([0], device="cuda")
    logits = torch.empty(model.config.vocab_size, device="cuda")
    persistent.step(token, position, logits)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        persistent.step(token, position, logits)
    model.kv_caches.normal_()
    eager = torch.empty_like(logits)
    for i in range(300):
        position.fill_(i % 60)
        token.fill_(i % model.config.vocab_size)
        before = model.kv_caches.clone()
        graph.replay()
        got, cache = logits.clone(), model.kv_caches.clone()
        assert int(persistent.counters.abs().sum()) == 0
        if i % 37 == 0:
            model.kv_caches.copy_(before)
            fused.step(token, position, eager)
            err = float((got - eager).abs().max() / eager.abs().max())
            assert err <= 2e-3, f"replay {i}: relative error {err:.2e} against the fused kernels"
            assert torch.allclose(cache.float(), model.kv_caches.float(), rtol=0, atol=2e-3)
            model.kv_caches.copy_(cache)
