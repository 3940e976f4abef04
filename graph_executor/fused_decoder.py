"""The decode step on the GPU as 7 fused kernel launches per layer (see kernels/gemv.py), over a workspace
allocated once: the body of the decode CUDA graph. Numerically the same function as `LlamaModel.forward` on
one token (up to rounding: RMSNorm is applied inside the GEMV in float32). Dense and packed weights alike:
`kernels/projections.py` picks each slot's kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_executor.kernels import gemv_lowbit
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.gemv import DEFAULT_PLAN, GemvConfig, GemvPlan
from graph_executor.kernels.projections import (
    ProjectionConfig,
    embedding,
    gemv_residual,
    rmsnorm_gemv,
    silu_gemv_residual,
)
from graph_executor.kernels.rope_append import rope_append
from graph_executor.model import LlamaModel


@dataclass(frozen=True)
class LowbitPlan:
    """Block configs of the low-bit GEMVs per projection."""

    qkv: GemvConfig = gemv_lowbit.DEFAULT
    o: GemvConfig = gemv_lowbit.DEFAULT
    gate_up: GemvConfig = gemv_lowbit.DEFAULT
    down: GemvConfig = gemv_lowbit.DEFAULT
    lm_head: GemvConfig = gemv_lowbit.DEFAULT


# The best of bench/probes/lowbit_gemv.py's sweep for int4 g32 on LLaMA-2-7B shapes on an H200 (bench/NOTES.md;
# int8's best differ by one config at most). Read TB/s per projection over 32 layers in one graph.
DEFAULT_LOWBIT_PLAN = LowbitPlan(
    qkv=GemvConfig(16, 512, 4, 3),  # int4 1.26 TB/s, int8 2.57 (its best: 32x512, 8 warps)
    o=GemvConfig(4, 1024, 4, 3),  # int4 0.91, int8 2.09
    gate_up=GemvConfig(16, 512, 4, 3),  # int4 1.38, int8 2.70
    down=GemvConfig(4, 1024, 4, 3),  # int4 0.88, int8 2.01
    lm_head=GemvConfig(16, 512, 4, 3),
)


class FusedDecoder:
    def __init__(self, model: LlamaModel, plan: GemvPlan = DEFAULT_PLAN, split_size: int | None = None,
                 lowbit: LowbitPlan = DEFAULT_LOWBIT_PLAN) -> None:
        cfg = model.config
        self.model = model
        self.plan = {name: ProjectionConfig(getattr(plan, name), getattr(lowbit, name))
                     for name in ("qkv", "o", "gate_up", "down", "lm_head")}
        device, dtype = model.embed_tokens.device, model.dtype

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        self.x = empty(1, cfg.hidden_size)  # the residual stream, [1, H]
        self.qkv = empty(cfg.q_size + 2 * cfg.kv_size)
        self.q = empty(cfg.num_heads, cfg.head_dim)
        self.attn = empty(cfg.num_heads, cfg.head_dim)
        self.gate_up = empty(2 * cfg.intermediate_size)
        self.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context,
                                         device, cfg.sliding_window, split_size)

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """token, position: [1] int64 on the device; logits: [vocab] (float32) written in place."""
        m, cfg = self.model, self.model.config
        eps, g = cfg.rms_norm_eps, self.plan
        embedding(m.embed_tokens, token, self.x)
        x = self.x[0]  # [H]
        for index, layer in enumerate(m.layers):
            cache = m.kv_cache[index]  # [2, nkv, C, hd]
            rmsnorm_gemv(layer.qkv_proj, x, layer.attn_norm, eps, self.qkv, bias=layer.qkv_bias, cfg=g["qkv"])
            rope_append(self.qkv, position, m.rope, self.q, cache[0], cache[1], cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim)
            self.attention(self.q, cache[0], cache[1], position, self.attn)
            gemv_residual(layer.o_proj, self.attn.view(-1), x, cfg=g["o"])
            rmsnorm_gemv(layer.gate_up_proj, x, layer.mlp_norm, eps, self.gate_up, cfg=g["gate_up"])
            silu_gemv_residual(layer.down_proj, self.gate_up, x, cfg=g["down"])
        return rmsnorm_gemv(m.lm_head, x, m.norm, eps, logits, cfg=g["lm_head"])
