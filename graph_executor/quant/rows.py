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


def row_slice(w: Weight, start: int, end: int) -> Weight:
    """Rows [start, end) as a view (writes go to `w`)."""
    if isinstance(w, torch.Tensor):
        return w[start:end]
    return replace(w, **{name: t[start:end] for name, t in _parts(w).items()})


def select_rows(w: Weight, index: torch.Tensor) -> Weight:
    """Rows `index` ([R] int64) as a new weight of the same format."""
    if isinstance(w, torch.Tensor):
        return w.index_select(0, index)
    return replace(w, **{name: t.index_select(0, index).contiguous() for name, t in _parts(w).items()})


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
