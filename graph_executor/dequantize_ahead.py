"""A long prompt's packed weights dequantized ahead of their GEMMs, on a second CUDA stream.

From `projections.DequantizeRows` rows up, a packed projection of the prefill step is dequantized whole to the
activation dtype and multiplied by cuBLAS. In one stream the dequantizing pass (memory-bound: it reads the codes and
writes 2 bytes a weight) and the GEMM (compute-bound from a few hundred rows) take turns; here the pass for the next
projections runs on a side stream while the main stream's GEMM runs, into `depth` buffers used in turn, so the card
can do both at once. The main stream waits for a projection's buffer to be written before its GEMM; the side
stream waits for the GEMM that read a buffer before writing it again. Both streams are forked from and joined to
the caller's stream, so the whole of it lands in a CUDA graph captured on that stream.

Same weights, same bits: only the order in which the card runs the kernels changes. GPU only (a CPU model holds
dense weights)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graph_executor.kernels import gemm_lowbit
from graph_executor.quant.formats import PackedWeight


@dataclass
class DequantizeAhead:
    """The side stream and the `depth` buffers (each as large as the largest packed projection) of one step."""

    stream: torch.cuda.Stream
    buffers: list[torch.Tensor]  # depth x [max numel] flat, the activation dtype

    @classmethod
    def allocate(cls, weights: list[PackedWeight], dtype: torch.dtype, device: torch.device,
                 depth: int = 2) -> DequantizeAhead:
        if device.type != "cuda":
            raise ValueError(f"DequantizeAhead: needs a CUDA device, got {device}")
        if depth < 2:
            raise ValueError(f"DequantizeAhead: depth must be >= 2 (one buffer read, one written), got {depth}")
        if not weights:
            raise ValueError("DequantizeAhead: no packed weights to dequantize")
        numel = max(w.shape[0] * w.shape[1] for w in weights)
        return cls(torch.cuda.Stream(device), [torch.empty(numel, dtype=dtype, device=device) for _ in range(depth)])

    def begin(self, weights: list[PackedWeight]) -> AheadRun:
        """Starts dequantizing `weights` (in the order their GEMMs will take them) after all work queued so far on
        the current stream."""
        return AheadRun(self, weights)


@dataclass
class AheadRun:
    """One step's pass: `take(i)` before weight i's GEMM, `release(i)` right after it is queued, `finish()` at the
    end (the join that a graph capture needs)."""

    owner: DequantizeAhead
    weights: list[PackedWeight]
    main: torch.cuda.Stream = field(init=False)
    ready: dict[int, torch.cuda.Event] = field(init=False, default_factory=dict)
    taken: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.main = torch.cuda.current_stream(self.owner.buffers[0].device)
        # fork: the side stream follows what came before, among it the last step's GEMMs over these buffers
        self.owner.stream.wait_stream(self.main)
        for i in range(min(len(self.owner.buffers), len(self.weights))):
            self._dequantize(i, None)

    def _buffer(self, i: int) -> torch.Tensor:
        w = self.weights[i]
        n, k = w.shape
        return self.owner.buffers[i % len(self.owner.buffers)][:n * k].view(n, k)  # [N, K]

    def _dequantize(self, i: int, free: torch.cuda.Event | None) -> None:
        with torch.cuda.stream(self.owner.stream):
            if free is not None:
                self.owner.stream.wait_event(free)  # the GEMM that read this buffer last
            gemm_lowbit.dequantize(self.weights[i], self._buffer(i))
            done = torch.cuda.Event()
            done.record(self.owner.stream)
        self.ready[i] = done

    def take(self, i: int) -> torch.Tensor:
        """Weight i dequantized, [N, K]; the current (main) stream waits until it is written."""
        if i != self.taken:
            raise ValueError(f"AheadRun: weight {i} taken out of order (expected {self.taken})")
        self.main.wait_event(self.ready.pop(i))
        self.taken += 1
        return self._buffer(i)

    def release(self, i: int) -> None:
        """Weight i's GEMM is queued: its buffer may be rewritten once the GEMM has run."""
        nxt = i + len(self.owner.buffers)
        if nxt < len(self.weights):
            used = torch.cuda.Event()
            used.record(self.main)
            self._dequantize(nxt, used)

    def finish(self) -> None:
        if self.taken != len(self.weights):
            raise ValueError(f"AheadRun: {len(self.weights) - self.taken} weights never taken")
        self.main.wait_stream(self.owner.stream)  # join
