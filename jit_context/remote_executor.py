"""The executor seen from the JIT context: shared step buffers plus step commands over the control channel.

Implements `ExecutorPort`, so the same `Generator` drives an in-process runner or a remote executor.
"""

from __future__ import annotations

import torch

from ipc.channel import Channel
from ipc.errors import HybridrtError
from ipc.events import StepEvents
from ipc.liveness import process_alive
from ipc.messages import Decode, Error, Message, Ok, Prefill, Reset, Status, StatusReply, StepDone
from ipc.step_buffers import SharedStepBuffers

POLL_MS = 50  # how often a waiting step checks that the executor is alive
SPIN_US = 2000  # busy-poll for the executor's StepDone this long before sleeping (GPU only)


class ExecutorDied(HybridrtError):
    """The graph executor process exited; nothing more can be served."""


class RemoteExecutor:
    def __init__(self, channel: Channel, shared: SharedStepBuffers, max_context: int,
                 executor_pid: int, events: StepEvents | None = None) -> None:
        self.channel = channel
        self.shared = shared  # keeps the mappings alive while the views are used
        self.buffers = shared.buffers
        self.max_context = max_context
        self.executor_pid = executor_pid
        self.request_id = ""
        self._step = 0
        self._outstanding = False  # a step sent whose StepDone has not been read yet
        self.events = events  # GPU: order our sampling and the executor's steps by IPC events

    def finish_request(self) -> None:
        """Tell the executor the request is over (it may capture graphs while idle)."""
        self.wait_enqueued()  # a step of a cancelled request may still be unanswered
        self._send(Reset(self.request_id))
        self._await(lambda reply: isinstance(reply, Ok))

    def prefill(self, num_tokens: int, start_pos: int = 0) -> None:
        """Send the step and return at once: the caller overlaps its own set-up with the executor's launch."""
        self._send_step(Prefill(self.request_id, self._step + 1, num_tokens, start_pos))

    def decode(self, position: int) -> None:
        self._send_step(Decode(self.request_id, self._step + 1, position))

    def wait_enqueued(self) -> None:
        """Wait for the executor to have *enqueued* the last step (not run it); our stream then waits on its
        event, so sampling reads the step's logits. Nothing on the host waits for the device."""
        if not self._outstanding:
            return
        self._await(lambda reply: isinstance(reply, StepDone) and reply.step == self._step)
        self._outstanding = False
        if self.events:
            torch.cuda.current_stream().wait_event(self.events.executor)

    def status(self) -> dict:
        """The executor's current facts (graphs captured and pending, memory); call between requests only."""
        self._send_raw(Status())
        while True:
            reply = self.channel.recv(timeout_ms=POLL_MS)
            if reply is None:
                if not process_alive(self.executor_pid):
                    raise ExecutorDied("the graph executor process died")
            elif isinstance(reply, StatusReply):
                return reply.facts

    def _send_step(self, msg: Message) -> None:
        self.wait_enqueued()
        self._step += 1
        self._send(msg)
        self._outstanding = True

    def _send(self, msg: Message) -> None:
        if self.events:
            self.events.jit.record()  # our writes (prompt ids, sampled token) come before the step
        self._send_raw(msg)

    def _send_raw(self, msg: Message) -> None:
        if not self.channel.send_while(msg, lambda: process_alive(self.executor_pid), POLL_MS):
            raise ExecutorDied("the graph executor process died")

    def _await(self, wanted) -> None:
        # On the GPU a reply is due within a fraction of a millisecond (the executor only enqueues): spin for it.
        spin = SPIN_US if self.events else 0  # on the CPU the executor computes meanwhile: never steal its core
        while True:
            reply = self.channel.recv(timeout_ms=POLL_MS, spin_us=spin)
            if reply is None:
                if not process_alive(self.executor_pid):
                    raise ExecutorDied("the graph executor process died")
                continue
            if isinstance(reply, Error):
                self._outstanding = False
                raise HybridrtError(f"executor: {reply.message}")
            if wanted(reply):
                return
            # A stale reply (e.g. of a step whose request was cancelled) is dropped.
