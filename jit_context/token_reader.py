"""Sampled tokens reach the host without stalling the device: an asynchronous copy into pinned memory per
step, read once the next step is already queued on the device, so the host wait never leaves the GPU idle.
"""

from __future__ import annotations

from collections import deque

import torch

from jit_context.sampling_params import MAX_LOGPROBS

RING = 4  # host slots; the loop keeps at most decode_ahead copies in flight (jit_context/generator.py)
EXTRA_WIDTH = 1 + 2 * MAX_LOGPROBS  # Sampler.last_logprobs at its widest


class TokenReader:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._in_flight: deque[int] = deque()
        self._next_slot = 0
        if self.cuda:
            self._host = torch.zeros(RING, dtype=torch.int64, pin_memory=True)  # [RING]
            self._events = [torch.cuda.Event() for _ in range(RING)]
            # what a push may carry besides its token (a request's log-probabilities), pinned
            self._extra_host = torch.zeros(RING, EXTRA_WIDTH, dtype=torch.float32, pin_memory=True)  # [RING, W]
        self._values: deque[int] = deque()
        self._extra: deque[int | list[float] | None] = deque()  # per push: its width (GPU) or values (CPU), or None
        self.popped_extra: list[float] | None = None  # the extra values of the token `pop` returned last (None: none)

    def reset(self) -> None:
        """Forget tokens of a previous (e.g. cancelled) request."""
        self._in_flight.clear()
        self._values.clear()
        self._extra.clear()

    def next_host(self) -> torch.Tensor | None:
        """The pinned [1] int64 slot the next `push` reads (None on the CPU): the sampling may write the token
        there itself (`Sampler.sample(host=)`) and push with `written=True`, so no copy follows it on the stream."""
        if not self.cuda:
            return None
        if len(self._in_flight) == RING:
            raise RuntimeError("too many token copies in flight")
        return self._host[self._next_slot : self._next_slot + 1]

    def push(self, token: torch.Tensor, written: bool = False, extra: torch.Tensor | None = None) -> None:
        """Start moving token ([1] int64, on the device) to the host; no synchronisation on the device.
        `written`: the work queued before already writes it to `next_host()`'s slot (only the event is
        recorded). `extra`: a [n <= EXTRA_WIDTH] float32 device tensor that travels with the token (`popped_extra`
        after its `pop`), copied now, so that the work queued after may overwrite it."""
        if extra is not None and extra.numel() > EXTRA_WIDTH:
            raise ValueError(f"a token's extra values are at most {EXTRA_WIDTH}, got {extra.numel()}")
        if not self.cuda:
            self._values.append(int(token))
            self._extra.append(None if extra is None else extra.tolist())
            return
        host = self.next_host()  # [1] pinned; raises when the ring is full
        slot = self._next_slot
        self._next_slot = (slot + 1) % RING
        if not written:
            host.copy_(token, non_blocking=True)
        if extra is not None:
            self._extra_host[slot, :extra.numel()].copy_(extra, non_blocking=True)
        self._extra.append(None if extra is None else extra.numel())
        self._events[slot].record()
        self._in_flight.append(slot)

    @property
    def in_flight(self) -> int:
        """Tokens pushed and not yet popped."""
        return len(self._in_flight) if self.cuda else len(self._values)

    def pop(self) -> int:
        """The oldest pushed token, waiting only for its own copy; its extra values are then `popped_extra`."""
        if not self.cuda:
            self.popped_extra = self._extra.popleft()
            return self._values.popleft()
        slot = self._in_flight.popleft()
        self._events[slot].synchronize()
        width = self._extra.popleft()
        self.popped_extra = None if width is None else self._extra_host[slot, :width].tolist()
        return int(self._host[slot])
