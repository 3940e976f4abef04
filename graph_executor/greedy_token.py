"""The greedy token of a decode step, taken by the executor (`Decode.argmax`).

For a plain greedy request (no penalty, no min_tokens, nothing the sampler must apply) the token after a decode
step is the argmax of its logits, which the executor can take itself right after the step on its own stream: it
writes next_token (the next step's input) and files the token at token_ring[position % TOKEN_RING], where the JIT
context copies it out later. The next step (`Decode.own_input`) then waits for nothing of the JIT context's:
no cross-process hand-over on the GPU between two steps (each one's IPC-event wait cost ~25 us on an H200 host,
graph_executor/server.py), and no sampling launch of the JIT context's on the token's way.

On a GPU the argmax kernel (kernels/argmax.py) reads the position from the step's own device buffer and files the
token in the same kernel; on the CPU, torch's argmax and a copy.
"""

from __future__ import annotations

import torch

from ipc.step_buffers import StepBuffers


class GreedyToken:
    def __init__(self, buffers: StepBuffers) -> None:
        self.buffers = buffers
        device = buffers.logits.device
        self._kernel = None
        if device.type == "cuda":
            from graph_executor.kernels.argmax import Argmax

            self._kernel = Argmax(device)

    def run(self, position: int, device_position: torch.Tensor | None = None, advance: bool = False) -> None:
        """After a decode step at `position` (its logits in `logits`): next_token[0] and token_ring[position %
        TOKEN_RING] = argmax(logits). `device_position` ([1] int64 on the device, holding `position`): the GPU kernel
        reads the ring's slot from it (a graph-safe launch), and with `advance` sets it to `position` + 1 (the next
        decode's); None: the slot is taken from `position` on the host."""
        b = self.buffers
        if self._kernel is not None and device_position is not None:
            self._kernel(b.logits, b.token, ring=b.token_ring, position=device_position, advance=advance)
            return
        if advance:
            raise ValueError("advance needs the GPU kernel and the step's device position")
        torch.argmax(b.logits, dim=0, keepdim=True, out=b.token)  # [1]
        b.ring_slot(position).copy_(b.token)
