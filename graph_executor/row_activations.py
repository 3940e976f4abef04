"""The activation buffers of a step over T token rows (the prefill and verify steps), allocated once for the
most rows the step takes, at fixed addresses (their CUDA graphs read and write them in place)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from graph_executor.model import LlamaModel


@dataclass(frozen=True)
class RowActivations:
    x: torch.Tensor  # the residual stream [T, H]
    h: torch.Tensor  # normalised [T, H]
    qkv: torch.Tensor  # [T, q + 2 kv]
    q: torch.Tensor  # RoPE'd queries [T, heads, hd]
    attn: torch.Tensor  # attention out [T, heads, hd] (written by the kernels that take an output buffer)
    gate_up: torch.Tensor  # [T, 2 I]
    act: torch.Tensor  # SwiGLU out [T, I]

    @classmethod
    def allocate(cls, model: LlamaModel, max_tokens: int) -> RowActivations:
        cfg = model.config

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=model.embed_tokens.device, dtype=model.dtype)

        return cls(empty(max_tokens, cfg.hidden_size), empty(max_tokens, cfg.hidden_size),
                   empty(max_tokens, cfg.q_size + 2 * cfg.kv_size), empty(max_tokens, cfg.num_heads, cfg.head_dim),
                   empty(max_tokens, cfg.num_heads, cfg.head_dim), empty(max_tokens, 2 * cfg.intermediate_size),
                   empty(max_tokens, cfg.intermediate_size))

    def rows(self, t: int) -> RowActivations:
        """Views of the first t rows."""
        return RowActivations(*(getattr(self, f.name)[:t] for f in fields(self)))
