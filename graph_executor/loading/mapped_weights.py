"""CPU weights without a copy: a model's weight slots as views of a private (copy-on-write) mapping of its
safetensors files, where a file's bytes allow it.

A fused slot (QKV, gate-up, the QKV bias) can be a view of a file only when the file stores its parts one after
another in the slot's row order (q, k, v; gate, up) in the model's dtype. `save_fused_order` writes such a file
(an ordinary safetensors file with HF names: transformers and the safetensors package read it as any other);
`safetensors.torch.save_file` orders tensors by name (k, o, q, v); transformers' `save_pretrained` writes them in the
modules' order (q, k, v: mapped, unless biases sit between them). Slots whose parts are not in place are copied as
before (`loader._load_safetensors`). Slots of one tensor (embeddings, o_proj,
down_proj, norms) map from any file whose dtype matches.

Why: loading the default model on the 2-core CPU machine copied its 538 MB into freshly allocated buffers, 0.3-1.0 s
of `copy_` and page faults depending on what else ran (issue 13: `serve` ready <= 4 s there). A mapping costs a few
milliseconds; its pages come from the page cache when the first step reads them.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graph_executor.model import LlamaModel, set_weight
from ipc.errors import ModelLoadError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
# a layer's tensors in the order save_fused_order writes them: each fused slot's parts consecutive, in row order
LAYER_ORDER = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
               "self_attn.v_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
               "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
               "mlp.up_proj.weight", "mlp.down_proj.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _order_key(name: str) -> tuple:
    m = _LAYER.match(name)
    if m is None:  # embeddings first, the final norm and lm_head last
        return (0 if name == "model.embed_tokens.weight" else 2, 0, 0, name)
    rest = m.group(2)
    return (1, int(m.group(1)), LAYER_ORDER.index(rest) if rest in LAYER_ORDER else len(LAYER_ORDER), rest)


def save_fused_order(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (HF names, CPU tensors of the dtypes in DTYPES) as a safetensors file whose fused slots' parts
    are consecutive (LAYER_ORDER), so that `map_slots` can serve every slot from it without a copy."""
    names = sorted(tensors, key=_order_key)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} is not one of {', '.join(map(str, DTYPES.values()))}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            f.write(tensors[name].detach().contiguous().view(torch.uint8).numpy().data)


@dataclass(frozen=True)
class _Entry:
    file: int  # index into the mapped files
    begin: int  # byte offsets in that file's data section
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class MappedFiles:
    """Private mappings of safetensors files and the byte range of each tensor in them."""

    def __init__(self, files: list[Path]) -> None:
        self.data: list[torch.Tensor] = []  # uint8 [file bytes from the data section on], one per file
        self.entries: dict[str, _Entry] = {}
        for index, file in enumerate(files):
            with open(file, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            size = file.stat().st_size
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
            if 8 + length + max(ends, default=0) != size:
                raise ModelLoadError(f"cannot read {file}: its header describes {8 + length + max(ends, default=0)} "
                                     f"bytes, the file has {size} (a truncated or damaged .safetensors file?)")
            storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=size)  # copy-on-write
            self.data.append(torch.empty(0, dtype=torch.uint8).set_(storage)[8 + length:])
            for name, info in header.items():
                if name == "__metadata__" or info.get("dtype") not in DTYPES:
                    continue
                begin, end = info["data_offsets"]
                self.entries[name] = _Entry(index, begin, end, DTYPES[info["dtype"]], tuple(info["shape"]))

    def view(self, parts: tuple[str, ...], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor | None:
        """`parts` (HF names) as one tensor of `shape` viewing the mapping, or None when they are not all there,
        not consecutive in this order in one file, not of `dtype`, or not `shape` together."""
        entries = [self.entries.get(name) for name in parts]
        if any(e is None or e.dtype != dtype or e.file != entries[0].file for e in entries):
            return None
        if any(a.end != b.begin for a, b in zip(entries, entries[1:])):
            return None
        first, last = entries[0], entries[-1]
        size = dtype.itemsize
        if first.begin % size or (last.end - first.begin) != size * math.prod(shape):
            return None
        if len(shape) == 2 and any(len(e.shape) != 2 or e.shape[1] != shape[1] for e in entries):
            return None  # row blocks of the slot's width (a transposed or mislabelled tensor is copied, and fails there)
        return self.data[first.file][first.begin:last.end].view(dtype).view(shape)


def map_slots(model: LlamaModel, files: list[Path]) -> set[str]:
    """Point every dense weight slot of `model` (a CPU model, one rank) that `files` hold in place, in its dtype and
    row order, at a view of the files' mapping; the HF names of the tensors it covered (the caller copies the rest).
    """
    mapped = MappedFiles(files)
    cfg = model.config
    slots: list[tuple[nn.Module, str, tuple[str, ...]]] = [
        (model, "embed_tokens", ("model.embed_tokens.weight",)), (model, "norm", ("model.norm.weight",))]
    if not cfg.tie_word_embeddings:
        slots.append((model, "lm_head", ("lm_head.weight",)))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        slots += [(layer, "attn_norm", (p + "input_layernorm.weight",)),
                  (layer, "qkv_proj", tuple(f"{p}self_attn.{x}_proj.weight" for x in "qkv")),
                  (layer, "o_proj", (p + "self_attn.o_proj.weight",)),
                  (layer, "mlp_norm", (p + "post_attention_layernorm.weight",)),
                  (layer, "gate_up_proj", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
                  (layer, "down_proj", (p + "mlp.down_proj.weight",))]
        if cfg.qkv_bias:
            slots.append((layer, "qkv_bias", tuple(f"{p}self_attn.{x}_proj.bias" for x in "qkv")))
    loaded: set[str] = set()
    for module, attr, parts in slots:
        current = getattr(module, attr)
        if not isinstance(current, torch.Tensor):  # a packed slot: the loader converts into it
            continue
        view = mapped.view(parts, current.dtype, tuple(current.shape))
        if view is None:
            continue
        set_weight(module, attr, view)
        if attr == "embed_tokens" and cfg.tie_word_embeddings:
            set_weight(model, "lm_head", view)
        loaded.update(parts)
    return loaded
