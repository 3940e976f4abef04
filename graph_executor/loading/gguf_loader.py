"""GGUF files: config from metadata, tensors renamed to HF names and either kept packed (the types that map onto
`graph_executor/quant/formats.py` exactly, on the GPU) or dequantised with the `gguf` package.

llama.cpp's converter permutes the Q and K rows of Llama-architecture models (interleaved RoPE); we undo it so
that the weights match the HF rotate-half layout our model uses (for packed tensors: the same row permutation
of their codes and scales).
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from graph_executor.loading.config import ModelConfig, RopeScaling
from graph_executor.loading.gguf_index import GGUFIndex, UnsupportedLayout
from graph_executor.loading.weight_map import slot_of
from graph_executor.quant import rows
from graph_executor.quant.formats import from_reader_tensor
from graph_executor.quant.specs import DENSE, WeightPlan, WeightSpec, join
from ipc.errors import ModelLoadError

_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
          "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
          "attn_v.weight": "self_attn.v_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
          "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
          "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
          "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
ROPE_FREQS = "rope_freqs.weight"


@functools.cache
def reader_class():
    """The reader class (made once: it subclasses gguf's, imported on first use)."""
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader over a plain ndarray view of its memory map (the same parse, the same arrays): it parses
        the header with ~250k small slices (one per vocabulary string), and slicing an np.memmap runs Python code
        per slice (__array_finalize__), slicing an ndarray does not: the default model's header parses in ~2 s
        instead of ~4 on a small CPU."""

        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)  # same pages; the view keeps the mapping alive

    return Reader


def open_gguf(path: Path):
    """The file's metadata and tensors (`GGUFIndex`, or gguf's own reader for a layout it does not parse)."""
    try:
        try:
            return GGUFIndex(path)
        except UnsupportedLayout:
            return reader_class()(str(path))
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ModelLoadError(f"unsupported architecture {arch!r} in GGUF file (hybridrt runs {sorted(_GGUF_ARCHS)})")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        model_type=_GGUF_ARCHS[arch],
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _rope_scaling(reader, arch: str) -> RopeScaling:
    """llama.cpp writes linear scaling as metadata and Llama 3.1+ scaling as the `rope_freqs` tensor (per-
    frequency divisors it computed from the HF llama3 parameters, which the file does not keep)."""
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} in GGUF file (supported: none, linear, "
                             f"and Llama 3.1+ rope_freqs)")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    factors = None
    if freqs is not None:
        from gguf.quants import dequantize

        factors = tuple(float(f) for f in np.asarray(dequantize(freqs.data, freqs.tensor_type)).reshape(-1))
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
                           freq_factors=factors)
    return RopeScaling(freq_factors=factors)


def weight_tensor_count(reader) -> int:
    """Tensors `iter_gguf_tensors` yields (for progress bars)."""
    return sum(t.name != ROPE_FREQS for t in reader.tensors)


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) on Q/K rows."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The exact packed spec of each GGUF type (formats.py's converters produce these).
_PACKED_SPECS = {
    "Q4_0": WeightSpec("int4", 32, offset=False), "Q4_1": WeightSpec("int4", 32, offset=True),
    "Q4_K": WeightSpec("int4", 32, offset=True), "Q5_0": WeightSpec("int8", 32, offset=False),
    "Q5_1": WeightSpec("int8", 32, offset=True), "Q5_K": WeightSpec("int8", 32, offset=True),
    "Q6_K": WeightSpec("int8", 16, offset=False), "Q8_0": WeightSpec("int8", 32, offset=False),
}
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def gguf_plan(reader, config: ModelConfig) -> WeightPlan:
    """Which fused slots stay packed: those whose every part has a packed type, in the spec that holds all of
    them exactly (`quant.specs.join`). Slots with a part of another quantized type (IQ*, Q2_K, Q3_K, ...) are
    dequantized whole; `dequantized` names those tensors and their types."""
    parts: dict[str, list[tuple[str, str]]] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        slot = slot_of(name) if name else None
        if slot is not None:
            parts.setdefault(slot, []).append((t.name, t.tensor_type.name))
    specs: dict[str, WeightSpec] = {}
    dequantized: list[str] = []
    for slot, members in parts.items():
        if all(kind in _PACKED_SPECS for _, kind in members):
            specs[slot] = join(_PACKED_SPECS[kind] for _, kind in members)
            continue
        specs[slot] = DENSE
        dequantized += [f"{name} ({kind})" for name, kind in members if kind not in _FLOAT_TYPES]
    if config.tie_word_embeddings:
        specs.pop("lm_head", None)
    return WeightPlan(specs, tuple(dequantized))


def _permuted_rows(name: str, config: ModelConfig) -> np.ndarray | None:
    """The row order that undoes llama.cpp's Q/K permutation (None: the tensor is stored in HF order)."""
    if config.model_type == "qwen2" or not (".q_proj." in name or ".k_proj." in name):
        return None
    heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
    n = (config.num_heads if ".q_proj." in name else config.num_kv_heads) * config.head_dim
    return _unpermute(np.arange(n), heads)


def iter_gguf_tensors(reader, config: ModelConfig, plan: WeightPlan | None = None,
                      device: str | torch.device = "cpu",
                      part_of: Callable[[str], tuple[slice, ...] | None] | None = None,
                      ) -> Iterator[tuple[str, np.ndarray | rows.Weight]]:
    """(HF name, tensor in HF orientation) for every tensor of the file: a packed weight on `device` for a
    tensor whose slot `plan` keeps packed, else a float32 numpy array.

    `part_of` (a tensor-parallel rank): the index of the part of each HF tensor this rank holds (rows, or all rows
    and some columns; None: whole), and every tensor comes as that part, read from the file alone where it can be:
    rows always (the codes are row-major), columns where the part starts and ends on the type's block boundaries;
    otherwise (columns inside a block) the tensor is read whole and cut."""
    from gguf.quants import dequantize

    plan = plan or WeightPlan()
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # not a weight: part of the config (`_rope_scaling`)
        name = hf_name(t.name)
        if name is None:
            raise ModelLoadError(f"GGUF tensor {t.name!r} is not part of a {config.model_type} model")
        order = _permuted_rows(name, config)
        part = part_of(name) if part_of is not None else None
        slot = slot_of(name)
        data, dims, cut = _read_part(t, order, part)  # [N', K'] stored, dims K' first
        if slot is not None and plan.spec(slot).packed:
            try:
                packed = from_reader_tensor(_Part(t.name, data, t.tensor_type, dims), device=device)
                if cut is not None:
                    packed = rows.part(packed, cut)
            except ValueError as e:
                raise ModelLoadError(f"{e}" + (" (a tensor-parallel rank's part; --dequantize loads it dense)"
                                               if part is not None else "")) from None
            yield name, packed
            continue
        w = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
        if cut is not None:
            w = w[cut]
        if not w.flags.writeable:  # unquantised tensors come back as read-only views of the mmap
            w = w.copy()
        yield name, w


class _Part(NamedTuple):
    """The fields of a GGUFReader tensor that `from_reader_tensor` reads, for a part of one."""

    name: str
    data: np.ndarray
    tensor_type: object
    shape: tuple[int, ...]  # K first, as the reader lists it


def _read_part(t, order: np.ndarray | None, part: tuple[slice, ...] | None
               ) -> tuple[np.ndarray, tuple[int, ...], tuple[slice, ...] | None]:
    """(the stored rows and columns of tensor t to convert, their shape K first, what is still to cut from the
    converted tensor): HF row i is stored row order[i] (llama.cpp's Q/K permutation, undone here)."""
    from gguf.constants import GGML_QUANT_SIZES

    data = t.data
    if order is not None:
        data = data[order] if part is None else data[order[part[0]]]
    elif part is not None:
        data = data[part[0]]
    if len(t.shape) != 2:  # 1-D (norms, biases): the rows above are its part
        return data, (len(data),), None
    k, n = (int(d) for d in t.shape)
    rows_read = data.shape[0]
    if part is None or len(part) == 1:  # whole, or rows: read alone
        return data, (k, rows_read), None
    cols = range(k)[part[1]]
    block = GGML_QUANT_SIZES[t.tensor_type][0]
    per_block = data.shape[-1] * block // k  # the stored columns of one block (bytes of a quantized type)
    if cols.step != 1 or cols.start % block or len(cols) % block:  # inside a block: convert these rows whole
        return data, (k, rows_read), (slice(None), part[1])
    stored = slice(cols.start // block * per_block, (cols.start + len(cols)) // block * per_block)
    return data[:, stored], (len(cols), rows_read), None
