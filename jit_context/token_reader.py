"""Sampled tokens reach the host without stalling the device: an asynchronous copy into pinned memory per
step, read once the next step is already queued on the device, so the host wait never leaves the GPU idle.
"""

from __future__ import annotations

from collections import deque

import torch

RING = 4  # host slots; the loop keeps at most decode_ahead copies in flight (jit_context/generator.py)


class TokenReader:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._in_flight: deque[int] = deque()
        self._next_slot = 0
        if self.cuda:
            self._host = torch.zeros(RING, dtype=torch.int64, pin_memory=True)  # [RING]
            self._events = [torch.cuda.Event() for _ in range(RING)]
        self._values: deque[int] = deque()

    def reset(self) -> None:
        """Forget tokens of a previous (e.g. cancelled) request."""
        self._in_flight.clear()
        self._values.clear()

    def next_host(self) -> torch.Tensor | None:
        """The pinned [1] int64 slot the next `push` reads (None on the CPU): the sampling may write the token
        there itself (`Sampler.sample(host=)`) and push with `written=True`, so no copy follows it on the stream."""
        if not self.cuda:
            return None
        if len(self._in_flight) == RING:
            raise RuntimeError("too many token copies in flight")
        return self._host[self._next_slot : self._next_slot + 1]

    def push(self, token: torch.Tensor, written: bool = False) -> None:
        """Start moving token ([1] int64, on the device) to the host; no synchronisation on the device.
        `written`: the work queued before already writes it to `next_host()`'s slot (only the event is
        recorded)."""
        if not self.cuda:
            self._values.append(int(token))
            return
        host = self.next_host()  # [1] pinned; raises when the ring is full
        slot = self._next_slot
        self._next_slot = (slot + 1) % RING
        if not written:
            host.copy_(token, non_blocking=True)
        self._events[slot].record()
        self._in_flight.append(slot)

    @property
    def in_flight(self) -> int:
        """Tokens pushed and not yet popped."""
        return len(self._in_flight) if self.cuda else len(self._values)

    def pop(self) -> int:
        """The oldest pushed token, waiting only for its own copy."""
        if not self.cuda:
            return self._values.popleft()
        slot = self._in_flight.popleft()
        self._events[slot].synchronize()
        return int(self._host[slot])
