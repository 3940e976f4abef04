"""GGUF files: config from metadata, tensors dequantised with the `gguf` package and renamed to HF names.

llama.cpp's converter permutes the Q and K rows of Llama-architecture models (interleaved RoPE); we undo it so
that the weights match the HF rotate-half layout our model uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from graph_executor.loading.config import ModelConfig, RopeScaling
from ipc.errors import ModelLoadError

_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ModelLoadError(f"unsupported architecture {arch!r} in GGUF file (hybridrt runs {sorted(_GGUF_ARCHS)})")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=_GGUF_ARCHS[arch],
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _rope_scaling(reader, arch: str) -> RopeScaling:
    """llama.cpp writes linear scaling as metadata and Llama 3.1+ scaling as the `rope_freqs` tensor (per-
    frequency divisors it computed from the HF llama3 parameters, which the file does not keep)."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} in GGUF file (supported: none, linear, "
                             f"and Llama 3.1+ rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    factors = None
    if freqs is not None:
        from gguf.quants import dequantize

        factors = tuple(float(f) for f in np.asarray(dequantize(freqs.data, freqs.tensor_type)).reshape(-1))
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
                           freq_factors=factors)
    return RopeScaling(freq_factors=factors)


def weight_tensor_count(reader) -> int:
    """Tensors `iter_gguf_tensors` yields (for progress bars)."""
    return sum(t.name != ROPE_FREQS for t in reader.tensors)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) on Q/K rows."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_tensors(reader, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF orientation) for every tensor of the file."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # not a weight: part of the config (`_rope_scaling`)
        name = hf_name(t.name)
        if name is None:
            raise ModelLoadError(f"GGUF tensor {t.name!r} is not part of a {config.model_type} model")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if not w.flags.writeable:  # unquantised tensors come back as read-only views of the mmap
            w = w.copy()
        if config.model_type != "qwen2" and (".q_proj." in name or ".k_proj." in name):
            w = _unpermute(w, config.num_heads if ".q_proj." in name else config.num_kv_heads)
        yield name, w
