"""Continuous batching's mixed step on the GPU: prompt chunks of K KV slots and one decode token of each of B other
slots, in one pass over the weights (a `DecodeBatch` with chunks). The body of the "mixed_<bucket>_<size>" graphs (one
chunk) and "mixed_<K>x<bucket>_<size>" (K chunks, each padded to the bucket: prompts arriving together start in one
step instead of one step each).

Why one pass: at batch sizes this small both halves are bound by reading the weights, so a chunk of T tokens and B
decode rows together cost about what the chunk costs alone. Run as a decode step and then a prefill step, a prompt
arriving while 3 streams decode took 1.9x its idle TTFT and stretched their token gap to 2.3x their P50 on an H200
(LLaMA-2-7B, bench/NOTES.md); in one step the decode rows wait for the chunk only.

Rows [i * R, (i + 1) * R) are chunk i (`FusedPrefill`'s row kernels and cuBLAS GEMMs over all K * R + B rows; its
attention reads the chunk's slot, taken from the device, up to each token's position: one `extend_attention` per
chunk); rows [K * R, K * R + B) the decode tokens (RoPE + KV append and flash-decoding attention in each row's own
slot, as `FusedBatchDecoder`). The lm_head runs on the B decode rows, then on each chunk's last valid row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graph_executor.fused_prefill import FusedPrefill
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.extend_attention import extend_attention
from graph_executor.kernels.gemv_batch import BatchGemvPlan, rmsnorm_gemm
from graph_executor.kernels.projections import prefill_scratch, rmsnorm_gemv
from graph_executor.tensor_parallel import StepCollectives


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
        # a tensor-parallel rank's decode rows' logits (the chunks' go through the prefill step's)
        self.batch_collectives = StepCollectives(model.tp, max_decode, cfg.vocab_size, device)

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, chunk_rows: int,
            logits_index: torch.Tensor, chunk_logits: Sequence[torch.Tensor], batch_logits: torch.Tensor) -> None:
        """ids, positions, slots [K * R + B] int64 on the device, K = len(chunk_logits), R = chunk_rows: rows
        [i * R, (i + 1) * R) a prompt chunk of KV slot slots[i * R] (every row of the chunk carries it; positions
        consecutive, padding rows past the prompt), rows [K * R, K * R + B) one decode token each in slot slots[t]
        (all slots distinct). logits_index [K] int64: the row of each chunk's last token, whose logits land in
        chunk_logits[i] [V] float32; batch_logits [B, V] float32: the decode rows', in order (written first: a chunk's
        logits may lie in a padding row's)."""
        m, cfg = self.model, self.model.config
        t, eps, stride = ids.shape[0], cfg.rms_norm_eps, self.slot_stride
        k = len(chunk_logits)
        c = k * chunk_rows
        b = t - c
        if not 1 <= b <= self.max_decode or chunk_rows < 1 or k < 1 or logits_index.shape[0] != k:
            raise ValueError(f"a mixed step of {k} chunks of {chunk_rows} rows and {b} decode rows; at most "
                             f"{self.max_decode} decode, one logits row per chunk")

        def attend(q: torch.Tensor, cache: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
            for i in range(k):  # each chunk over its own slot's cache
                rows = slice(i * chunk_rows, (i + 1) * chunk_rows)
                extend_attention(q[rows], cache[0], cache[1], positions[rows], attn[rows], cfg.sliding_window,
                                 slot=slots[rows.start:rows.start + 1], slot_stride=stride,
                                 workspace=self.prefill.workspace)
            self.attention(q[c:], cache[0], cache[1], positions[c:], attn[c:], slots=slots[c:], slot_stride=stride)
            return attn.view(t, cfg.q_size)

        x = self.prefill.layers(ids, positions, attend, slots=slots)  # [K * R + B, H]
        # The decode rows as FusedBatchDecoder's lm_head, each chunk's row as FusedPrefill's: each the same numerics as
        # in its own kind of step (a greedy argmax then picks what it would there).
        rows = self.batch_collectives.logits_target(batch_logits)
        rmsnorm_gemm(m.lm_head, x[c:], m.norm, eps, rows, cfg=BatchGemvPlan().lm_head, scratch=self.head_scratch)
        self.batch_collectives.gather(batch_logits, rows)
        for i, out in enumerate(chunk_logits):
            torch.index_select(x, 0, logits_index[i:i + 1], out=self.last)
            row = self.prefill.collectives.logits_target(out)
            rmsnorm_gemv(m.lm_head, self.last[0], m.norm, eps, row)
            self.prefill.collectives.gather(out, row)
