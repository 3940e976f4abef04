"""What a model's shapes cost the floors, without loading its weights: bytes read per decoded token, KV bytes
per token of context, parameters. Byte counts come from graph_executor.memory, the rule loading uses; what a
process needs to hold the model ("will it fit") is graph_executor.memory's `required_bytes` / `check_fits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_executor.loading.config import ModelConfig
from graph_executor.memory import needed_bytes


@dataclass(frozen=True)
class ModelCost:
    params: int
    dtype_bytes: int
    decode_weight_bytes: int  # weights read by one decode step: all but the embedding rows not looked up
    kv_bytes_per_token: int  # K and V of one position, all layers

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: str) -> ModelCost:
        """`dtype` is a torch dtype name, e.g. "float16"."""
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        elt = torch_dtype.itemsize
        weight_bytes, kv = needed_bytes(cfg, torch_dtype, 1)
        # An untied embedding table is only indexed (one row per token), so a step does not read it;
        # a tied one is read whole by the lm_head.
        unread = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * elt
        return cls(cfg.num_params(), elt, weight_bytes - unread, kv)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a token's matmuls (2 FLOPs each per token)."""
        return self.decode_weight_bytes // self.dtype_bytes

    def to_dict(self) -> dict:
        return {"params": self.params, "dtype_bytes": self.dtype_bytes, "weight_bytes": self.weight_bytes,
                "decode_weight_bytes": self.decode_weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token}
