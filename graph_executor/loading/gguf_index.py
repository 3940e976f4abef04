"""A GGUF file's metadata and tensor table, read in milliseconds: what `gguf.GGUFReader` gives the loader (fields'
`contents()`, tensors with `name`, `tensor_type`, `shape`, `data`), without its cost.

gguf's reader turns every string of an array field into two numpy views: the ~100k vocabulary and merge strings of
a Llama-family file take ~0.8 s on the GPU host and ~2 s on a small CPU, at every start, to produce values that the
loader never reads (the JIT context loads the tokenizer from its cached conversion). Here an array of strings is
only stepped over (one length read per string) and decoded if `contents()` is asked for; number arrays are numpy
views; tensors are `gguf.ReaderTensor`s over one read-only memory map, shaped exactly as gguf's reader shapes them
(quantized types as uint8 [..., bytes per row]). Little-endian GGUF v2/v3 only: anything else (a big-endian file)
raises `UnsupportedLayout`, and the caller uses gguf's reader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, ReaderTensor
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_SCALARS: dict[int, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.BOOL: np.dtype("?"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# Tensor types gguf's reader exposes as typed arrays; every other type is uint8 bytes.
_TYPED = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class UnsupportedLayout(ValueError):
    """A valid GGUF file this reader does not parse (big-endian): gguf's own reader can."""


@dataclass(frozen=True)
class Field:
    """One metadata key: its type and where its value lies in the file; `contents()` as gguf's ReaderField."""

    name: str
    type: int  # GGUFValueType
    offset: int  # of the value
    _buf: memoryview

    def contents(self) -> Any:
        return _decode(self._buf, self.type, self.offset)[0]


def _decode(buf: memoryview, vtype: int, offs: int) -> tuple[Any, int]:
    """(value, offset after it) of a value of type vtype at offs."""
    if vtype == GGUFValueType.STRING:
        n = _U64.unpack_from(buf, offs)[0]
        return str(buf[offs + 8:offs + 8 + n], "utf-8"), offs + 8 + n
    if vtype == GGUFValueType.ARRAY:
        sub, count = _U32.unpack_from(buf, offs)[0], _U64.unpack_from(buf, offs + 4)[0]
        offs += 12
        if sub in _SCALARS:
            dt = _SCALARS[sub]
            return np.frombuffer(buf, dt, count, offs).tolist(), offs + count * dt.itemsize
        items = []
        for _ in range(count):
            value, offs = _decode(buf, sub, offs)
            items.append(value)
        return items, offs
    dt = _SCALARS.get(vtype)
    if dt is None:
        raise ValueError(f"unknown GGUF value type {vtype} at byte {offs}")
    return np.frombuffer(buf, dt, 1, offs).tolist()[0], offs + dt.itemsize


def _skip(buf: memoryview, vtype: int, offs: int) -> int:
    """The offset after a value of type vtype at offs, decoding as little as possible."""
    if vtype == GGUFValueType.STRING:
        return offs + 8 + _U64.unpack_from(buf, offs)[0]
    if vtype == GGUFValueType.ARRAY:
        sub, count = _U32.unpack_from(buf, offs)[0], _U64.unpack_from(buf, offs + 4)[0]
        offs += 12
        if sub in _SCALARS:
            return offs + count * _SCALARS[sub].itemsize
        if sub == GGUFValueType.STRING:
            unpack = _U64.unpack_from
            for _ in range(count):
                offs += 8 + unpack(buf, offs)[0]
            return offs
        for _ in range(count):
            offs = _skip(buf, sub, offs)
        return offs
    dt = _SCALARS.get(vtype)
    if dt is None:
        raise ValueError(f"unknown GGUF value type {vtype} at byte {offs}")
    return offs + dt.itemsize


class GGUFIndex:
    """`fields` (name -> Field) and `tensors` (gguf.ReaderTensor, data over a read-only memory map) of a GGUF file.
    ValueError (or struct.error) for a file that is not a well-formed GGUF."""

    def __init__(self, path: str | Path) -> None:
        mapped = np.memmap(path, mode="r")
        self.data = mapped.view(np.ndarray)  # plain ndarray slices: no np.memmap bookkeeping per tensor
        buf = memoryview(self.data)
        if bytes(buf[:4]) != MAGIC:
            raise ValueError("GGUF magic invalid")
        version = _U32.unpack_from(buf, 4)[0]
        if version not in VERSIONS:
            if version & 0xFFFF == 0:
                raise UnsupportedLayout("a big-endian GGUF file")
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = _U64.unpack_from(buf, 8)[0], _U64.unpack_from(buf, 16)[0]
        offs = 24
        self.fields: dict[str, Field] = {}
        for _ in range(kv_count):
            key, offs = _decode(buf, GGUFValueType.STRING, offs)
            vtype = _U32.unpack_from(buf, offs)[0]
            self.fields[key] = Field(key, vtype, offs + 4, buf)
            offs = _skip(buf, vtype, offs + 4)
        infos = []
        for _ in range(tensor_count):
            name, offs = _decode(buf, GGUFValueType.STRING, offs)
            n_dims = _U32.unpack_from(buf, offs)[0]
            dims = np.frombuffer(buf, "<u8", n_dims, offs + 4).copy()
            offs += 4 + 8 * n_dims
            ggml_type, rel = _U32.unpack_from(buf, offs)[0], _U64.unpack_from(buf, offs + 4)[0]
            offs += 12
            infos.append((name, dims, GGMLQuantizationType(ggml_type), rel))
        align = self.fields.get("general.alignment")
        self.alignment = DEFAULT_ALIGNMENT
        if align is not None:
            if align.type != GGUFValueType.UINT32:
                raise ValueError("bad type for general.alignment")
            self.alignment = align.contents()
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise ValueError("invalid alignment: must be a non-zero power of two")
        self.data_offset = -(-offs // self.alignment) * self.alignment
        self.tensors = [self._tensor(*info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ValueError("duplicate tensor names")

    def _tensor(self, name: str, dims: np.ndarray, ggml_type: GGMLQuantizationType, rel: int) -> ReaderTensor:
        n_elems = int(np.prod(dims))
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elems * type_size // block
        start = self.data_offset + rel
        if start + n_bytes > self.data.shape[0]:
            raise ValueError(f"tensor {name} runs past the end of the file")
        shape = tuple(reversed(dims.tolist()))
        raw = self.data[start:start + n_bytes]
        if ggml_type in _TYPED:
            data = raw.view(_TYPED[ggml_type]).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, ggml_type))
        return ReaderTensor(name=name, tensor_type=ggml_type, shape=dims, n_elements=n_elems, n_bytes=n_bytes,
                            data_offset=start, data=data, field=None)
