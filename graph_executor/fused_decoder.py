"""The decode step on the GPU as 7 fused kernel launches per layer (see kernels/gemv.py), over a workspace
allocated once: the body of the decode CUDA graph. Numerically the same function as `LlamaModel.forward` on
one token (up to rounding: RMSNorm is applied inside the GEMV in float32). Dense and packed weights alike:
`kernels/projections.py` picks each slot's kernel."""

from __future__ import annotations

import torch

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

# Block configs per projection for the packed formats: the best of bench/probes/lowbit_gemv.py's sweep on
# LLaMA-2-7B shapes on an H200, each projection over 32 layers in one graph (read TB/s in the comments; the
# fp16 kernels reach 2.8-4.0 TB/s on the same shapes). See bench/NOTES.md.
INT4_PLAN = GemvPlan(
    qkv=GemvConfig(32, 512, 4, 3),  # 1.24 TB/s
    o=GemvConfig(8, 512, 4, 3),  # 1.06
    gate_up=GemvConfig(32, 512, 4, 3),  # 1.29
    down=GemvConfig(16, 1024, 4, 3),  # 1.15
    lm_head=GemvConfig(32, 512, 4, 3),
)
INT8_PLAN = GemvPlan(
    qkv=GemvConfig(16, 512, 4, 3),  # 2.57 TB/s
    o=GemvConfig(4, 1024, 4, 3),  # 2.09
    gate_up=GemvConfig(16, 512, 4, 3),  # 2.70
    down=GemvConfig(4, 1024, 4, 3),  # 2.01
    lm_head=GemvConfig(16, 512, 4, 3),
)
FP8_PLAN = GemvPlan(  # FP8 codes through the fp16 GEMVs
    qkv=GemvConfig(16, 256, 4, 3),  # 2.88 TB/s
    o=GemvConfig(8, 1024, 4, 3),  # 2.20
    gate_up=GemvConfig(8, 512, 4, 3),  # 3.16
    down=GemvConfig(8, 1024, 4, 3),  # 2.71
    lm_head=GemvConfig(8, 512, 4, 3),
)


class FusedDecoder:
    def __init__(self, model: LlamaModel, plan: GemvPlan = DEFAULT_PLAN, split_size: int | None = None,
                 int4: GemvPlan = INT4_PLAN, int8: GemvPlan = INT8_PLAN, fp8: GemvPlan = FP8_PLAN) -> None:
        cfg = model.config
        self.model = model
        self.plan = {name: ProjectionConfig(*(getattr(p, name) for p in (plan, int4, int8, fp8)))
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
