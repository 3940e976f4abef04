"""Continuous batching's mixed step on the GPU: a prompt chunk of one KV slot and one decode token of each of B other
slots, in one pass over the weights (a `DecodeBatch` with a chunk). The body of the "mixed_<bucket>_<size>" graphs.

Why one pass: at batch sizes this small both halves are bound by reading the weights, so a chunk of T tokens and B
decode rows together cost about what the chunk costs alone. Run as a decode step and then a prefill step, a prompt
arriving while 3 streams decode took 1.9x its idle TTFT and stretched their token gap to 2.3x their P50 on an H200
(LLaMA-2-7B, bench/NOTES.md); in one step the decode rows wait for the chunk only.

Rows [0, T) are the chunk (`FusedPrefill`'s row kernels and cuBLAS GEMMs over all T + B rows; its attention reads
the chunk's slot, taken from the device, up to each token's position: `extend_attention`); rows [T, T + B) the
decode tokens (RoPE + KV append and flash-decoding attention in each row's own slot, as `FusedBatchDecoder`). The
lm_head runs on the chunk's last valid row and the B decode rows only.
"""

from __future__ import annotations

import torch

from graph_executor.fused_prefill import FusedPrefill
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.extend_attention import extend_attention
from graph_executor.kernels.gemv_batch import BatchGemvPlan, rmsnorm_gemm
from graph_executor.kernels.projections import prefill_scratch, rmsnorm_gemv


class FusedMixedStep:
    def __init__(self, prefill: FusedPrefill, max_decode: int) -> None:
        """`prefill`: the step whose row buffers (sized for its largest bucket) and model this one shares; graphs run
        one at a time on one stream, so sharing them is safe. `max_decode`: the most decode rows (B)."""
        model = prefill.model
        cfg = model.config
        device = model.embed_tokens.device
        self.model, self.prefill, self.max_decode = model, prefill, max_decode
        self.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context, device,
                                         cfg.sliding_window, max_tokens=max_decode, batched=True)
        self.slot_stride = model.kv_caches.stride(0)  # elements from one slot's caches to the next's
        self.last = torch.empty(1, cfg.hidden_size, device=device, dtype=model.dtype)  # the chunk's last valid row
        self.head_scratch = prefill_scratch([model.lm_head], max_decode, device)  # a packed lm_head's partials

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, chunk_rows: int,
            logits_index: torch.Tensor, logits: torch.Tensor, batch_logits: torch.Tensor) -> None:
        """ids, positions, slots [T + B] int64 on the device: rows [0, T = chunk_rows) a prompt chunk of KV slot
        slots[0] (every chunk row carries it; positions consecutive, padding rows past the prompt), rows [T, T + B)
        one decode token each in slot slots[t] (distinct from the chunk's). logits_index [1] int64: the chunk row
        whose logits land in `logits` [V] float32; batch_logits [B, V] float32: the decode rows', in order."""
        m, cfg = self.model, self.model.config
        t, eps, stride = ids.shape[0], cfg.rms_norm_eps, self.slot_stride
        c, b = chunk_rows, ids.shape[0] - chunk_rows
        if not 1 <= b <= self.max_decode or c < 1:
            raise ValueError(f"a mixed step of {c} chunk rows and {b} decode rows; at most {self.max_decode} decode")

        def attend(q: torch.Tensor, cache: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
            extend_attention(q[:c], cache[0], cache[1], positions[:c], attn[:c], cfg.sliding_window, slot=slots[:1],
                             slot_stride=stride, workspace=self.prefill.workspace)
            self.attention(q[c:], cache[0], cache[1], positions[c:], attn[c:], slots=slots[c:], slot_stride=stride)
            return attn.view(t, cfg.q_size)

        x = self.prefill.layers(ids, positions, attend, slots=slots)  # [T + B, H]
        # The chunk's row as FusedPrefill's lm_head, the decode rows as FusedBatchDecoder's: each the same numerics as
        # in its own kind of step (a greedy argmax then picks what it would there).
        torch.index_select(x, 0, logits_index, out=self.last)
        rmsnorm_gemv(m.lm_head, self.last[0], m.norm, eps, logits)
        rmsnorm_gemm(m.lm_head, x[c:], m.norm, eps, batch_logits, cfg=BatchGemvPlan().lm_head,
                     scratch=self.head_scratch)
