"""The executor seen from the JIT context: shared step buffers plus step commands over the control channel.

Implements `ExecutorPort`, so the same `Generator` drives an in-process runner or a remote executor.

A hung executor (alive, but no answer within `step_timeout_s`: stopped, deadlocked, a GPU hang) fails the
request in progress with `ExecutorTimeout` instead of an unbounded wait; the JIT context stays up. The
unanswered step is abandoned: its late StepDone, like any reply for an earlier step or request, is dropped
when it comes (the control channel is ordered, so once the executor answers a later step it has worked
through everything before it). Until the executor answers again, the end of a request does not wait for the
Reset's `Ok` either, so each following request fails after one time-out rather than two.
"""

from __future__ import annotations

import time

import torch

from ipc.channel import Channel
from ipc.errors import HybridrtError
from ipc.events import StepEvents
from ipc.liveness import process_alive
from ipc.messages import Decode, Error, Message, Ok, Prefill, Reset, Status, StatusReply, StepDone, Verify
from ipc.step_buffers import SharedStepBuffers

POLL_MS = 50  # how often a waiting step checks that the executor is alive
DEFAULT_STEP_TIMEOUT_S = 60.0  # generous: a long CPU prefill; a GPU step is only enqueued (well under 1 ms)
UNRESPONSIVE_STATUS_WAIT_S = 0.5  # a status request to an executor already known hung doesn't hold the server
SPIN_US = 2000  # busy-poll for the executor's StepDone this long before sleeping (GPU only)


class ExecutorDied(HybridrtError):
    """The graph executor process exited; nothing more can be served."""


class ExecutorTimeout(HybridrtError):
    """The graph executor is alive but did not answer within the step time-out; the request fails."""

    code = "executor_timeout"


class RemoteExecutor:
    def __init__(self, channel: Channel, shared: SharedStepBuffers, max_context: int,
                 executor_pid: int, events: StepEvents | None = None,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> None:
        if not step_timeout_s > 0:
            raise ValueError("step_timeout_s must be > 0")
        self.channel = channel
        self.shared = shared  # keeps the mappings alive while the views are used
        self.buffers = shared.buffers
        self.max_context = max_context
        self.executor_pid = executor_pid
        self.request_id = ""
        self._step = 0
        self._outstanding = False  # a step sent whose StepDone has not been read yet
        self.events = events  # GPU: order our sampling and the executor's steps by IPC events
        self.step_timeout_s = step_timeout_s
        self.unresponsive = False  # a wait timed out and the executor has not answered anything since

    def finish_request(self) -> None:
        """Tell the executor the request is over (it may capture graphs while idle). Never times out: the
        request has had its answer, and if the executor stays hung the next request fails on its first step."""
        try:
            self.wait_enqueued()  # a step of a cancelled request may still be unanswered
            self._send(Reset(self.request_id))
            if self.unresponsive:
                return  # its Ok comes, if ever, after the abandoned step's StepDone; both are dropped as stale
            request_id = self.request_id
            self._await(lambda reply: isinstance(reply, Ok) and reply.request_id in (request_id, None), "Reset")
        except ExecutorTimeout:
            pass

    def prefill(self, num_tokens: int, start_pos: int = 0) -> None:
        """Send the step and return at once: the caller overlaps its own set-up with the executor's launch."""
        self._send_step(Prefill(self.request_id, self._step + 1, num_tokens, start_pos))

    def decode(self, position: int) -> None:
        self._send_step(Decode(self.request_id, self._step + 1, position))

    def verify(self, position: int, num_tokens: int, draft_start: int | None = None) -> None:
        self._send_step(Verify(self.request_id, self._step + 1, position, num_tokens, draft_start))

    def wait_enqueued(self) -> None:
        """Wait for the executor to have *enqueued* the last step (not run it); our stream then waits on its
        event, so sampling reads the step's logits. Nothing on the host waits for the device."""
        if not self._outstanding:
            return
        self._outstanding = False  # answered, failed or timed out: never waited for again
        self._await(lambda reply: isinstance(reply, StepDone) and reply.step == self._step, f"step {self._step}")
        if self.events:
            torch.cuda.current_stream().wait_event(self.events.executor)

    def status(self) -> dict:
        """The executor's current facts (graphs captured and pending, memory); call between requests only.
        A hung executor gives {"unresponsive": ...} after the step time-out instead of holding the caller."""
        self._send_raw(Status())
        timeout_s = UNRESPONSIVE_STATUS_WAIT_S if self.unresponsive else self.step_timeout_s
        try:
            return self._await(lambda reply: isinstance(reply, StatusReply), "Status", raise_errors=False,
                               timeout_s=timeout_s).facts
        except ExecutorTimeout as e:
            return {"unresponsive": str(e)}

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

    def _await(self, wanted, what: str, raise_errors: bool = True, timeout_s: float | None = None) -> Message:
        """The first reply that `wanted` accepts; ExecutorDied, ExecutorTimeout, or HybridrtError for an Error."""
        # On the GPU a reply is due within a fraction of a millisecond (the executor only enqueues): spin for it.
        spin = SPIN_US if self.events else 0  # on the CPU the executor computes meanwhile: never steal its core
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.channel.recv(timeout_ms=POLL_MS, spin_us=spin)
            if reply is None:
                if not process_alive(self.executor_pid):
                    raise ExecutorDied("the graph executor process died")
                if time.monotonic() >= deadline:
                    self.unresponsive = True
                    raise ExecutorTimeout(f"executor_timeout: the graph executor did not answer {what} within "
                                          f"{timeout_s:g} s (it is alive but hung)")
                continue
            self.unresponsive = False
            if isinstance(reply, Error) and raise_errors and reply.request_id in (self.request_id, None):
                raise HybridrtError(f"executor: {reply.message}")
            if wanted(reply):
                return reply
            # A stale reply (of an abandoned step, a cancelled request, an Error for an earlier one) is dropped.
