"""Model configuration: one immutable dataclass for the Llama family, read from HF `config.json` or GGUF metadata."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipc.errors import ModelLoadError

# HF `architectures` / `model_type` values we run with the same decoder.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
SUPPORTED_ROPE_TYPES = {"default", "llama3", "linear"}
FREQ_FACTORS_KEY = "hybridrt_rope_freq_factors"  # in config.json files we write (the default model's cache)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (`rope_scaling` / `rope_parameters` in HF configs)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # Per-frequency divisors of the inverse frequencies, as llama.cpp stores Llama 3.1+ scaling in GGUF files
    # (the `rope_freqs` tensor, [head_dim / 2]); applied after `rope_type`'s own scaling.
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelLoadError(
                f"unsupported rope scaling type {self.rope_type!r} (supported: {sorted(SUPPORTED_ROPE_TYPES)})"
            )
        if not (self.factor > 0 and math.isfinite(self.factor)):
            raise ModelLoadError(f"rope scaling factor must be a positive number, got {self.factor}")
        if self.freq_factors is not None and not all(f > 0 and math.isfinite(f) for f in self.freq_factors):
            raise ModelLoadError("rope frequency factors must be positive numbers")


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of one Llama-family decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {self.model_type!r} (hybridrt runs {sorted(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"model config field {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {self.head_dim}")
        factors = self.rope_scaling.freq_factors
        if factors is not None and len(factors) != self.head_dim // 2:
            raise ModelLoadError(f"rope frequency factors: expected head_dim / 2 = {self.head_dim // 2}, "
                                 f"got {len(factors)}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers and our loader both read back to this config."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.model_type]
        rope: dict[str, Any] = {"rope_type": self.rope_scaling.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling.rope_type != "default":
            rope.update(factor=self.rope_scaling.factor)
        if self.rope_scaling.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_scaling.low_freq_factor,
                        high_freq_factor=self.rope_scaling.high_freq_factor,
                        original_max_position_embeddings=self.rope_scaling.original_max_position_embeddings)
        eos = list(self.eos_token_ids)
        return {
            "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": rope if rope["rope_type"] != "default" else None,
            "rope_parameters": rope, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias, "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "hidden_act": "silu",
            # Our own key (transformers ignores it): GGUF frequency factors have no HF config equivalent.
            **({FREQ_FACTORS_KEY: list(self.rope_scaling.freq_factors)} if self.rope_scaling.freq_factors else {}),
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = _model_type_of(d)
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = d.get("sliding_window")
        if model_type == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(_rope_dict(d).get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_of(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bool(d.get("attention_bias", model_type == "qwen2")),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_json_file(cls, path: Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read model config {path}: {e}") from None
        try:
            return cls.from_hf_dict(d)
        except KeyError as e:
            raise ModelLoadError(f"model config {path} lacks field {e.args[0]!r}") from None


def _model_type_of(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = d.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES and not archs:
        return model_type
    name = archs[0] if archs else model_type
    raise ModelLoadError(
        f"unsupported architecture {name!r} (hybridrt runs {sorted(SUPPORTED_ARCHITECTURES)})"
    )


def _rope_dict(d: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `rope_parameters`; older configs write `rope_scaling` (+ top-level rope_theta).
    return d.get("rope_parameters") or d.get("rope_scaling") or {}


def _rope_scaling_of(d: dict[str, Any]) -> RopeScaling:
    r = _rope_dict(d)
    rope_type = r.get("rope_type", r.get("type", "default"))
    factors = d.get(FREQ_FACTORS_KEY)
    freq_factors = tuple(float(f) for f in factors) if factors else None
    if rope_type == "default":
        return RopeScaling(freq_factors=freq_factors)
    return RopeScaling(
        freq_factors=freq_factors,
        rope_type=rope_type,
        factor=float(r.get("factor", 1.0)),
        low_freq_factor=float(r.get("low_freq_factor", 1.0)),
        high_freq_factor=float(r.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(r.get("original_max_position_embeddings", 8192)),
    )
