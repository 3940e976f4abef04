"""Row operations that treat a dense [N, K] tensor and a packed weight alike: the loaders copy checkpoint
tensors into row ranges of fused slots (QKV, gate-up), undo GGUF's Q/K row permutation, and the reference
model gathers embedding rows. Every packed format stores whole rows (codes and scales both indexed by row),
so these are plain tensor ops on each part."""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from graph_executor.quant.formats import PackedWeight

Weight = torch.Tensor | PackedWeight


def _parts(w: PackedWeight) -> dict[str, torch.Tensor]:
    return {f.name: getattr(w, f.name) for f in fields(w) if isinstance(getattr(w, f.name), torch.Tensor)}


def shape(w: Weight) -> tuple[int, int]:
    return tuple(w.shape)


def _row_major(w: Weight, what: str) -> None:
    if getattr(w, "tiles", None) is not None:
        raise ValueError(f"a tile-major {type(w).__name__} weight cannot be {what}: do it before tiling")


def row_slice(w: Weight, start: int, end: int) -> Weight:
    """Rows [start, end) as a view (writes go to `w`)."""
    if isinstance(w, torch.Tensor):
        return w[start:end]
    _row_major(w, "sliced")
    return replace(w, **{name: t[start:end] for name, t in _parts(w).items()})


def select_rows(w: Weight, index: torch.Tensor) -> Weight:
    """Rows `index` ([R] int64) as a new weight of the same format."""
    if isinstance(w, torch.Tensor):
        return w.index_select(0, index)
    _row_major(w, "indexed by rows")
    return replace(w, **{name: t.index_select(0, index).contiguous() for name, t in _parts(w).items()})


def part(w: Weight, index: tuple[slice, ...]) -> Weight:
    """A tensor-parallel rank's part of a whole weight: `index` is (rows,) or (all rows, columns), as
    `TensorParallel.checkpoint_part` gives it; a new weight of the same format. A packed weight's columns must start
    and end at group boundaries (its scales are per group of K; an FP8 row's scale holds for any columns):
    ValueError otherwise."""
    if isinstance(w, torch.Tensor):
        return w[index]
    _row_major(w, "sliced")
    if len(index) == 1:
        rows = index[0]
        return replace(w, **{name: t[rows].contiguous() for name, t in _parts(w).items()})
    cols = index[1]
    start, stop = cols.start or 0, w.shape[1] if cols.stop is None else cols.stop
    group = getattr(w, "group", None)
    if group is None:  # Fp8Rows: one scale per row
        return replace(w, codes=w.codes[:, start:stop].contiguous())
    if start % group or stop % group:
        raise ValueError(f"columns [{start}, {stop}) of a {type(w).__name__} weight do not start and end at its "
                         f"groups of {group}")
    per_code = w.shape[1] // w.codes.shape[1]  # weights per code column: 2 for int4, 1 for int8
    groups = slice(start // group, stop // group)
    return replace(w, codes=w.codes[:, start // per_code:stop // per_code].contiguous(),
                   scale=w.scale[:, groups].contiguous(),
                   offset=None if w.offset is None else w.offset[:, groups].contiguous())


def dequantize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype) if isinstance(w, torch.Tensor) else w.dequantize(dtype)


def copy_(dst: Weight, src: Weight) -> None:
    """dst <- src, both of one format and shape (the caller converts first: `specs.fit`)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    if type(dst) is not type(src):
        raise ValueError(f"cannot copy {type(src).__name__} weights into {type(dst).__name__} storage")
    for name, t in _parts(dst).items():
        s = getattr(src, name)
        if s is None or tuple(s.shape) != tuple(t.shape) or s.dtype != t.dtype:
            raise ValueError(f"{type(dst).__name__}.{name}: source {None if s is None else tuple(s.shape)} "
                             f"does not match storage {tuple(t.shape)} {t.dtype}")
        t.copy_(s)


def nbytes(w: Weight) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
