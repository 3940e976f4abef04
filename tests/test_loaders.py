"""Loaders: GGUF round trip through the `gguf` package's writer, dummy weights, and clear errors for bad input."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers

from graph_executor.loading.config import ModelConfig
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.loading.presets import PRESETS
from ipc.errors import DeviceError, ModelLoadError
from tests.test_model_equivalence import BASE, compare_steps, make_hf_model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, copied as the independent reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias"}


def llama_cpp_rope_factors(cfg) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors` for rope_type llama3, copied as the
    independent reference: the `rope_freqs` tensor of Llama 3.1+ GGUF files."""
    rope = cfg.rope_parameters
    base, dim = rope["rope_theta"], cfg.hidden_size // cfg.num_attention_heads
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(hf_model, path, rope_theta: float = 10000.0, rope_freqs: np.ndarray | None = None,
               linear_factor: float | None = None, arch: str = "llama") -> None:
    """As llama.cpp's converter writes it: Q/K rows permuted for llama (not for qwen2), biases kept."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    if linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_factor)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in hf_model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            out = f"blk.{layer}.{GGUF_NAMES[rest]}"
            if arch != "llama":
                pass
            elif rest == "self_attn.q_proj.weight":
                a = llama_cpp_permute(a, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                a = llama_cpp_permute(a, cfg.num_key_value_heads)
        w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_round_trip_matches_transformers(tmp_path) -> None:
    hf_model = make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=11)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model, path)
    loaded = load_model(LoadConfig(model=str(path), device="cpu", dtype="float32", progress=False))
    assert loaded.source == "gguf"
    assert loaded.model.config.num_kv_heads == 2 and not loaded.model.config.tie_word_embeddings
    prompt = torch.randint(0, BASE["vocab_size"], (10,), generator=torch.Generator().manual_seed(4))
    assert max(compare_steps(hf_model, loaded.model, prompt)) < 1e-4


def test_gguf_qwen2_with_qkv_bias_matches_transformers(tmp_path) -> None:
    """Qwen2 GGUFs carry Q/K/V biases and, unlike llama, no Q/K row permutation."""
    hf_model = make_hf_model(transformers.Qwen2Config, {"num_key_value_heads": 2}, seed=14)
    path = tmp_path / "qwen2.gguf"
    write_gguf(hf_model, path, rope_theta=hf_model.config.rope_parameters["rope_theta"], arch="qwen2")
    loaded = load_model(LoadConfig(model=str(path), device="cpu", dtype="float32", progress=False))
    assert loaded.model.config.model_type == "qwen2" and loaded.model.config.qkv_bias
    prompt = torch.randint(0, BASE["vocab_size"], (10,), generator=torch.Generator().manual_seed(7))
    assert max(compare_steps(hf_model, loaded.model, prompt)) < 1e-4


def test_gguf_llama31_rope_freqs_match_transformers_llama3_scaling(tmp_path) -> None:
    """A Llama 3.1+ GGUF keeps its RoPE scaling only as the rope_freqs tensor (the file has no llama3 parameters).
    head_dim 16 with original context 64 gives factors of 1, 8 and in between."""
    extra = {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    hf_model = make_hf_model(transformers.LlamaConfig, extra, seed=12)
    factors = llama_cpp_rope_factors(hf_model.config)
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) > 2  # all three kinds
    path = tmp_path / "llama31.gguf"
    write_gguf(hf_model, path, rope_theta=500000.0, rope_freqs=factors)
    loaded = load_model(LoadConfig(model=str(path), device="cpu", dtype="float32", progress=False))
    assert loaded.model.config.rope_scaling.freq_factors is not None
    prompt = torch.randint(0, BASE["vocab_size"], (10,), generator=torch.Generator().manual_seed(5))
    assert max(compare_steps(hf_model, loaded.model, prompt)) < 1e-4
    # The factors survive a round trip through the config.json we write (the default model's cache).
    config = loaded.model.config
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


def test_gguf_linear_rope_scaling_matches_transformers(tmp_path) -> None:
    extra = {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                           "factor": 2.0}}
    hf_model = make_hf_model(transformers.LlamaConfig, extra, seed=13)
    path = tmp_path / "linear.gguf"
    write_gguf(hf_model, path, linear_factor=2.0)
    loaded = load_model(LoadConfig(model=str(path), device="cpu", dtype="float32", progress=False))
    assert loaded.model.config.rope_scaling.rope_type == "linear"
    prompt = torch.randint(0, BASE["vocab_size"], (10,), generator=torch.Generator().manual_seed(6))
    assert max(compare_steps(hf_model, loaded.model, prompt)) < 1e-4


def test_dummy_has_real_shapes_and_is_seeded() -> None:
    cfg = LoadConfig(model="dummy:smollm2-135m", device="cpu", dtype="float32", max_context=64, progress=False)
    a, b = load_model(cfg).model, load_model(cfg).model
    assert a.config == PRESETS["smollm2-135m"]
    n_params = sum(t.numel() for n, t in a.named_buffers() if n not in ("rope", "kv_caches"))
    assert n_params == a.config.num_params()
    assert torch.equal(a.layers[3].qkv_proj, b.layers[3].qkv_proj)
    logits = a(torch.tensor([1, 2, 3]), torch.arange(3), torch.tensor([2]), 3)
    assert logits.shape == (1, 49152) and torch.isfinite(logits).all()


def test_preset_parameter_counts_are_real() -> None:
    billions = {name: cfg.num_params() / 1e9 for name, cfg in PRESETS.items()}
    assert abs(billions["llama-2-7b"] - 6.74) < 0.01
    assert abs(billions["llama-2-70b"] - 68.98) < 0.01
    assert abs(billions["llama-3-8b"] - 8.03) < 0.01
    assert abs(billions["llama-3.2-1b"] - 1.24) < 0.01
    assert abs(billions["qwen2.5-7b"] - 7.62) < 0.01


@pytest.mark.parametrize("ref,message", [
    ("/no/such/model", "does not exist"),
    ("dummy:llama-9-999b", "unknown dummy model"),
])
def test_bad_model_reference(ref: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(LoadConfig(model=ref, device="cpu", progress=False))


def test_unsupported_architecture(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(LoadConfig(model=str(tmp_path), device="cpu", progress=False))


def test_shape_mismatch(tmp_path) -> None:
    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=5).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128  # checkpoint has 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"shape mismatch for model\.layers\.0\.mlp\.\w+_proj\.weight"):
        load_model(LoadConfig(model=str(tmp_path), device="cpu", progress=False))


def test_missing_tensor(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=6).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing model.layers.1.mlp.up_proj.weight"):
        load_model(LoadConfig(model=str(tmp_path), device="cpu", progress=False))


def test_dtype_not_supported_on_device() -> None:
    with pytest.raises(DeviceError, match="dtype 'float8' is not supported on cpu"):
        load_model(LoadConfig(model="dummy:smollm2-135m", device="cpu", dtype="float8", progress=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", progress=False))


def test_a_context_above_the_trained_length_warns(capsys) -> None:
    """As vLLM does (it refuses without a flag): one warning line, and the model still loads."""
    from graph_executor.loading.loader import LoadConfig, load_model
    from graph_executor.loading.presets import preset

    trained = preset("smollm2-135m").max_position_embeddings
    load_model(LoadConfig(model="dummy:smollm2-135m", device="cpu", dtype="float32", max_context=trained + 64))
    err = capsys.readouterr().err
    assert f"warning: --max-context {trained + 64} is above the {trained} positions" in err
    load_model(LoadConfig(model="dummy:smollm2-135m", device="cpu", dtype="float32", max_context=64))
    assert "warning" not in capsys.readouterr().err


def test_device_and_dtype_names_are_checked_without_torch_as_the_executor_checks_them() -> None:
    """The launcher's torch-free check (graph_executor/device_names.py) says what the executor would, in the same
    words, for names no machine runs and for cuda without a GPU (this test runs where there is none)."""
    from graph_executor.device import resolve_device, resolve_dtype
    from graph_executor.device_names import check_names

    if torch.cuda.is_available():
        pytest.skip("compares against the executor's answers on a machine without a GPU")
    for device, dtype in [("tpu", "auto"), ("cuda", "auto"), ("cuda:1", "float16"), ("cpu", "float8"),
                          ("auto", "int4")]:
        with pytest.raises(DeviceError) as ours:
            check_names(device, dtype, gpu=False)
        with pytest.raises(DeviceError) as theirs:
            resolve_dtype(dtype, resolve_device(device))
        assert str(ours.value) == str(theirs.value)
    for dtype in ("auto", "bf16", "half", "float32"):
        check_names("cpu", dtype, gpu=False)  # accepted spellings pass
