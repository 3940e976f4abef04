"""Rotary position embedding tables (default, `linear` and `llama3` scaling), computed once per model."""

from __future__ import annotations

import math

import torch

from graph_executor.loading.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[head_dim/2] float32, as transformers computes them for the same config."""
    dim = config.head_dim
    base = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [hd/2]
    inv_freq = _scaled(config, base)
    factors = config.rope_scaling.freq_factors
    # llama.cpp: theta = position * inv_freq / factor (its `rope_freqs` tensor).
    return inv_freq if factors is None else inv_freq / torch.tensor(factors, dtype=torch.float32)


def _scaled(config: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(config: ModelConfig, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, 2, head_dim] float32: cos and sin per position, halves duplicated (HF layout)."""
    inv_freq = inverse_frequencies(config)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
    return torch.stack([emb.cos(), emb.sin()], dim=1).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; cos/sin: [T, 1, hd] float32. Rotate-half form, computed in float32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
