"""What a model's shapes cost the floors, without loading its weights: bytes read per decoded token, KV bytes
per token of context, parameters. Byte counts come from graph_executor.memory, the rule loading uses, in the
weights' storage format (`graph_executor.quant.specs.WeightPlan`: codes + scales + offsets for packed slots);
what a process needs to hold the model ("will it fit") is graph_executor.memory's `required_bytes` /
`check_fits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench.spec import BenchSpec
from graph_executor.loading.config import ModelConfig
from graph_executor.memory import needed_bytes
from graph_executor.quant.specs import WeightPlan, describe, quantize_plan
from graph_executor.tensor_parallel import TensorParallel


def weight_plan(spec: BenchSpec) -> WeightPlan:
    """How the hybridrt engines of `spec` store the weights, as the loader decides it (without loading)."""
    cfg = ModelConfig.from_hf_dict(spec.model_config)
    if spec.quantize:
        plan = quantize_plan(spec.quantize, spec.quantize_group, cfg)  # validates the group on any device
        return plan if spec.on_gpu else WeightPlan()  # the CPU path dequantizes at load
    if spec.model.endswith(".gguf") and spec.on_gpu and not spec.dequantize:
        from graph_executor.loading.gguf_loader import gguf_plan, open_gguf

        return gguf_plan(open_gguf(Path(spec.model)), cfg)
    return WeightPlan()


@dataclass(frozen=True)
class ModelCost:
    params: int
    dtype_bytes: int
    decode_weight_bytes: int  # weights read by one decode step: all but the embedding rows not looked up
    kv_bytes_per_token: int  # K and V of one position, all layers
    weight_bytes: int = 0  # all weights as stored
    matmul_params: int = 0  # parameters that take part in a token's matmuls (2 FLOPs each per token)
    weight_format: str = ""  # e.g. "float16", "int4-g32+offset (embed_tokens: int8-g32)"

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: str, plan: WeightPlan | None = None, ranks: int = 1) -> ModelCost:
        """`dtype` is a torch dtype name, e.g. "float16"; `plan` the weights' storage (None: all in dtype).
        `ranks` > 1: what one tensor-parallel rank (one GPU) holds and reads (`TensorParallel.local_config`: its
        heads, KV heads, MLP block, and 1/ranks of lm_head's rows; the embedding table whole)."""
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        plan = plan or WeightPlan()
        local = cfg if ranks == 1 else TensorParallel(0, ranks).local_config(cfg)
        weight_bytes, kv = needed_bytes(local, torch_dtype, 1, plan)
        # An untied embedding table is only indexed (one row per token), so a step does not read it; a tied one is
        # read whole by the lm_head. On a rank lm_head holds its 1/ranks share of the rows (counted whole above: the
        # local config keeps the vocabulary whole), a copy of the table's where tied (weight_map), beside the table.
        table = cfg.vocab_size * cfg.hidden_size
        embed = plan.spec("embed_tokens").nbytes(cfg.vocab_size, cfg.hidden_size, torch_dtype)
        unread = 0 if cfg.tie_word_embeddings else embed
        if ranks > 1:
            head = embed if cfg.tie_word_embeddings else plan.spec("lm_head").nbytes(cfg.vocab_size, cfg.hidden_size,
                                                                                     torch_dtype)
            weight_bytes += head // ranks - (0 if cfg.tie_word_embeddings else head)
            unread = embed
        matmul = (cfg.num_params() - (0 if cfg.tie_word_embeddings else table)) // ranks
        return cls(cfg.num_params(), torch_dtype.itemsize, weight_bytes - unread, kv, weight_bytes, matmul,
                   describe(plan, torch_dtype))

    @property
    def bits_per_weight(self) -> float:
        """Bits read per matmul weight by a decode step (norms and biases included)."""
        return 8 * self.decode_weight_bytes / self.matmul_params

    def to_dict(self) -> dict:
        return {"params": self.params, "dtype_bytes": self.dtype_bytes, "weight_bytes": self.weight_bytes,
                "decode_weight_bytes": self.decode_weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
                "weight_format": self.weight_format, "bits_per_weight": round(self.bits_per_weight, 3)}
