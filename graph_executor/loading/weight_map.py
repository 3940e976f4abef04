"""Where each HF checkpoint tensor lands in our fused layout (QKV and gate-up fused at load): a row range of one
fused weight slot (dense or packed: `graph_executor/quant/rows.py` treats both alike)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from graph_executor.quant import rows
from graph_executor.quant.specs import fit, spec_of
from ipc.errors import ModelLoadError

if TYPE_CHECKING:
    from graph_executor.model import LlamaModel

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF tensors that carry no weights we need (older checkpoints store RoPE frequencies).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_names(model: LlamaModel) -> list[str]:
    """Every HF tensor name a complete checkpoint of this config provides."""
    cfg = model.config
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    per_layer += [f"self_attn.{p}_proj.weight" for p in "qkv"]
    if cfg.qkv_bias:
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{n}" for n in per_layer]
    return names


_PARTS = {"self_attn.q_proj.weight": "qkv_proj", "self_attn.k_proj.weight": "qkv_proj",
          "self_attn.v_proj.weight": "qkv_proj", "self_attn.o_proj.weight": "o_proj",
          "mlp.gate_proj.weight": "gate_up_proj", "mlp.up_proj.weight": "gate_up_proj",
          "mlp.down_proj.weight": "down_proj"}


def slot_of(name: str) -> str | None:
    """The fused weight slot (`quant.specs.slot_shapes`) HF tensor `name` is part of; None for norms and biases."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens"
    if name == "lm_head.weight":
        return "lm_head"
    m = _LAYER.match(name)
    if m and m.group(2) in _PARTS:
        return f"layers.{m.group(1)}.{_PARTS[m.group(2)]}"
    return None


def hf_slot(model: LlamaModel, name: str) -> rows.Weight:
    """The view of our storage that HF tensor `name` is copied into (rows of a dense or packed weight)."""
    cfg = model.config
    if name == "model.embed_tokens.weight":
        return model.embed_tokens
    if name == "model.norm.weight":
        return model.norm
    if name == "lm_head.weight":
        return model.lm_head
    m = _LAYER.match(name)
    if not m or int(m.group(1)) >= cfg.num_layers:
        raise ModelLoadError(f"checkpoint tensor {name!r} does not belong to a {cfg.model_type} model of this shape")
    layer, rest = model.layers[int(m.group(1))], m.group(2)
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qkv_rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    simple = {"input_layernorm.weight": layer.attn_norm, "post_attention_layernorm.weight": layer.mlp_norm,
              "self_attn.o_proj.weight": layer.o_proj, "mlp.down_proj.weight": layer.down_proj,
              "mlp.gate_proj.weight": rows.row_slice(layer.gate_up_proj, 0, inter),
              "mlp.up_proj.weight": rows.row_slice(layer.gate_up_proj, inter, 2 * inter)}
    if rest in simple:
        return simple[rest]
    am = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if am:
        start, end = qkv_rows[am.group(1)]
        target = layer.qkv_proj if am.group(2) == "weight" else layer.qkv_bias
        if target is None:
            raise ModelLoadError(f"checkpoint has {name!r} but the config says attention has no bias")
        return rows.row_slice(target, start, end)
    raise ModelLoadError(f"checkpoint tensor {name!r} is not part of a {cfg.model_type} model")


def tp_part(model: LlamaModel, name: str) -> tuple[slice, ...] | None:
    """The index of this tensor-parallel rank's part of checkpoint tensor `name` (None: whole, or no tensor
    parallelism): what a loader reads of it."""
    if model.tp is None or name.endswith(IGNORED_SUFFIXES):
        return None
    return model.tp.checkpoint_part(name, model.full_config)


def copy_into(model: LlamaModel, name: str, tensor: rows.Weight, sliced: bool = False) -> None:
    """Copy one checkpoint tensor (dense, or packed from a GGUF file) into its slot, with a clear error on a shape
    mismatch; a packed tensor is converted exactly to its slot's format (`quant.specs.fit`), or dequantized
    into a dense slot. On a tensor-parallel rank the whole tensor is cut to the rank's part (`tp_part`) unless the
    loader read only that part (`sliced`)."""
    if name.endswith(IGNORED_SUFFIXES):
        return
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
        return  # some tied checkpoints store the shared matrix twice
    part = None if sliced else tp_part(model, name)
    if part is not None:
        try:
            tensor = rows.part(tensor, part)  # a packed tensor keeps its format: its part is exact
        except ValueError as e:
            raise ModelLoadError(f"{name}: {e} (--tensor-parallel {model.tp.size}; --dequantize loads it dense)") \
                from None
    target = hf_slot(model, name)
    if tuple(tensor.shape) != tuple(target.shape):
        raise ModelLoadError(
            f"shape mismatch for {name}: checkpoint has {tuple(tensor.shape)}, "
            f"the config expects {tuple(target.shape)}"
        )
    if isinstance(target, torch.Tensor):
        target.copy_(rows.dequantize(tensor, target.dtype))
        return
    if isinstance(tensor, torch.Tensor):
        raise ModelLoadError(f"{name}: a dense tensor cannot fill a packed slot ({spec_of(target).label})")
    try:
        rows.copy_(target, fit(tensor, spec_of(target)))
    except ValueError as e:
        raise ModelLoadError(f"{name}: {e}") from None


def check_complete(model: LlamaModel, loaded: set[str]) -> None:
    missing = [n for n in expected_names(model) if n not in loaded]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(f"checkpoint is missing {', '.join(missing[:3])}{more}")


def tie_lm_head(model: LlamaModel) -> None:
    """A tensor-parallel rank of a model with tied embeddings: its lm_head holds its vocabulary rows of the (whole)
    embedding, copied once the embedding is loaded."""
    if model.tp is not None and model.config.tie_word_embeddings:
        rows_ = model.tp.vocab_rows(model.full_config)
        model.lm_head.copy_(model.embed_tokens[rows_.start:rows_.stop])
