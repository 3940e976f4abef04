"""What an engine process records about itself: its startup timeline and its peak memory."""

from __future__ import annotations

import resource
import sys
import time


class Timeline:
    """Seconds since the parent spawned this process (wall clock: the two processes share it)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.marks: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks[name] = round((time.time() if at is None else at) - self.t0, 3)

    def to_dict(self) -> dict:
        return dict(self.marks)


def process_memory(device: str) -> dict:
    """Peak CUDA allocator figures on a GPU; peak resident memory of this process either way."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": rss_kib * 1024 if sys.platform != "darwin" else rss_kib}
    if device.startswith("cuda"):
        import torch

        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return out
