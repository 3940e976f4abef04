"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2, TinyLlama) with a static KV cache.

Weights are stored fused (QKV, gate-up) and allocated once on the target device; loaders copy each checkpoint
tensor into its slice (`weight_map.hf_slot`). The step is graph-safe: no `.item()`, no host branching on tensor
values; the KV cache is written by position index and read up to `kv_len`, a host-side static bound.
`forward` is the reference step (the CPU path runs it; the GPU path's fused kernels are tested against it).

A weight slot holds a dense tensor in the activation dtype or, where the model's `WeightPlan` says so, a packed
low-bit weight (`graph_executor/quant/formats.py`): the GPU kernels read those packed; the reference step
dequantizes them per use (correct, slow: the CPU path dequantizes at load instead).
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import nn

from graph_executor.loading.config import ModelConfig
from graph_executor.quant import rows
from graph_executor.quant.formats import Fp8Rows
from graph_executor.quant.specs import WeightPlan
from graph_executor.rope import apply_rope, rope_tables
from graph_executor.tensor_parallel import TensorParallel

Weight = rows.Weight  # [N, K]: a dense tensor or a packed weight


def set_weight(module: nn.Module, name: str, w: Weight) -> None:
    """Store `w` as `module.<name>`: a dense tensor as a buffer, a packed weight as a plain attribute (its parts
    are tensors of its own); replaces what was there (quantization at load swaps dense for packed)."""
    module._buffers.pop(name, None)
    if name in module.__dict__:
        del module.__dict__[name]
    if isinstance(w, torch.Tensor):
        module.register_buffer(name, w)
    else:
        object.__setattr__(module, name, w)


def zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros; on the CPU an anonymous mapping instead, whose pages are the kernel's zero page until written:
    a KV cache of a few hundred MB costs nothing until positions are written (torch.zeros wrote every page at
    start-up: 0.1-0.3 s of `serve`'s start on the 2-core CPU machine for SmolLM2's 360 MiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    numel = math.prod(shape)
    if numel == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize), dtype=dtype).view(shape)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, w8a8: bool = False) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T (+ bias) -> [T, N]; packed weights dequantized for this call. `w8a8`: an FP8 weight
    multiplies x quantized per token row to FP8 (`fp8_scaled_mm.matmul`, as `FusedPrefill(fp8_scaled_mm_rows=)`)."""
    if w8a8 and isinstance(w, Fp8Rows):
        from graph_executor.kernels import fp8_scaled_mm  # no Triton; the package is the GPU path's, hence here

        return fp8_scaled_mm.matmul(x, w, torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device), bias)
    return F.linear(x, rows.dequantize(w, x.dtype), bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    qkv_proj: Weight
    o_proj: Weight
    gate_up_proj: Weight
    down_proj: Weight

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype, plan: WeightPlan,
                 index: int) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        qkv = config.q_size + 2 * config.kv_size

        def buf(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        self.attn_norm = nn.Buffer(buf(h))
        self.qkv_bias = nn.Buffer(buf(qkv)) if config.qkv_bias else None
        self.mlp_norm = nn.Buffer(buf(h))
        for name, (n, k) in (("qkv_proj", (qkv, h)), ("o_proj", (h, config.q_size)),
                             ("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
            set_weight(self, name, plan.spec(f"layers.{index}.{name}").empty(n, k, device, dtype))


class LlamaModel(nn.Module):
    """Weights, RoPE tables and the KV cache of one model; `forward` runs one prefill or decode step."""

    embed_tokens: Weight
    lm_head: Weight

    def __init__(self, config: ModelConfig, max_context: int, device: torch.device, dtype: torch.dtype,
                 plan: WeightPlan | None = None, slots: int = 1, tp: TensorParallel | None = None,
                 full_config: ModelConfig | None = None):
        """`slots`: KV caches for this many sequences at once (batched decode, `forward_batch`). `tp`: this model is
        one rank's part of a tensor-parallel model (graph_executor/tensor_parallel.py): `config` has the rank's head
        and intermediate counts (`TensorParallel.local_config`), lm_head holds the rank's vocabulary rows, and a step
        all-reduces after o_proj and down_proj and gathers the logits; `full_config` is the whole model's (what its
        checkpoint holds)."""
        super().__init__()
        if slots < 1:
            raise ValueError(f"a model needs at least one KV slot, got {slots}")
        plan = plan or WeightPlan()
        self.config = config
        self.max_context = max_context
        self.dtype = dtype
        self.device = device
        h, v = config.hidden_size, config.vocab_size
        set_weight(self, "embed_tokens", plan.spec("embed_tokens").empty(v, h, device, dtype))
        self.layers = nn.ModuleList(DecoderLayer(config, device, dtype, plan, i) for i in range(config.num_layers))
        self.norm = nn.Buffer(torch.empty(h, device=device, dtype=dtype))
        self.tp = tp
        self.full_config = full_config or config
        set_weight(self, "lm_head", self.embed_tokens if config.tie_word_embeddings and tp is None
                   else plan.spec("lm_head").empty(v // (tp.size if tp else 1), h, device, dtype))
        self.plan = plan
        # the reference step's FP8 projections (qkv, o, gate_up, down) multiply activations quantized per token (W8A8:
        # what FusedPrefill(fp8_scaled_mm_rows=) computes), for bench.quality to score that prefill; False: W8A16
        self.fp8_activations = False
        self.rope = nn.Buffer(rope_tables(config, max_context, device))  # [C, 2, hd] float32
        # [slots, layers, 2 (k, v), kv_heads, C, hd]: each slot's cache is one contiguous block laid out as a batch-1
        # model's; zeroed so that never-written positions hold finite values.
        self.kv_caches = nn.Buffer(zeros((slots, config.num_layers, 2, config.num_kv_heads, max_context,
                                          config.head_dim), device, dtype))

    @property
    def slots(self) -> int:
        return self.kv_caches.shape[0]

    @property
    def kv_cache(self) -> torch.Tensor:
        """[layers, 2, kv_heads, C, hd]: slot 0's cache, the one the batch-1 GPU kernels read and write."""
        return self.kv_caches[0]

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor, kv_len: int,
        slot: int = 0, project: bool = True,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64, one sequence, in KV slot `slot`; logits_index: [n] int64 rows of the
        step to project to logits; kv_len: static bound on positions attended (>= max position + 1). Returns
        logits [n, vocab]; with `project` False, those rows' final-normed hidden states [n, H] instead (for
        `project_logits` to take a block at a time: a prompt's every row at a large vocabulary)."""
        mask = self._attention_mask(positions, kv_len)  # [T, kv_len] bool
        caches = self.kv_caches[slot]  # [L, 2, nkv, C, hd]

        def attend(q: torch.Tensor, index: int) -> torch.Tensor:  # q [T, nh, hd] -> [T, nh * hd]
            cache = caches[index]
            keys, values = cache[0, :, :kv_len], cache[1, :, :kv_len]  # [nkv, S, hd]
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
            )  # [1, nh, T, hd]
            return out[0].transpose(0, 1).reshape(q.shape[0], -1)

        def append(index: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v [T, nkv, hd] at `positions`
            cache = caches[index]  # [2, nkv, C, hd]
            cache[0].index_copy_(1, positions, k.transpose(0, 1))
            cache[1].index_copy_(1, positions, v.transpose(0, 1))

        return self._run(input_ids, positions, logits_index, attend, append, project)

    @torch.inference_mode()
    def forward_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """One decode step of B sequences: row b is the token input_ids[b] at positions[b] of KV slot slots[b]
        (distinct slots). input_ids, positions: [B] int64. Returns logits [B, vocab]. The projections read each
        weight once for all rows; attention reads each row's own slot up to its own position."""
        batch = len(slots)
        lengths = [int(p) + 1 for p in positions.tolist()]  # host values: the reference step may branch on them
        window = self.config.sliding_window
        slot_index = torch.tensor(slots, dtype=torch.int64, device=positions.device)  # [B]

        def attend(q: torch.Tensor, index: int) -> torch.Tensor:  # q [B, nh, hd] -> [B, nh * hd]
            out = []
            for b, (slot, length) in enumerate(zip(slots, lengths)):
                cache = self.kv_caches[slot, index]  # [2, nkv, C, hd]
                first = 0 if window is None else max(0, length - window)  # as `_attention_mask`
                keys, values = cache[0, :, first:length], cache[1, :, first:length]  # [nkv, S, hd]
                o = F.scaled_dot_product_attention(q[b, :, None][None], keys[None], values[None],
                                                   enable_gqa=True)  # [1, nh, 1, hd]: every position kept
                out.append(o[0, :, 0].reshape(-1))
            return torch.stack(out)

        def append(index: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v [B, nkv, hd]
            cache = self.kv_caches[:, index]  # [slots, 2, nkv, C, hd]
            cache[slot_index, 0, :, positions] = k
            cache[slot_index, 1, :, positions] = v

        every_row = torch.arange(batch, device=positions.device)  # [B]
        return self._run(input_ids, positions, every_row, attend, append)

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor,
             attend, append, project: bool = True) -> torch.Tensor:
        cfg = self.config
        x = rows.dequantize(rows.select_rows(self.embed_tokens, input_ids), self.dtype)  # [T, H]
        cos_sin = self.rope.index_select(0, positions)  # [T, 2, hd]
        cos, sin = cos_sin[:, 0:1], cos_sin[:, 1:2]  # [T, 1, hd]
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            q = self._qkv_rope(layer, h, cos, sin, lambda k, v, i=index: append(i, k, v))
            x = x + self._reduce(linear(attend(q, index), layer.o_proj, w8a8=self.fp8_activations))
            x = x + self._reduce(self._mlp(layer, rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)))
        x = rms_norm(x.index_select(0, logits_index), self.norm, cfg.rms_norm_eps)  # [n, H]
        return self.project_logits(x) if project else x

    @torch.inference_mode()
    def project_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden rows [n, H] -> logits [n, vocab] (gathered over the tensor-parallel ranks)."""
        logits = linear(x, self.lm_head)  # [n, V] ([n, V / ranks] on a tensor-parallel rank)
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-split projection's output [T, H]: summed over the tensor-parallel ranks (as is on one rank)."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        key_pos = torch.arange(kv_len, device=positions.device)  # [S]
        mask = key_pos[None, :] <= positions[:, None]  # [T, S] causal over the cache
        if self.config.sliding_window is not None:
            mask &= key_pos[None, :] > positions[:, None] - self.config.sliding_window
        return mask

    def _qkv_rope(self, layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  append) -> torch.Tensor:
        """QKV projection and RoPE; `append(k, v)` ([T, nkv, hd] each) writes K and V into the cache. Returns
        q [T, nh, hd]."""
        cfg = self.config
        t = x.shape[0]
        qkv = linear(x, layer.qkv_proj, layer.qkv_bias, w8a8=self.fp8_activations)  # [T, q + 2kv]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(q.view(t, cfg.num_heads, cfg.head_dim), cos, sin)  # [T, nh, hd]
        k = apply_rope(k.view(t, cfg.num_kv_heads, cfg.head_dim), cos, sin)  # [T, nkv, hd]
        append(k, v.view(t, cfg.num_kv_heads, cfg.head_dim))
        return q

    def _mlp(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, layer.gate_up_proj, w8a8=self.fp8_activations).chunk(2, dim=-1)  # [T, I] each
        return linear(F.silu(gate) * up, layer.down_proj, w8a8=self.fp8_activations)
