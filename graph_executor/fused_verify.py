"""The speculative verify step on the GPU: k + 1 tokens at consecutive positions p .. p + k (the last accepted
token and k proposals), k + 1 rows of logits out. The body of the verify CUDA graphs (one per k).

It is the prefill step's structure (row kernels, then cuBLAS or the low-bit GEMM for the projections) with the
changes that bring it near one decode step: attention is the decode kernel over the cache with each query at
its own device-side position (not SDPA over a masked whole cache); gate_up and the lm_head, where the multi-row
GEMV (kernels/gemv_rows.py) reads the weights as fast as cuBLAS at these row counts, take it with the RMSNorm
fused (two launches fewer per layer; the lm_head writes the float32 logits directly). On qkv, o and down cuBLAS
reads faster (bench/NOTES.md, issue 11). Packed weights take the prefill step's path throughout. Rows past the
accepted ones write K/V the next step overwrites before anything reads them (attention reads each query's own
position), so a rejection needs no cache copy. On a tensor-parallel rank the collectives are the decode step's
(`fused_decoder.py`), the logits gathered row by row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_executor.kernels import gemv_rows
from graph_executor.kernels import pdl as pdl_launch
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.gemv_rows import RowsConfig, gemv_residual_rows, rmsnorm_gemv_rows, silu_gemv_residual_rows
from graph_executor.kernels.prefill_plan import ROWS_16
from graph_executor.kernels.projections import embedding, matmul, prefill_scratch
from graph_executor.kernels.rope_append import rope_append
from graph_executor.kernels.rows import rmsnorm_rows, silu_mul_rows
from graph_executor.model import LlamaModel
from graph_executor.row_activations import RowActivations
from graph_executor.tensor_parallel import StepCollectives


@dataclass(frozen=True)
class RowsPlan:
    """Multi-row GEMV configs of the projections that take them (dense weights): the best of the H200 sweep at
    5 rows on LLaMA-2-7B shapes (bench/probes/gemv_rows.py): gate_up 3.79 TB/s (cuBLAS 3.78), lm_head 3.85
    (3.80)."""

    gate_up: RowsConfig = RowsConfig(64, 128, 4, 3)
    lm_head: RowsConfig = RowsConfig(64, 64, 4, 3)
    o: RowsConfig | None = None  # o_proj with the residual add fused; None: cuBLAS addmm_
    # qkv with the RMSNorm fused, down_proj with SwiGLU and the residual (None: RMSNorm / SwiGLU row kernels and
    # cuBLAS); unmeasured here: the prefill step's 16-row configs (prefill_plan.py) are the candidates
    qkv: RowsConfig | None = None
    down: RowsConfig | None = None

DEFAULT_ROWS_PLAN = RowsPlan()
# Every dense projection on the split-K multi-row GEMVs with the prefill step's 16-row configs (the verify rows pad
# to 16 too). Measured on an H200 (bench/probes/verify_plan.py, twenty-third session; ms at k + 1 = 2 / 5 / 9
# tokens, bench/results/2026-12-02-h200-experiments/): SmolLM2-135M shape 0.795 / 0.807 / 0.813 against 0.880 /
# 0.886 / 0.882 for DEFAULT_ROWS_PLAN (0.90-0.92x); LLaMA-2-7B 4.437 / 4.482 / 4.492 against 4.280 / 4.329 / 4.383
# (1.04x slower: cuBLAS reads the large qkv, o and down faster there). Hidden 2048 (Llama-3.2-1B) is unmeasured.
SMALL_ROWS_PLAN = RowsPlan(gate_up=ROWS_16.gate_up, qkv=ROWS_16.qkv, o=ROWS_16.o, down=ROWS_16.down)
SMALL_HIDDEN = 2048  # below it SMALL_ROWS_PLAN


def verify_plan_for(hidden_size: int) -> RowsPlan:
    """The measured plan for a model of this hidden size (see SMALL_ROWS_PLAN)."""
    return SMALL_ROWS_PLAN if hidden_size < SMALL_HIDDEN else DEFAULT_ROWS_PLAN


class FusedVerify:
    def __init__(self, model: LlamaModel, max_tokens: int, plan: RowsPlan | None = None,
                 pdl: bool | None = None) -> None:
        """`plan`: None: `verify_plan_for` the model's hidden size. `pdl`: launch the step's Triton kernels with
        programmatic dependent launch (kernels/pdl.py; it pays between two of them: RoPE -> attention -> its
        reduction, gate_up -> SwiGLU); None: where the device has it."""
        cfg = model.config
        plan = verify_plan_for(cfg.hidden_size) if plan is None else plan
        self.model = model
        self.max_tokens = max_tokens
        device, dtype = model.embed_tokens.device, model.dtype
        self.pdl = pdl_launch.supported(device) if pdl is None else pdl
        if self.pdl:
            plan = pdl_launch.with_pdl(plan)
        self.plan = plan

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        self.buffers = RowActivations.allocate(model, max_tokens)
        self.attn = empty(max_tokens, cfg.num_heads, cfg.head_dim)  # attention out [T, heads, hd]
        self.logits = empty(max_tokens, cfg.vocab_size)  # in the activation dtype, before the float32 copy
        self.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context,
                                         device, cfg.sliding_window, max_tokens=max_tokens, pdl=self.pdl)
        weights = [w for layer in model.layers
                   for w in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
        # the low-bit GEMM's and the multi-row GEMVs' split-K partials (a plan's configs split along K), one scratch
        first = model.layers[0]
        self.scratch = gemv_rows.step_scratch(
            [(max_tokens, *w.shape, c) for w, c in ((first.qkv_proj, plan.qkv), (first.o_proj, plan.o),
                                                    (first.gate_up_proj, plan.gate_up), (first.down_proj, plan.down),
                                                    (model.lm_head, plan.lm_head)) if c is not None and dense(w)],
            prefill_scratch([*weights, model.lm_head], max_tokens, device), device)
        self.collectives = StepCollectives(model.tp, max_tokens, cfg.vocab_size, device)  # a tensor-parallel rank's

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """ids, positions [T] int64 on the device (T <= max_tokens; positions consecutive or not, each < the
        context); logits [T, vocab] float32, written in place: row t is the distribution after token t."""
        m, cfg, c = self.model, self.model.config, self.collectives
        t, eps = ids.shape[0], cfg.rms_norm_eps
        b, attn = self.buffers.rows(t), self.attn[:t]
        x, h, qkv, q, gate_up, act = b.x, b.h, b.qkv, b.q, b.gate_up, b.act
        embedding(m.embed_tokens, ids, x)
        p, sc, pdl = self.plan, self.scratch, self.pdl
        for index, layer in enumerate(m.layers):
            cache = m.kv_cache[index]  # [2, nkv, C, hd]
            if p.qkv is not None and dense(layer.qkv_proj):
                rmsnorm_gemv_rows(layer.qkv_proj, x, layer.attn_norm, eps, qkv, bias=layer.qkv_bias, cfg=p.qkv,
                                  scratch=sc)
            else:
                rmsnorm_rows(x, layer.attn_norm, eps, h, pdl=pdl)
                matmul(h, layer.qkv_proj, qkv, bias=layer.qkv_bias, scratch=sc)
            rope_append(qkv, positions, m.rope, q, cache[0], cache[1], cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, pdl=pdl)
            self.attention(q, cache[0], cache[1], positions, attn)  # [T, nh, hd]
            c.before_residual(x)
            if p.o is not None and dense(layer.o_proj):
                gemv_residual_rows(layer.o_proj, attn.view(t, cfg.q_size), x, cfg=p.o, scratch=sc)
            else:
                matmul(attn.view(t, cfg.q_size), layer.o_proj, x, accumulate=True, scratch=sc)
            c.after_residual(x)
            if dense(layer.gate_up_proj):
                rmsnorm_gemv_rows(layer.gate_up_proj, x, layer.mlp_norm, eps, gate_up, cfg=p.gate_up, scratch=sc)
            else:
                rmsnorm_rows(x, layer.mlp_norm, eps, h, pdl=pdl)
                matmul(h, layer.gate_up_proj, gate_up, scratch=sc)
            c.before_residual(x)
            if p.down is not None and dense(layer.down_proj):
                silu_gemv_residual_rows(layer.down_proj, gate_up, x, cfg=p.down, scratch=sc)
            else:
                silu_mul_rows(gate_up, act, pdl=pdl)
                matmul(act, layer.down_proj, x, accumulate=True, scratch=sc)
            c.after_residual(x)
        out = c.logits_target(logits)  # [T, V], or a tensor-parallel rank's [T, V / N]
        if dense(m.lm_head):
            rmsnorm_gemv_rows(m.lm_head, x, m.norm, eps, out, cfg=p.lm_head, scratch=sc)  # float32 rows
            return c.gather(logits, out)
        rmsnorm_rows(x, m.norm, eps, h)
        rows = self.logits.view(-1)[:out.numel()].view(out.shape)  # in the activation dtype
        matmul(h, m.lm_head, rows, scratch=sc)
        out.copy_(rows)
        return c.gather(logits, out)


def dense(w) -> bool:
    return isinstance(w, torch.Tensor)
