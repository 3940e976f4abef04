"""The model's shapes without loading its weights, and what they cost: bytes read per decoded token, KV bytes
per token of context, parameters, and the memory a process needs to hold the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graph_executor.loading.config import ModelConfig
from ipc.errors import ModelLoadError

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
HEADROOM_BYTES = 1024**3 // 2  # CUDA context, cuBLAS workspace, prefill activations and logits


def model_config(ref: str) -> ModelConfig:
    """The ModelConfig of `dummy:<preset>`, an HF folder, a .gguf file, or the default model."""
    from graph_executor.loading import default_model
    from graph_executor.loading.presets import preset

    if ref.startswith("dummy:"):
        return preset(ref.removeprefix("dummy:"))
    if ref.lower() == default_model.DEFAULT_MODEL_NAME:
        folder, _ = default_model.ensure_converted(progress=False)
        return ModelConfig.from_json_file(folder / "config.json")
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from graph_executor.loading.gguf_loader import gguf_config, open_gguf

        return gguf_config(open_gguf(path))
    if path.is_dir():
        return ModelConfig.from_json_file(path / "config.json")
    raise ModelLoadError(f"model path {ref!r} does not exist (give an HF folder, a .gguf file, dummy:<name>, "
                         f"or {default_model.DEFAULT_MODEL_NAME})")


@dataclass(frozen=True)
class ModelCost:
    params: int
    dtype_bytes: int
    decode_weight_bytes: int  # weights read by one decode step: all but the embedding rows not looked up
    kv_bytes_per_token: int  # K and V of one position, all layers

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: str) -> ModelCost:
        elt = DTYPE_BYTES[dtype]
        # An untied embedding table is only indexed (one row per token), so a step does not read it;
        # a tied one is read whole by the lm_head.
        unread = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elt
        return cls(cfg.num_params(), elt, (cfg.num_params() - unread) * elt, kv)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a token's matmuls (2 FLOPs each per token)."""
        return self.decode_weight_bytes // self.dtype_bytes

    def process_bytes(self, max_context: int) -> int:
        """What one engine process needs: weights, a full KV cache, and activation/workspace headroom."""
        return int((self.weight_bytes + self.kv_bytes_per_token * max_context) * 1.1) + HEADROOM_BYTES

    def to_dict(self) -> dict:
        return {"params": self.params, "dtype_bytes": self.dtype_bytes, "weight_bytes": self.weight_bytes,
                "decode_weight_bytes": self.decode_weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token}

