"""The packed weight formats of the low-bit path, and everything that makes or reads them outside a kernel:

- `Int4Groups`: 4-bit codes two per byte, a scale and an (optional) offset per group of `group` weights.
- `Int8Groups`: int8 codes, a scale and an (optional) offset per group of `group` weights.
- `from_gguf` / `from_reader_tensor`: GGUF blocks (Q4_0, Q4_1, Q4_K -> Int4Groups; Q8_0, Q5_0, Q5_1, Q5_K,
  Q6_K -> Int8Groups) converted with torch ops on any device.
- `quantize_int4` / `quantize_int8`: round-to-nearest group-wise quantization of float weights (HF
  checkpoints, dummy models), on the device the weights are on.
- `.dequantize()` on each format: float32 weights for references and the CPU path.

Every weight matrix is [N, K] as the GEMVs see it (N output rows, K inputs, unit stride along K), groups run
along K. Value of a weight = scale * q + offset, computed in float32 from the stored scale and offset.

Exactness against `gguf.quants.dequantize` (which computes in float32): Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are
bit-exact with float16 scales (their scale and offset are the block's own float16 d and m). The K-quants
(Q4_K, Q5_K, Q6_K) store a float16 super-block d times a 6-bit (8-bit for Q6_K) sub-block scale; that product
needs up to 17 (18) significant bits, so it is exact in float32 but not in float16. With
`scale_dtype=torch.float32` they are bit-exact too (one more byte per scale); with the default float16 each
group's scale and offset carry a relative rounding error <= 2**-11 (tests/test_quant.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

from graph_executor.quant.names import GROUPS

SCALE_DTYPES = (torch.float16, torch.float32)
INT4_ZERO = 8  # symmetric Int4Groups (offset None): value = scale * (q - 8), q in 0..15 (Q4_0's convention)


def _check_scales(kind: str, n: int, k: int, group: int, codes: torch.Tensor, scale: torch.Tensor,
                  offset: torch.Tensor | None) -> None:
    if group not in GROUPS:
        raise ValueError(f"{kind}: group {group} is not one of {GROUPS}")
    if k % group:
        raise ValueError(f"{kind}: K = {k} is not a multiple of the group ({group})")
    for name, t in (("scale", scale), ("offset", offset)):
        if t is None:
            continue
        if t.dtype not in SCALE_DTYPES:
            raise ValueError(f"{kind}: {name} dtype {t.dtype} is not float16 or float32")
        if tuple(t.shape) != (n, k // group):
            raise ValueError(f"{kind}: {name} shape {tuple(t.shape)} != {(n, k // group)}")
        if not t.is_contiguous() or t.device != codes.device:
            raise ValueError(f"{kind}: {name} must be contiguous and on {codes.device}")
    if offset is not None and offset.dtype != scale.dtype:
        raise ValueError(f"{kind}: offset dtype {offset.dtype} != scale dtype {scale.dtype}")


def _check_tiles(w: _GroupedCodes, tiles: tuple[int, int] | None) -> None:
    """ValueError unless `tiles` (rows, words) cut w into whole tiles that hold whole groups (None: row-major)."""
    if tiles is None:
        return
    rows, words = tiles
    n, k = w.shape
    if rows < 1 or words < 1 or n % rows or (k // w.per_word) % words or words % w.words_per_group:
        raise ValueError(f"{type(w).__name__}: [{n}, {k}] is not whole tiles of {rows} rows x {words} words of "
                         f"groups of {w.group}")


def _group_values(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int,
                  zero: int, dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] integer codes -> [N, K] of scale * (q - zero) + offset, in float32 (the GGUF reference's order
    of operations, so mapped types come out bit-exact), then cast to dtype."""
    n, k = q.shape
    q = q.view(n, k // group, group).float()  # [N, K/G, G]
    if zero:
        q = q - zero
    w = scale.float()[..., None] * q
    if offset is not None:
        w = w + offset.float()[..., None]
    return w.view(n, k).to(dtype)


class _GroupedCodes:
    """What both packed formats share: integer codes with per-group scale (and offset) tensors."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    group: int

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV reads for this matrix (codes + scales + offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)

    @property
    def bits_per_weight(self) -> float:
        n, k = self.shape
        return 8 * self.nbytes / (n * k)

    def to(self, device: torch.device | str) -> _GroupedCodes:
        return type(self)(self.codes.to(device), self.scale.to(device),
                          None if self.offset is None else self.offset.to(device), self.group, self.tiles)

    @property
    def per_word(self) -> int:
        """Weights a 32-bit word of codes holds: 8 int4 or 4 int8."""
        return 8 if isinstance(self, Int4Groups) else 4

    @property
    def words_per_group(self) -> int:
        """32-bit words of codes a group takes."""
        return self.group // self.per_word

    def tiled(self, tiles: tuple[int, int]) -> _GroupedCodes:
        """The same weights stored tile-major (`tiles` = (rows, 32-bit words of codes)): the codes as words, the
        scales and offsets alike with tiles of (rows, words / words_per_group), each a contiguous run (`tile_major`).
        The decode GEMV whose program block is one tile then reads one run a program (bench/NOTES.md)."""
        if self.tiles is not None:
            raise ValueError(f"{type(self).__name__}: already tiled {self.tiles}")
        _check_tiles(self, tiles)
        rows, words = tiles
        wpg = self.words_per_group
        codes = tile_major(self.codes.view(torch.int32), rows, words).view(self.codes.dtype)
        return type(self)(codes.view(self.codes.shape), tile_major(self.scale, rows, words // wpg),
                          None if self.offset is None else tile_major(self.offset, rows, words // wpg), self.group,
                          tiles)

    def row_major(self) -> _GroupedCodes:
        """The same weights stored row-major (self if they are)."""
        if self.tiles is None:
            return self
        rows, words = self.tiles
        wpg = self.words_per_group
        codes = from_tile_major(self.codes.view(torch.int32), rows, words).view(self.codes.dtype)
        return type(self)(codes.view(self.codes.shape), from_tile_major(self.scale, rows, words // wpg),
                          None if self.offset is None else from_tile_major(self.offset, rows, words // wpg),
                          self.group)


@dataclass(frozen=True)
class Int4Groups(_GroupedCodes):
    """4-bit codes q in 0..15, two per byte; value = scale * q + offset (offset None: scale * (q - 8))."""

    codes: torch.Tensor  # uint8 [N, K // 2]: w[n, k] is nibble k % 2 (low nibble first) of codes[n, k // 2]
    scale: torch.Tensor  # float16 (float32 for exact K-quants) [N, K // group]
    offset: torch.Tensor | None  # like scale, or None (symmetric)
    group: int = 32
    # None: the tensors are row-major as shaped; (rows, words): stored tile-major (`tiled`), shapes unchanged
    tiles: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2 or not self.codes.is_contiguous():
            raise ValueError(f"Int4Groups: codes must be a contiguous 2-D uint8 tensor, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        _check_scales("Int4Groups", *self.shape, self.group, self.codes, self.scale, self.offset)
        _check_tiles(self, self.tiles)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], 2 * self.codes.shape[1]

    def unpack(self) -> torch.Tensor:
        """uint8 [N, K] codes 0..15, row-major."""
        n, k = self.shape
        codes = self.row_major().codes
        return torch.stack([codes & 0xF, codes >> 4], dim=-1).view(n, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights (computed in float32), row-major."""
        w = self.row_major()
        zero = INT4_ZERO if w.offset is None else 0
        return _group_values(w.unpack(), w.scale, w.offset, w.group, zero, dtype)


@dataclass(frozen=True)
class Int8Groups(_GroupedCodes):
    """int8 codes q; value = scale * q + offset (offset None: scale * q)."""

    codes: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float16 (float32 for exact K-quants) [N, K // group]
    offset: torch.Tensor | None  # like scale, or None (symmetric)
    group: int = 32
    # None: the tensors are row-major as shaped; (rows, words): stored tile-major (`tiled`), shapes unchanged
    tiles: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2 or not self.codes.is_contiguous():
            raise ValueError(f"Int8Groups: codes must be a contiguous 2-D int8 tensor, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        _check_scales("Int8Groups", *self.shape, self.group, self.codes, self.scale, self.offset)
        _check_tiles(self, self.tiles)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights (computed in float32), row-major."""
        w = self.row_major()
        return _group_values(w.codes, w.scale, w.offset, w.group, 0, dtype)


@dataclass(frozen=True)
class Fp8Rows:
    """float8 e4m3 codes with one float32 scale per output row (Hopper's FP8; per-row scaling as in vLLM's
    `fp8` with per-channel weight scales); value = scale[n] * float(codes[n, k])."""

    codes: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # float32 [N]

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.float8_e4m3fn or self.codes.dim() != 2 or not self.codes.is_contiguous():
            raise ValueError(f"Fp8Rows: codes must be a contiguous 2-D float8_e4m3fn tensor, got "
                             f"{self.codes.dtype} {tuple(self.codes.shape)}")
        n = self.codes.shape[0]
        if (self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (n,) or not self.scale.is_contiguous()
                or self.scale.device != self.codes.device):
            raise ValueError(f"Fp8Rows: scale must be a contiguous float32 [{n}] tensor on {self.codes.device}, "
                             f"got {self.scale.dtype} {tuple(self.scale.shape)} on {self.scale.device}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    @property
    def bits_per_weight(self) -> float:
        n, k = self.shape
        return 8 * self.nbytes / (n * k)

    def to(self, device: torch.device | str) -> Fp8Rows:
        return Fp8Rows(self.codes.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] weights (computed in float32)."""
        return (self.codes.float() * self.scale[:, None]).to(dtype)


PackedWeight = Int4Groups | Int8Groups | Fp8Rows


# ---------------------------------------------------------------------------------------------------------
# GGUF blocks -> packed formats. Each converter takes the raw blocks as uint8 [N, K / block, type_size] and
# mirrors the block layout of gguf.quants (ggml-quants.c); the tests hold them to gguf.quants.dequantize.

def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block: [N, nb]."""
    return blocks[..., at:at + 2].contiguous().view(torch.float16)[..., 0]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., L] -> [..., 2, L]: low nibbles, then high nibbles."""
    return torch.stack([qs & 0xF, qs >> 4], dim=-2)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Little-endian bit j of the byte string qh [..., count // 8], for j < count: uint8 [..., count]."""
    j = torch.arange(count, device=qh.device)
    return (qh[..., j // 8] >> (j % 8).to(torch.uint8)) & 1


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes 0..15 -> [N, K // 2], even k in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _scales(t: torch.Tensor, n: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """[N, nb, groups per block] float32 -> [N, K // group] in dtype, refusing float16 overflow."""
    out = t.reshape(n, -1).to(dtype).contiguous()
    if not torch.isfinite(out).all():
        raise ValueError(f"{what}: a scale or offset is not finite in {dtype} (use scale_dtype=torch.float32)")
    return out


def _q4_0(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int4Groups:
    q = _nibbles(b[..., 2:18]).reshape(n, k)  # block of 32: d, 16 bytes (weight j low, j + 16 high)
    return Int4Groups(_pack_int4(q), _scales(_f16(b, 0).float(), n, sd, "Q4_0"), None, 32)


def _q4_1(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int4Groups:
    q = _nibbles(b[..., 4:20]).reshape(n, k)  # d, m, 16 bytes
    return Int4Groups(_pack_int4(q), _scales(_f16(b, 0).float(), n, sd, "Q4_1"),
                      _scales(_f16(b, 2).float(), n, sd, "Q4_1"), 32)


def _q5(b: torch.Tensor, n: int, at: int) -> torch.Tensor:
    """Q5_0/Q5_1 5-bit codes 0..31: 4 bytes of high bits at `at`, then 16 bytes of low nibbles -> [N, nb, 32]."""
    low = _nibbles(b[..., at + 4:at + 20]).reshape(n, -1, 32)
    return low | (_bits(b[..., at:at + 4], 32) << 4)


def _q5_0(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int8Groups:
    codes = (_q5(b, n, 2).to(torch.int16) - 16).to(torch.int8).reshape(n, k)
    return Int8Groups(codes, _scales(_f16(b, 0).float(), n, sd, "Q5_0"), None, 32)


def _q5_1(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int8Groups:
    codes = _q5(b, n, 4).to(torch.int8).reshape(n, k)
    return Int8Groups(codes, _scales(_f16(b, 0).float(), n, sd, "Q5_1"),
                      _scales(_f16(b, 2).float(), n, sd, "Q5_1"), 32)


def _q8_0(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int8Groups:
    codes = b[..., 2:34].contiguous().view(torch.int8).reshape(n, k)
    return Int8Groups(codes, _scales(_f16(b, 0).float(), n, sd, "Q8_0"), None, 32)


def _k_scale_min(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 six-bit sub-block scales and mins packed in bytes 4..15 -> two float32 [N, nb, 8]."""
    s = b[..., 4:16].reshape(*b.shape[:2], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _k_scale_offset(b: torch.Tensor, n: int, sd: torch.dtype, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    sc, mn = _k_scale_min(b)
    scale = _f16(b, 0).float()[..., None] * sc  # exact in float32 (11 + 6 significant bits)
    offset = -(_f16(b, 2).float()[..., None] * mn)
    return _scales(scale, n, sd, what), _scales(offset, n, sd, what)


def _q4_k_low(qs: torch.Tensor, n: int) -> torch.Tensor:
    """Q4_K/Q5_K low nibbles: 4 chunks of 32 bytes, each low = sub-block 2j, high = 2j + 1 -> [N, nb, 256]."""
    return _nibbles(qs.reshape(n, -1, 4, 32)).reshape(n, -1, 256)


def _q4_k(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int4Groups:
    scale, offset = _k_scale_offset(b, n, sd, "Q4_K")  # block of 256: d, dmin, scales[12], qs[128]
    return Int4Groups(_pack_int4(_q4_k_low(b[..., 16:144], n).reshape(n, k)), scale, offset, 32)


def _q5_k(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int8Groups:
    scale, offset = _k_scale_offset(b, n, sd, "Q5_K")  # d, dmin, scales[12], qh[32], qs[128]
    # bit i of qh[l] is the high bit of weight 32 i + l
    high = ((b[..., 16:48, None] >> torch.arange(8, device=b.device, dtype=torch.uint8)) & 1).transpose(-1, -2)
    q = _q4_k_low(b[..., 48:176], n) | (high.reshape(n, -1, 256) << 4)
    return Int8Groups(q.to(torch.int8).reshape(n, k), scale, offset, 32)


def _q6_k(b: torch.Tensor, n: int, k: int, sd: torch.dtype) -> Int8Groups:
    # block of 256: ql[128], qh[64], scales[16] (int8, one per 16 weights), d. Each half of 128 weights has
    # 64 ql bytes (low nibbles: weights 0..63, high: 64..127) and 32 qh bytes (bits 2s..2s+1: weights 32 s + l).
    ql = _nibbles(b[..., 0:128].reshape(n, -1, 2, 64)).reshape(n, -1, 256)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)[:, None]
    qh = ((b[..., 128:192].reshape(n, -1, 2, 1, 32) >> shifts) & 3).reshape(n, -1, 256)
    codes = ((ql | (qh << 4)).to(torch.int16) - 32).to(torch.int8).reshape(n, k)
    sub = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, nb, 16]
    scale = _f16(b, 208).float()[..., None] * sub  # exact in float32 (11 + 7 significant bits)
    return Int8Groups(codes, _scales(scale, n, sd, "Q6_K"), None, 16)


# by GGMLQuantizationType name: the gguf package (and its yaml) is imported when a GGUF tensor is converted, not
# with this module (every executor imports it; ~0.17 s of start-up on the CPU machine)
_CONVERTERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q5_K": _q5_k, "Q6_K": _q6_k,
               "Q8_0": _q8_0}


def from_gguf(data: np.ndarray, qtype: GGMLQuantizationType | int, shape: Sequence[int] | None = None, *,
              scale_dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> PackedWeight:
    """GGUF tensor bytes (uint8 [N, K / block * type_size], as GGUFReader's `tensor.data`) -> packed weight.

    shape: the weight's (N, K) in torch order (GGUFReader's `tensor.shape` reversed); default: from data's
    shape. The unpacking runs with torch ops on `device`.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unknown GGUF tensor type {qtype!r}") from None
    if qtype.name not in _CONVERTERS:
        raise ValueError(f"GGUF type {qtype.name} has no packed format (packed: "
                         f"{', '.join(sorted(_CONVERTERS))}); dequantize it at load")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype {scale_dtype} is not float16 or float32")
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(data)
    if raw.dtype != np.uint8:
        raise ValueError(f"{qtype.name}: GGUF data must be uint8 bytes, got {raw.dtype}")
    if shape is None:
        if raw.ndim < 1 or raw.shape[-1] % type_size:
            raise ValueError(f"{qtype.name}: {raw.shape[-1:]} bytes per row is not a multiple of {type_size}")
        shape = (raw.size // raw.shape[-1], raw.shape[-1] // type_size * block)
    if len(shape) != 2:
        raise ValueError(f"{qtype.name}: packed weights are 2-D, got shape {tuple(shape)}")
    n, k = (int(d) for d in shape)
    if n <= 0 or k <= 0 or k % block:
        raise ValueError(f"{qtype.name}: shape {(n, k)}: K is not a positive multiple of the block ({block})")
    if raw.size != n * (k // block) * type_size:
        raise ValueError(f"{qtype.name}: {raw.size} bytes do not hold a {(n, k)} tensor "
                         f"({n * (k // block) * type_size} bytes)")
    raw = np.ascontiguousarray(raw).reshape(n, k // block, type_size)
    if not raw.flags.writeable:  # GGUFReader's data is a read-only memmap view; torch wants writable memory
        raw = raw.copy()
    return _CONVERTERS[qtype.name](torch.from_numpy(raw).to(device), n, k, scale_dtype)


def from_reader_tensor(tensor, *, scale_dtype: torch.dtype = torch.float16,
                       device: torch.device | str = "cpu") -> PackedWeight:
    """A `gguf.GGUFReader` tensor (its .data, .tensor_type and .shape, which lists K first) -> packed weight."""
    dims = tuple(int(d) for d in reversed(list(tensor.shape)))
    if len(dims) != 2:
        raise ValueError(f"GGUF tensor {tensor.name!r}: packed weights are 2-D, got shape {dims}")
    try:
        return from_gguf(tensor.data, tensor.tensor_type, dims, scale_dtype=scale_dtype, device=device)
    except ValueError as e:
        raise ValueError(f"GGUF tensor {tensor.name!r}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Round-to-nearest group-wise quantization of float weights.

def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (x float64)."""
    h = x.to(torch.float16)
    return torch.where(h.double() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= x (x float64)."""
    h = x.to(torch.float16)
    return torch.where(h.double() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _groups(w: torch.Tensor, group: int, what: str) -> torch.Tensor:
    """w [N, K] float -> float32 [N, K / group, group], refusing bad input."""
    if not w.is_floating_point() or w.dim() != 2:
        raise ValueError(f"{what}: weights must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    if group not in GROUPS:
        raise ValueError(f"{what}: group {group} is not one of {GROUPS}")
    n, k = w.shape
    if k % group:
        raise ValueError(f"{what}: K = {k} is not a multiple of the group ({group})")
    g = w.detach().float().reshape(n, k // group, group)
    if not torch.isfinite(g).all():
        raise ValueError(f"{what}: weights contain inf or nan")
    return g


def _finite16(what: str, *ts: torch.Tensor) -> None:
    if not all(torch.isfinite(t).all() for t in ts):
        raise ValueError(f"{what}: weights exceed the float16 range of scales and offsets")


def quantize_int4(w: torch.Tensor, group: int = 32) -> Int4Groups:
    """Asymmetric round-to-nearest: per group, offset = min (rounded down to float16), scale = (max - offset)
    / 15 (rounded up), so the 16 levels cover the group and |w - dequantized| <= scale / 2 (up to float32
    rounding of the dequantization). w [N, K] on any device; K a multiple of group."""
    g = _groups(w, group, "quantize_int4")  # [N, K/G, G] float32
    n, k = w.shape
    offset = _fp16_down(g.amin(-1).double())  # [N, K/G]; the per-group arithmetic in float64 is exact
    scale = _fp16_up((g.amax(-1).double() - offset.double()) / 15)
    _finite16("quantize_int4", offset, scale)
    s = scale.float()[..., None]
    q = torch.where(s > 0, (g - offset.float()[..., None]) / torch.where(s > 0, s, 1.0), 0.0)
    codes = q.round().clamp(0, 15).to(torch.uint8).view(n, k)
    return Int4Groups(_pack_int4(codes), scale.contiguous(), offset.contiguous(), group)


def quantize_int8(w: torch.Tensor, group: int = 32) -> Int8Groups:
    """Symmetric round-to-nearest: per group, scale = max |w| / 127 (rounded up to float16), codes in
    -127..127, |w - dequantized| <= scale / 2. w [N, K] on any device; K a multiple of group."""
    g = _groups(w, group, "quantize_int8")
    n, k = w.shape
    scale = _fp16_up(g.abs().amax(-1).double() / 127)  # [N, K/G]
    _finite16("quantize_int8", scale)
    s = scale.float()[..., None]
    q = torch.where(s > 0, g / torch.where(s > 0, s, 1.0), 0.0)
    codes = q.round().clamp(-127, 127).to(torch.int8).view(n, k)
    return Int8Groups(codes, scale.contiguous(), None, group)


FP8_MAX = 448.0  # the largest finite float8 e4m3fn


def quantize_fp8(w: torch.Tensor) -> Fp8Rows:
    """Per-row scaling: scale = max |w| / 448, codes = w / scale rounded to the nearest e4m3 value (relative
    error <= 2**-4 for normal codes). w [N, K] float on any device."""
    if not w.is_floating_point() or w.dim() != 2:
        raise ValueError(f"quantize_fp8: weights must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    wf = w.detach().float()
    if not torch.isfinite(wf).all():
        raise ValueError("quantize_fp8: weights contain inf or nan")
    amax = wf.abs().amax(dim=1)  # [N]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Rows(codes.contiguous(), scale.contiguous())


def tile_major(t: torch.Tensor, tile_r: int, tile_c: int) -> torch.Tensor:
    """t [N, L] -> the same elements, shaped [N, L] but stored tile-major: tiles of tile_r rows x tile_c columns,
    each row block's tiles one after another along the row (what `gemv_splitk.tile_offsets` reads)."""
    n, length = t.shape
    if n % tile_r or length % tile_c:
        raise ValueError(f"tile_major: [{n}, {length}] is not whole tiles of {tile_r} x {tile_c}")
    return t.view(n // tile_r, tile_r, length // tile_c, tile_c).transpose(1, 2).contiguous().view(n, length)


def from_tile_major(t: torch.Tensor, tile_r: int, tile_c: int) -> torch.Tensor:
    """The inverse of `tile_major`: t [N, L] stored tile-major -> the same elements row-major."""
    n, length = t.shape
    return t.reshape(n // tile_r, length // tile_c, tile_r, tile_c).transpose(1, 2).contiguous().view(n, length)
