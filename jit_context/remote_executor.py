"""The executor seen from the JIT context: shared step buffers plus step commands over the control channel.

Implements `ExecutorPort`, so the same `Generator` drives an in-process runner or a remote executor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipc.channel import Channel
from ipc.errors import HybridrtError
from ipc.liveness import process_alive
from ipc.events import StepEvents
from ipc.messages import Decode, Error, Message, Ok, Prefill, Reset, Status, StatusReply, StepDone
from ipc.shared_tensor import SharedTensor

POLL_MS = 50  # how often a waiting step checks that the executor is alive


class ExecutorDied(HybridrtError):
    """The graph executor process exited; nothing more can be served."""


@dataclass(frozen=True)
class RemoteBuffers:
    input_ids: torch.Tensor  # [max_context] int64
    next_token: torch.Tensor  # [1] int64
    logits: torch.Tensor  # [vocab] float32


class RemoteExecutor:
    def __init__(self, channel: Channel, shared: dict[str, SharedTensor], max_context: int,
                 executor_pid: int, events: StepEvents | None = None) -> None:
        self.channel = channel
        self._shared = shared  # keeps the mappings alive while the views are used
        self.buffers = RemoteBuffers(shared["input_ids"].tensor, shared["next_token"].tensor,
                                     shared["logits"].tensor)
        self.max_context = max_context
        self.executor_pid = executor_pid
        self.request_id = ""
        self._step = 0
        self.events = events  # GPU: order our sampling and the executor's steps by IPC events

    def finish_request(self) -> None:
        """Tell the executor the request is over (it may capture graphs while idle)."""
        self._call(Reset(self.request_id))

    def prefill(self, num_tokens: int, start_pos: int = 0) -> None:
        self._call(Prefill(self.request_id, self._next_step(), num_tokens, start_pos))

    def decode(self, position: int) -> None:
        self._call(Decode(self.request_id, self._next_step(), position))

    def status(self) -> dict:
        """The executor's current facts (graphs captured and pending, memory); call between requests only."""
        self.channel.send(Status())
        while True:
            reply = self.channel.recv(timeout_ms=POLL_MS)
            if reply is None:
                if not process_alive(self.executor_pid):
                    raise ExecutorDied("the graph executor process died")
            elif isinstance(reply, StatusReply):
                return reply.facts

    def _next_step(self) -> int:
        self._step += 1
        return self._step

    def _call(self, msg: Message) -> None:
        """Send a step (or Reset) and wait for the executor to have *enqueued* it, not to have run it."""
        if self.events:
            self.events.jit.record()  # our writes (prompt ids, sampled token) come before the step
        self.channel.send(msg)
        while True:
            reply = self.channel.recv(timeout_ms=POLL_MS)
            if reply is None:
                if not process_alive(self.executor_pid):
                    raise ExecutorDied("the graph executor process died")
                continue
            if isinstance(reply, Error):
                raise HybridrtError(f"executor: {reply.message}")
            if isinstance(msg, Reset) and isinstance(reply, Ok):
                return
            if isinstance(reply, StepDone) and reply.step == self._step:
                if self.events:
                    torch.cuda.current_stream().wait_event(self.events.executor)  # logits before sampling
                return
            # A stale reply (e.g. of a step whose request was cancelled) is dropped.
