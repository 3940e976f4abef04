"""The prefill step on the GPU with fused row kernels and cuBLAS GEMMs (about 10 launches per layer instead
of ~45): the body of the prefill and chunk CUDA graphs. Residual adds ride in the GEMM (`addmm_`), RMSNorm and
SwiGLU are one Triton kernel each, RoPE + KV append one kernel, and the lm_head runs on the last valid row only
through the fused RMSNorm-GEMV, straight into the float32 logits buffer. Packed weights take the low-bit GEMM
(`kernels/projections.py`), which unpacks tiles in registers: no layer is ever dequantized whole.

Short prompts (up to the `ShortPromptPlan`'s rows: 16 as measured) over dense weights take the multi-row GEMVs
instead (kernels/gemv_rows.py): RMSNorm in qkv's and gate_up's prologue, SwiGLU in down_proj's, the residual adds in
o_proj's and down_proj's epilogues (6 launches a layer), each weight read once as the decode step reads it.

On a tensor-parallel rank (`model.tp`) o_proj and down_proj accumulate into a residual that ranks > 0 zero first, one
all-reduce each after them, and lm_head's vocabulary rows are gathered into the logits, as in the decode step."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from graph_executor.kernels import gemv_rows, prefill_plan, projections
from graph_executor.kernels import pdl as pdl_launch
from graph_executor.kernels.extend_attention import ExtendWorkspace, extend_attention
from graph_executor.kernels.projections import embedding, matmul, prefill_scratch, rmsnorm_gemv
from graph_executor.kernels.rope_append import rope_append
from graph_executor.kernels.rows import rmsnorm_rows, silu_mul_rows
from graph_executor.model import LlamaModel
from graph_executor.row_activations import RowActivations
from graph_executor.tensor_parallel import StepCollectives


class FusedPrefill:
    def __init__(self, model: LlamaModel, max_tokens: int,
                 short_plan: prefill_plan.ShortPromptPlan | None = None,
                 fp8_scaled_mm_rows: int | None = None,
                 dequantize_rows: projections.DequantizeRows = projections.DEQUANTIZE_ROWS) -> None:
        """`short_plan`: which prompts take the multi-row GEMVs, with which configs (None: the plan measured for
        this model's hidden size; `prefill_plan.CUBLAS_ONLY`: none). `fp8_scaled_mm_rows`: prompts of this many rows
        and more run their FP8 projections on the FP8 tensor cores, activations quantized per token
        (`projections.matmul`); None: never (W8A8: an opt-in). `dequantize_rows`: from how many rows, per format,
        packed projections are dequantized for cuBLAS instead of the low-bit GEMM."""
        self.model = model
        self.fp8_scaled_mm_rows = fp8_scaled_mm_rows
        self.dequantize_rows = dequantize_rows
        device = model.embed_tokens.device
        self.buffers = RowActivations.allocate(model, max_tokens)
        cfg = model.config
        # key-split partials of the extend attention for short prompts over a long cache (a chat's next turn)
        self.workspace = ExtendWorkspace.allocate(cfg.num_heads, cfg.head_dim, model.max_context, device)
        # split-K partials of the low-bit GEMM for short prompts (None when no projection is packed)
        weights = [w for layer in model.layers for w in (
            layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
        plan = prefill_plan.plan_for(cfg.hidden_size) if short_plan is None else short_plan
        # PDL where the device has it (Hopper and later), else the same configs launched plainly
        self.short_plan = plan if pdl_launch.supported(device) else prefill_plan.with_pdl(plan, False)
        # one scratch for the low-bit GEMM's and the multi-row GEMVs' split-K partials, for any prompt the plan takes
        # (a tensor-parallel rank's slices: the weights' own shapes)
        first = model.layers[0]
        shapes = [tuple(w.shape) for w in (first.qkv_proj, first.o_proj, first.gate_up_proj, first.down_proj)]
        self.scratch = gemv_rows.step_scratch(
            [(min(padded, max_tokens), n, k, rc) for padded, configs in self.short_plan.by_rows
             for (n, k), rc in zip(shapes, configs.all(), strict=True)],
            prefill_scratch(weights, max_tokens, device, dequantize_rows), device)
        self.collectives = StepCollectives(model.tp, 1, cfg.vocab_size, device)  # a tensor-parallel rank's

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor, logits: torch.Tensor,
            from_cache: bool = False, slot: int = 0, slots: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions [T] int64; logits_index [1] int64; logits [vocab] float32, written in place.
        from_cache False: a prompt from position 0 (positions = 0..T-1), causal attention over the T new tokens
        (SDPA); True: any positions (read on the device), attention over the cache up to each token's position
        (`extend_attention`: a prompt continuing a sequence in the cache, or a chunk of a longer one). `slot`:
        the KV slot whose caches the prompt fills; or `slots` ([T] int64 on the device, every row the same slot;
        from_cache only): the slot read on the device, so that one captured graph serves every slot."""
        cfg = self.model.config
        t = ids.shape[0]
        if cfg.sliding_window is not None and t > cfg.sliding_window:
            from_cache = True  # causal attention alone would see past the window
        if slots is not None and not from_cache:
            raise ValueError("a prompt whose slot is read on the device attends from the cache (from_cache=True)")
        stride = self.model.kv_caches.stride(0)

        def attend(q: torch.Tensor, cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if from_cache:
                return extend_attention(q, cache[0], cache[1], positions, out, cfg.sliding_window,
                                        slot=None if slots is None else slots[:1], slot_stride=stride,
                                        workspace=self.workspace).view(t, cfg.q_size)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], cache[0, :, :t][None], cache[1, :, :t][None], is_causal=True,
                enable_gqa=True)  # [1, nh, T, hd]
            return attn[0].transpose(0, 1).reshape(t, cfg.q_size)

        x = self.layers(ids, positions, attend, slot, slots)
        last = x.index_select(0, logits_index)  # [1, H]
        out = self.collectives.logits_target(logits)
        rmsnorm_gemv(self.model.lm_head, last[0], self.model.norm, cfg.rms_norm_eps, out)
        return self.collectives.gather(logits, out)

    def layers(self, ids: torch.Tensor, positions: torch.Tensor,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], slot: int = 0,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding and every decoder layer over T token rows (this step's row buffers); returns the residual
        stream [T, H]. `attend(q, cache, out)`: the attention of the rows' RoPE'd queries q [T, heads, hd] over one
        layer's cache [2, nkv, C, hd] (slot `slot`'s, or slot 0's when `slots` [T] gives each row's slot on the
        device), as [T, heads * hd], with out [T, heads, hd] to write into. The mixed step shares it
        (`fused_mixed.py`): the two differ only in their attention."""
        m, cfg, c = self.model, self.model.config, self.collectives
        t, eps = ids.shape[0], cfg.rms_norm_eps
        b = self.buffers.rows(t)
        x, h, qkv, q, gate_up, act = b.x, b.h, b.qkv, b.q, b.gate_up, b.act
        stride = m.kv_caches.stride(0)  # elements from one slot's caches to the next's
        f8, dq = self.fp8_scaled_mm_rows, self.dequantize_rows
        embedding(m.embed_tokens, ids, x)
        rows = self.short_plan.configs(t)
        if rows is not None and all(isinstance(w, torch.Tensor) for layer in m.layers for w in (
                layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)):
            return self._short_layers(x, b, positions, attend, rows, slot, slots, stride)
        for index, layer in enumerate(m.layers):
            cache = m.kv_caches[slot if slots is None else 0, index]  # [2, nkv, C, hd]; with `slots`, slot 0's
            rmsnorm_rows(x, layer.attn_norm, eps, h)
            matmul(h, layer.qkv_proj, qkv, bias=layer.qkv_bias, scratch=self.scratch, fp8_scaled_mm_rows=f8,
                   dequantize_rows=dq)
            rope_append(qkv, positions, m.rope, q, cache[0], cache[1], cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, slots=slots, slot_stride=stride)
            attn = attend(q, cache, b.attn)  # [T, nh * hd]
            c.before_residual(x)
            matmul(attn, layer.o_proj, x, accumulate=True, scratch=self.scratch, fp8_scaled_mm_rows=f8,
                   dequantize_rows=dq)
            c.after_residual(x)
            rmsnorm_rows(x, layer.mlp_norm, eps, h)
            matmul(h, layer.gate_up_proj, gate_up, scratch=self.scratch, fp8_scaled_mm_rows=f8,
                   dequantize_rows=dq)
            silu_mul_rows(gate_up, act)
            c.before_residual(x)
            matmul(act, layer.down_proj, x, accumulate=True, scratch=self.scratch, fp8_scaled_mm_rows=f8,
                   dequantize_rows=dq)
            c.after_residual(x)
        return x

    def _short_layers(self, x: torch.Tensor, b: RowActivations, positions: torch.Tensor,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                      rows: prefill_plan.ShortPromptConfigs, slot: int, slots: torch.Tensor | None,
                      stride: int) -> torch.Tensor:
        """`layers` for a short prompt over dense weights: the multi-row GEMVs with their fusions."""
        m, cfg, c, sc = self.model, self.model.config, self.collectives, self.scratch
        eps = cfg.rms_norm_eps
        for index, layer in enumerate(m.layers):
            cache = m.kv_caches[slot if slots is None else 0, index]  # [2, nkv, C, hd]
            gemv_rows.rmsnorm_gemv_rows(layer.qkv_proj, x, layer.attn_norm, eps, b.qkv, bias=layer.qkv_bias,
                                        cfg=rows.qkv, scratch=sc)
            rope_append(b.qkv, positions, m.rope, b.q, cache[0], cache[1], cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, slots=slots, slot_stride=stride, pdl=rows.qkv.pdl)
            attn = attend(b.q, cache, b.attn)  # [T, nh * hd]
            c.before_residual(x)
            gemv_rows.gemv_residual_rows(layer.o_proj, attn, x, cfg=rows.o, scratch=sc)
            c.after_residual(x)
            gemv_rows.rmsnorm_gemv_rows(layer.gate_up_proj, x, layer.mlp_norm, eps, b.gate_up, cfg=rows.gate_up,
                                        scratch=sc)
            c.before_residual(x)
            gemv_rows.silu_gemv_residual_rows(layer.down_proj, b.gate_up, x, cfg=rows.down, scratch=sc)
            c.after_residual(x)
        return x

