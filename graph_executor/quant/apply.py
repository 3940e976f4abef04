"""`--quantize` at load: a model loaded dense is quantized slot by slot on its own device (round-to-nearest,
`formats.quantize_*`), each dense matrix freed as soon as its packed copy exists, so the peak stays at the
dense model's size. On the CPU the packed copy is dequantized straight back into the dense slot: the CPU path
runs dense kernels, and this way it computes with exactly the values the GPU path reads packed."""

from __future__ import annotations

import torch
from tqdm import tqdm

from graph_executor.model import LlamaModel, Weight, set_weight
from graph_executor.quant.formats import PackedWeight, quantize_fp8, quantize_int4, quantize_int8
from graph_executor.quant.specs import WeightPlan, WeightSpec, slot_shapes


def quantize(w: torch.Tensor, spec: WeightSpec) -> PackedWeight:
    """Dense [N, K] -> `spec`'s packed format (round-to-nearest)."""
    if spec.kind == "int4":
        if not spec.offset:
            raise ValueError("quantize: int4 is asymmetric (scale and offset per group)")
        return quantize_int4(w, spec.group)
    if spec.kind == "int8":
        if spec.offset:
            raise ValueError("quantize: int8 is symmetric (a scale per group)")
        return quantize_int8(w, spec.group)
    if spec.kind == "fp8":
        return quantize_fp8(w)
    raise ValueError(f"quantize: {spec.label} is not a packed format")


def get_slot(model: LlamaModel, slot: str) -> Weight:
    owner, _, name = slot.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


def quantize_model(model: LlamaModel, plan: WeightPlan, progress: bool = True,
                   keep_packed: bool | None = None) -> None:
    """Replace every slot `plan` packs with its quantized weight; `keep_packed` None: packed on a GPU, its
    dequantized values (dense) on the CPU (tests keep CPU models packed to run the kernels in the interpreter)."""
    slots = [slot for slot in slot_shapes(model.config) if plan.spec(slot).packed]
    dense_values = not keep_packed if keep_packed is not None else model.device.type == "cpu"
    for slot in tqdm(slots, desc="quantizing", unit="matrix", disable=not progress):
        dense = get_slot(model, slot)
        packed = quantize(dense, plan.spec(slot))
        if dense_values:
            dense.copy_(packed.dequantize(model.dtype))
            continue
        owner, _, name = slot.rpartition(".")
        set_weight(model.get_submodule(owner) if owner else model, name, packed)
        if slot == "embed_tokens" and model.config.tie_word_embeddings:
            set_weight(model, "lm_head", packed)
        del dense
    if not dense_values:
        model.plan = plan
