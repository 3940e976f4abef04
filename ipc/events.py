"""The two CUDA interprocess events that order the executor's steps and the JIT context's sampling on the GPU
without host synchronisation. The executor creates both and exports their handles; the JIT context opens them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipc.messages import EventHandles


@dataclass(frozen=True)
class StepEvents:
    executor: torch.cuda.Event  # recorded by the executor after each step (logits ready)
    jit: torch.cuda.Event  # recorded by the JIT context after writing inputs or sampling (next token ready)

    @classmethod
    def create(cls, device: torch.device) -> StepEvents:
        with torch.cuda.device(device):
            # interprocess events cannot time (CUDA requires disableTiming for IPC).
            executor = torch.cuda.Event(interprocess=True)
            jit = torch.cuda.Event(interprocess=True)
            executor.record()  # a recorded event, so a first wait on it is well defined
            jit.record()
        return cls(executor, jit)

    def handles(self) -> EventHandles:
        return EventHandles(executor=bytes(self.executor.ipc_handle()), jit=bytes(self.jit.ipc_handle()))

    @classmethod
    def open(cls, handles: EventHandles, device: torch.device) -> StepEvents:
        return cls(torch.cuda.Event.from_ipc_handle(device, handles.executor),
                   torch.cuda.Event.from_ipc_handle(device, handles.jit))
