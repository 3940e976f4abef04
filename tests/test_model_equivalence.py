"""Per-architecture numerical equivalence with transformers on tiny random configs (fp32, CPU).

Each case saves a random HF model with `save_pretrained`, loads it with our loader, and compares logits after a
prefill and after each of 20 decode steps (tokens chosen greedily by transformers and fed to both).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from graph_executor.loading.loader import LoadConfig, load_model

PROMPT_LEN, DECODE_STEPS = 12, 20
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)

CASES = {
    "llama2-mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama3-gqa-rope-llama3": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16))),
    "llama-rope-linear": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral-sliding-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    "tied-embeddings": (transformers.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def make_hf_model(config_cls, extra: dict, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = config_cls(**{**BASE, **extra})  # extra may override BASE's sizes
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def load_hf_model(tmp_path, config_cls, extra: dict, seed: int, device: str = "cpu", dtype: str = "float32", *,
                  max_context: int):
    """make_hf_model's model saved into tmp_path and loaded back as ours (a LlamaModel)."""
    make_hf_model(config_cls, extra, seed).save_pretrained(tmp_path)
    return load_model(LoadConfig(model=str(tmp_path), device=device, dtype=dtype, max_context=max_context,
                                 progress=False)).model


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def compare_steps(hf_model, ours, prompt: torch.Tensor) -> list[float]:
    """Relative logits error at the prefill and at each decode step."""
    errors = []
    with torch.no_grad():
        out = hf_model(prompt[None], use_cache=True)
        ref, past = out.logits[0, -1], out.past_key_values
        t = prompt.shape[0]
        mine = ours(prompt, torch.arange(t), torch.tensor([t - 1]), t)[0]
        errors.append(relative_error(mine, ref))
        for step in range(DECODE_STEPS):
            token = ref.argmax().view(1)
            pos = t + step
            out = hf_model(token[None], past_key_values=past, use_cache=True)
            ref, past = out.logits[0, -1], out.past_key_values
            mine = ours(token, torch.tensor([pos]), torch.tensor([0]), pos + 1)[0]
            errors.append(relative_error(mine, ref))
    return errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case: str, tmp_path) -> None:
    config_cls, extra = CASES[case]
    hf_model = make_hf_model(config_cls, extra, seed=hash(case) % 1000)
    hf_model.save_pretrained(tmp_path)
    ours = load_model(LoadConfig(model=str(tmp_path), device="cpu", dtype="float32", progress=False)).model
    prompt = torch.randint(0, BASE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    errors = compare_steps(hf_model, ours, prompt)
    assert len(errors) == DECODE_STEPS + 1
    assert max(errors) < 1e-4, f"{case}: per-step relative errors {errors}"


def test_sharded_checkpoint_loads_and_matches(tmp_path) -> None:
    config_cls, extra = CASES["llama3-gqa-rope-llama3"]
    hf_model = make_hf_model(config_cls, extra, seed=7)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_model(LoadConfig(model=str(tmp_path), device="cpu", dtype="float32", progress=False)).model
    prompt = torch.randint(0, BASE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(2))
    assert max(compare_steps(hf_model, ours, prompt)) < 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_close_to_float32(dtype: str, tmp_path) -> None:
    hf_model = make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=3)
    hf_model.save_pretrained(tmp_path)
    prompt = torch.randint(0, BASE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(3))
    logits = {}
    for name in ("float32", dtype):
        model = load_model(LoadConfig(model=str(tmp_path), device="cpu", dtype=name, progress=False)).model
        assert model.embed_tokens.dtype == getattr(torch, name)
        logits[name] = model(prompt, torch.arange(PROMPT_LEN), torch.tensor([PROMPT_LEN - 1]), PROMPT_LEN)[0]
    assert relative_error(logits[dtype].float(), logits["float32"]) < 3e-2
