"""The perplexity report (`bench/quality.py`) on a short slice of its text with the real default model: plausible
figures, int8 close to dense, the same perplexity whatever the prefill window (the KV cache continues), and on a
GPU the fused decode path agreeing with the prefill path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from bench.quality import QualityConfig, decode_nll, load_config, markdown, prefill_nll, run, text_ids
from graph_executor.loading.loader import LoadConfig, load_model
from tests.test_model_equivalence import BASE, make_hf_model

TOKENS = 128


@pytest.fixture(scope="module")
def report(default_model_dir):
    return run(QualityConfig(formats=("dense", "int8"), device="cpu", max_tokens=TOKENS, window=TOKENS))


@pytest.mark.slow
def test_perplexity_is_plausible_and_int8_is_close_to_dense(report) -> None:
    dense, int8 = report.results
    assert (dense.format, int8.format, dense.tokens) == ("dense", "int8", TOKENS - 1)
    assert dense.weight_format == "float32" and int8.weight_format.startswith("int8-g32")
    for r in report.results:
        assert math.isfinite(r.perplexity) and 1 < r.perplexity < 1000, r
        assert r.decode_perplexity is None
    assert abs(int8.perplexity / dense.perplexity - 1) < 0.03
    (check,) = report.checks()
    assert (check.format, check.baseline, check.path, check.limit) == ("int8", "dense", "prefill", 1.01)
    table = markdown(report)
    assert "| int8 / dense | prefill |" in table and ("PASS" in table or "FAIL" in table)


@pytest.mark.slow
def test_a_smaller_window_continues_the_cache_to_the_same_perplexity(report) -> None:
    (dense,) = run(QualityConfig(formats=("dense",), device="cpu", max_tokens=TOKENS, window=48)).results
    assert dense.perplexity == pytest.approx(report.results[0].perplexity, rel=1e-4)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="formats"):
        QualityConfig(formats=("dense", "int3"))
    with pytest.raises(ValueError, match="window"):
        QualityConfig(window=0)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf-dequantized", "gguf-packed"])
def test_decode_path_agrees_with_the_prefill_path(smollm2_real, fmt: str) -> None:
    """SmolLM2's GGUF ($HYBRIDRT_TEST_GGUF on GPU machines without the model package), dense and kept packed."""
    gguf, tokenizer = smollm2_real
    cfg = QualityConfig(gguf=gguf, device="cuda", max_tokens=64)
    ids = text_ids(Path(tokenizer), cfg.max_tokens)
    model = load_model(load_config(cfg, fmt, ids.shape[0])).model
    prefill = prefill_nll(model, ids, window=16)
    decode = decode_nll(model, ids)
    assert torch.isfinite(decode).all()
    assert math.exp(decode.mean()) == pytest.approx(math.exp(prefill.mean()), rel=0.01)


def test_decode_path_matches_the_prefill_path_token_by_token(tmp_path) -> None:
    """`decode_nll` (FusedDecoder, teacher forcing) against `prefill_nll` on a tiny random Llama: the same token
    scored at each position. The Triton interpreter takes ~2 s a step on the CPU: a few tokens only (the kernels
    themselves are compared with the reference step in test_kernels / test_quant_model)."""
    make_hf_model(transformers.LlamaConfig, {"num_key_value_heads": 2}, seed=3).save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device="cpu", dtype="float32", max_context=16,
                                  progress=False)).model
    ids = torch.randint(0, BASE["vocab_size"], (4,), generator=torch.Generator().manual_seed(1))
    prefill = prefill_nll(model, ids, window=2)
    decode = decode_nll(model, ids)
    assert prefill.shape == decode.shape == (3,)
    assert torch.allclose(decode, prefill, rtol=1e-4, atol=1e-4)
