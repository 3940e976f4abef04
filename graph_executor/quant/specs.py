"""Which format each weight matrix of a model is stored in, and the exact conversions between packed formats.

A `WeightSpec` names one storage format (dense in the activation dtype, or one of the packed formats of
`formats.py` with its group, offset and scale dtype). A `WeightPlan` gives the spec of every fused weight slot
of a model ("embed_tokens", "lm_head", "layers.<i>.qkv_proj", ...), decided before anything is allocated:

- `quantize_plan`: `--quantize int8|int4|fp8` for HF checkpoints and dummy models (round-to-nearest at load);
- `gguf_plan`: a GGUF file's tensor types kept packed. A fused slot whose parts have different packed types
  (Q4_K_M files store some v_proj / down_proj in Q6_K) gets the smallest spec that holds every part exactly
  (`join`), and `fit` converts each part to it without changing a single value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from graph_executor.loading.config import ModelConfig
from graph_executor.loading.shape_rules import check_group
from graph_executor.quant.formats import (
    GROUPS,
    INT4_ZERO,
    Fp8Rows,
    Int4Groups,
    Int8Groups,
    PackedWeight,
)
from graph_executor.quant.names import DEFAULT_GROUP, QUANTIZE_METHODS

KINDS = ("dense", "int4", "int8", "fp8")


@dataclass(frozen=True)
class WeightSpec:
    kind: str = "dense"
    group: int = DEFAULT_GROUP  # int4 / int8: weights per scale along K
    offset: bool = False  # int4 / int8: a per-group offset (value = scale * q + offset)
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"weight kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind in ("int4", "int8") and self.group not in GROUPS:
            raise ValueError(f"group {self.group} is not one of {GROUPS}")

    @property
    def packed(self) -> bool:
        return self.kind != "dense"

    @property
    def label(self) -> str:
        """Short name for reports: "fp16", "int4-g32", "int8-g16+offset", "fp8"."""
        if self.kind in ("dense", "fp8"):
            return self.kind
        return f"{self.kind}-g{self.group}" + ("+offset" if self.offset else "")

    def nbytes(self, n: int, k: int, dtype: torch.dtype) -> int:
        """Bytes an [N, K] matrix takes in this format (dense: in `dtype`)."""
        if self.kind == "dense":
            return n * k * torch.empty((), dtype=dtype).element_size()
        if self.kind == "fp8":
            return n * k + 4 * n
        codes = n * k // 2 if self.kind == "int4" else n * k
        per_scale = torch.empty((), dtype=self.scale_dtype).element_size()
        return codes + n * (k // self.group) * per_scale * (2 if self.offset else 1)

    def empty(self, n: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | PackedWeight:
        """Uninitialised storage for an [N, K] matrix (dense: in `dtype`)."""
        if self.kind == "dense":
            return torch.empty(n, k, device=device, dtype=dtype)
        if self.kind == "fp8":
            return Fp8Rows(torch.empty(n, k, device=device, dtype=torch.float8_e4m3fn),
                           torch.empty(n, device=device, dtype=torch.float32))
        if k % self.group:
            raise ValueError(f"K = {k} is not a multiple of the group ({self.group})")

        def scales() -> torch.Tensor:
            return torch.empty(n, k // self.group, device=device, dtype=self.scale_dtype)

        offset = scales() if self.offset else None
        if self.kind == "int4":
            return Int4Groups(torch.empty(n, k // 2, device=device, dtype=torch.uint8), scales(), offset, self.group)
        return Int8Groups(torch.empty(n, k, device=device, dtype=torch.int8), scales(), offset, self.group)


DENSE = WeightSpec()


def spec_of(w: torch.Tensor | PackedWeight) -> WeightSpec:
    if isinstance(w, torch.Tensor):
        return DENSE
    if isinstance(w, Fp8Rows):
        return WeightSpec("fp8")
    kind = "int4" if isinstance(w, Int4Groups) else "int8"
    return WeightSpec(kind, w.group, w.offset is not None, w.scale.dtype)


def join(specs: Iterable[WeightSpec]) -> WeightSpec:
    """The smallest packed spec that holds each of `specs` exactly: int8 if any part is int8 (4-bit codes fit
    in int8), the smallest group (a scale per 32 is also a scale per 16, repeated), an offset if any part has
    one, float32 scales if any part has them. Dense or FP8 parts mix with nothing else: dense."""
    specs = list(specs)
    if not specs or any(s.kind in ("dense", "fp8") for s in specs):
        kinds = {s.kind for s in specs}
        return specs[0] if len(kinds) == 1 and specs[0].kind == "fp8" else DENSE
    scale_dtype = torch.float32 if any(s.scale_dtype == torch.float32 for s in specs) else torch.float16
    kind = "int8" if any(s.kind == "int8" for s in specs) else "int4"
    return WeightSpec(kind, min(s.group for s in specs), any(s.offset for s in specs), scale_dtype)


def _regroup(t: torch.Tensor | None, group: int, to_group: int) -> torch.Tensor | None:
    """Per-group values [N, K / group] -> [N, K / to_group] for to_group dividing group (each repeated)."""
    if t is None or group == to_group:
        return t
    return t.repeat_interleave(group // to_group, dim=1).contiguous()


def fit(w: PackedWeight, spec: WeightSpec) -> PackedWeight:
    """`w` converted to `spec` without changing any weight's value; ValueError where that is impossible."""
    have = spec_of(w)
    if have == spec:
        return w
    if spec.kind == "fp8" or have.kind == "fp8" or spec.kind == "dense":
        raise ValueError(f"cannot convert {have.label} weights to {spec.label} exactly")
    if spec.group > have.group or have.group % spec.group:
        raise ValueError(f"cannot regroup {have.label} weights to group {spec.group}")
    if have.kind == "int8" and spec.kind == "int4":
        raise ValueError(f"cannot convert {have.label} weights to {spec.label} exactly")
    if have.offset and not spec.offset:
        raise ValueError(f"cannot drop the offsets of {have.label} weights")
    if spec.scale_dtype == torch.float16 and have.scale_dtype == torch.float32:
        raise ValueError(f"cannot narrow float32 scales of {have.label} weights to float16 exactly")
    scale, offset = w.scale, w.offset
    symmetric_int4 = isinstance(w, Int4Groups) and offset is None
    if symmetric_int4 and (spec.offset or spec.kind == "int4"):
        # value = scale * (q - 8) = scale * q + (-8 * scale): exact (a power-of-two multiple)
        offset = scale * -INT4_ZERO if spec.offset else None
    if spec.offset and offset is None:
        offset = torch.zeros_like(scale)
    scale = _regroup(scale.to(spec.scale_dtype), have.group, spec.group)
    offset = _regroup(None if offset is None else offset.to(spec.scale_dtype), have.group, spec.group)
    if spec.kind == "int4":
        if not spec.offset:  # both symmetric: same codes, same zero point
            return Int4Groups(w.codes, scale, None, spec.group)
        return Int4Groups(w.codes, scale, offset, spec.group)
    if isinstance(w, Int4Groups):
        q = w.unpack().to(torch.int8)  # 0..15
        if offset is None:  # symmetric int4 into symmetric int8: shift the zero point into the codes
            q = q - INT4_ZERO
        return Int8Groups(q.contiguous(), scale, offset, spec.group)
    return Int8Groups(w.codes, scale, offset, spec.group)


@dataclass(frozen=True)
class WeightPlan:
    """The spec of each fused weight slot; slots not named are dense. `dequantized` lists GGUF tensors that
    had to be dequantized at load and why (reported once at load)."""

    specs: Mapping[str, WeightSpec] = field(default_factory=dict)
    dequantized: tuple[str, ...] = ()

    def spec(self, slot: str) -> WeightSpec:
        return self.specs.get(slot, DENSE)

    @property
    def packed(self) -> bool:
        return any(s.packed for s in self.specs.values())


def slot_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every fused weight slot of a Llama-family model and its [N, K] (a tied lm_head is embed_tokens)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {"embed_tokens": (v, h)} | ({} if config.tie_word_embeddings else {"lm_head": (v, h)})
    per_layer = {"qkv_proj": (config.q_size + 2 * config.kv_size, h), "o_proj": (h, config.q_size),
                 "gate_up_proj": (2 * i, h), "down_proj": (h, i)}
    for layer in range(config.num_layers):
        shapes |= {f"layers.{layer}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def weight_bytes(config: ModelConfig, plan: WeightPlan, dtype: torch.dtype) -> int:
    """Bytes of all weights under `plan`: the slots in their formats, norms and biases in `dtype`."""
    slots = sum(plan.spec(slot).nbytes(n, k, dtype) for slot, (n, k) in slot_shapes(config).items())
    elt = torch.empty((), dtype=dtype).element_size()
    dense_rest = config.hidden_size * (2 * config.num_layers + 1)  # the RMSNorm weights
    if config.qkv_bias:
        dense_rest += config.num_layers * (config.q_size + 2 * config.kv_size)
    return slots + dense_rest * elt


def quantize_plan(method: str, group: int, config: ModelConfig) -> WeightPlan:
    """`--quantize`: projections in `method`; the embedding and lm_head in int8 g32 for int4 and fp8 (as
    llama.cpp keeps them at 6-8 bits in its 4-bit types: the vocabulary projection costs the most quality per
    byte; on SmolLM2-135M an FP8 lm_head alone cost 2.2% perplexity, int8 0.6% for the whole model). fp8 also keeps
    down_proj in int8 g32 (where its K divides by 32), as llama.cpp's mixes keep their most sensitive projections at
    more bits: on SmolLM2-135M e4m3 rows everywhere else cost 1.18% perplexity, 0.75% with down_proj in int8 (o_proj
    in int8: 1.16%, gate_up: 0.68% for twice down's bytes), for +0.5 bit on a quarter of the weights."""
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_METHODS)}, got {method!r}")
    if group not in GROUPS:
        raise ValueError(f"--quantize-group must be one of {', '.join(map(str, GROUPS))}, got {group}")
    check_group(method, group, config)
    specs: dict[str, WeightSpec] = {}
    for slot, (n, k) in slot_shapes(config).items():
        vocab = slot in ("embed_tokens", "lm_head")
        if vocab:
            specs[slot] = WeightSpec("int8", DEFAULT_GROUP if method != "int8" else group, offset=False)
        elif method == "fp8" and slot.endswith("down_proj") and k % DEFAULT_GROUP == 0:
            specs[slot] = WeightSpec("int8", DEFAULT_GROUP, offset=False)
        elif method == "fp8":
            specs[slot] = WeightSpec("fp8")
        elif method == "int8":
            specs[slot] = WeightSpec("int8", group, offset=False)
        else:
            specs[slot] = WeightSpec("int4", group, offset=True)
    return WeightPlan(specs)


def describe(plan: WeightPlan, dtype: torch.dtype) -> str:
    """One line for reports: "int4-g32+offset (embed_tokens: int8-g32)" or the dtype's name when all dense."""
    dense = str(dtype).removeprefix("torch.")
    labels = [dense if s.kind == "dense" else s.label for s in plan.specs.values()]
    if not labels:
        return dense
    main = max(set(labels), key=labels.count)
    others = sorted({f"{slot.split('.')[-1]}: {plan.spec(slot).label if plan.spec(slot).packed else dense}"
                     for slot in plan.specs if (plan.spec(slot).label if plan.spec(slot).packed else dense) != main})
    return main + (f" ({', '.join(others)})" if others else "")
