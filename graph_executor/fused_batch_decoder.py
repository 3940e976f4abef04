"""The decode step of B sequences at once on the GPU (`--max-num-seqs` > 1): the batch-1 step's 7 launches per layer
(`fused_decoder.py`), with batch-M GEMVs that read each weight tile once for all rows (`kernels/gemv_batch.py`), and
RoPE + KV append and attention reading each row's own KV slot and position from device memory, so one captured
graph per batch size serves any choice of slots. Packed weights (GGUF kept packed, `--quantize`) take the low-bit
GEMM for the few rows (`gemv_batch`, default plan).

Numerically each row is `LlamaModel.forward_batch`'s row, i.e. the sequence's own decode step, up to rounding (the
activations enter the tensor-core product in the weights' dtype). On a tensor-parallel rank the collectives are the
decode step's (`fused_decoder.py`), the logits gathered row by row.
"""

from __future__ import annotations

import torch

from graph_executor.kernels import pdl as pdl_launch
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.gemv_batch import BatchGemvPlan, gemm_residual, rmsnorm_gemm, silu_gemm_residual
from graph_executor.kernels.projections import embedding, prefill_scratch
from graph_executor.kernels.rope_append import rope_append
from graph_executor.model import LlamaModel
from graph_executor.tensor_parallel import StepCollectives


class FusedBatchDecoder:
    def __init__(self, model: LlamaModel, max_batch: int, plan: BatchGemvPlan = BatchGemvPlan(),
                 pdl: bool | None = None, fuse_rope: bool = False) -> None:
        """`fuse_rope`: RoPE and the KV append inside the decode attention kernel, as `FusedDecoder`'s (off until
        measured on the card)."""
        cfg = model.config
        self.fuse_rope = fuse_rope
        device = model.embed_tokens.device
        self.pdl = pdl_launch.supported(device) if pdl is None else pdl
        self.plan = pdl_launch.with_pdl(plan) if self.pdl else plan
        self.model = model
        self.max_batch = max_batch

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=model.dtype)

        self.x = empty(max_batch, cfg.hidden_size)  # the residual streams, [B, H]
        self.qkv = empty(max_batch, cfg.q_size + 2 * cfg.kv_size)
        self.q = empty(max_batch, cfg.num_heads, cfg.head_dim)
        self.attn = empty(max_batch, cfg.num_heads, cfg.head_dim)
        self.gate_up = empty(max_batch, 2 * cfg.intermediate_size)
        self.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context, device,
                                         cfg.sliding_window, max_tokens=max_batch, pdl=self.pdl, batched=True)
        self.slot_stride = model.kv_caches.stride(0)  # elements from one slot's caches to the next's
        # the low-bit GEMM's split-K partials for packed weights (None when every projection is dense)
        self.scratch = prefill_scratch([model.lm_head] + [w for layer in model.layers for w in (
            layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)], max_batch, device)
        self.collectives = StepCollectives(model.tp, max_batch, cfg.vocab_size, device)  # a tensor-parallel rank's

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             logits: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots: [B] int64 on the device (distinct slots, or repeats of one row: a repeated
        row computes and writes the same values); logits [B, vocab] (float32) written in place."""
        m, cfg, g, sc, c = self.model, self.model.config, self.plan, self.scratch, self.collectives
        b, eps, stride = tokens.shape[0], cfg.rms_norm_eps, self.slot_stride
        if b > self.max_batch:
            raise ValueError(f"a batch of {b} sequences, the decoder holds {self.max_batch}")
        x, qkv, q, attn, gate_up = self.x[:b], self.qkv[:b], self.q[:b], self.attn[:b], self.gate_up[:b]
        embedding(m.embed_tokens, tokens, x)
        for index, layer in enumerate(m.layers):
            cache = m.kv_caches[0, index]  # [2, nkv, C, hd]: slot 0's; row r's lies slots[r] * stride further
            rmsnorm_gemm(layer.qkv_proj, x, layer.attn_norm, eps, qkv, bias=layer.qkv_bias, cfg=g.qkv, scratch=sc)
            if self.fuse_rope:
                self.attention(qkv, cache[0], cache[1], positions, attn, slots=slots, slot_stride=stride, rope=m.rope)
            else:
                rope_append(qkv, positions, m.rope, q, cache[0], cache[1], cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, pdl=self.pdl, slots=slots, slot_stride=stride)
                self.attention(q, cache[0], cache[1], positions, attn, slots=slots, slot_stride=stride)
            c.before_residual(x)
            gemm_residual(layer.o_proj, attn.view(b, -1), x, cfg=g.o, scratch=sc)
            c.after_residual(x)
            rmsnorm_gemm(layer.gate_up_proj, x, layer.mlp_norm, eps, gate_up, cfg=g.gate_up, scratch=sc)
            c.before_residual(x)
            silu_gemm_residual(layer.down_proj, gate_up, x, cfg=g.down, scratch=sc)
            c.after_residual(x)
        out = c.logits_target(logits)
        rmsnorm_gemm(m.lm_head, x, m.norm, eps, out, cfg=g.lm_head, scratch=sc)
        return c.gather(logits, out)
