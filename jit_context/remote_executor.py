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
from collections.abc import Sequence

import torch

from ipc.channel import Channel
from ipc.doorbell import OK, Doorbell
from ipc.errors import HybridrtError
from ipc.events import StepEvents
from ipc.liveness import process_alive
from ipc.messages import (
    Decode,
    DecodeBatch,
    Error,
    Message,
    Ok,
    Prefill,
    PromptChunk,
    Reset,
    ScorePrompt,
    Status,
    StatusReply,
    StepDone,
    Verify,
)
from ipc.step_buffers import SharedStepBuffers
from jit_context import DEFAULT_STEP_TIMEOUT_S

POLL_MS = 50  # how often a waiting step checks that the executor is alive
UNRESPONSIVE_STATUS_WAIT_S = 0.5  # a status request to an executor already known hung doesn't hold the server
SPIN_US = 2000  # busy-poll for the executor's StepDone this long before sleeping (GPU only)
SPIN_RUN_US = 100_000  # the same for a step answered once it has *run* (Verify.accept): a whole step, spun on


class ExecutorDied(HybridrtError):
    """The graph executor process exited; nothing more can be served."""


class ExecutorTimeout(HybridrtError):
    """The graph executor is alive but did not answer within the step time-out; the request fails."""

    code = "executor_timeout"


class RemoteExecutor:
    def __init__(self, channel: Channel, shared: SharedStepBuffers, max_context: int,
                 executor_pid: int, events: StepEvents | None = None,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S, doorbell: Doorbell | None = None) -> None:
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
        self.doorbell = doorbell  # steps rung in shared memory (ipc/doorbell.py); None: ZeroMQ only
        self._rung: int | None = None  # the doorbell seq of the outstanding step, if it was rung
        self._spin_us = SPIN_US  # how long to busy-poll for the outstanding step's answer (GPU)
        self.events = events  # GPU: order our sampling and the executor's steps by IPC events
        self.step_timeout_s = step_timeout_s
        self.unresponsive = False  # a wait timed out and the executor has not answered anything since

    def finish_request(self) -> None:
        """Tell the executor the request is over (it may capture graphs while idle). With a doorbell the Reset is
        rung (and the executor woken if it does not listen) and nothing waits for it (ipc/doorbell.py says why that
        is safe), so the serving loop reads the next client's request at once: a client that sent it as soon as it
        had the last one's Finished found the loop still in the Ok's round trip (two ZeroMQ hops, ~0.2 ms on the
        H200 host). Without one it goes over ZeroMQ and its Ok is waited for. Never times out: the request has had
        its answer, and if the executor stays hung the next request fails on its first step. A step of a cancelled
        request that failed is reported after the Reset is sent."""
        failed: HybridrtError | None = None
        try:
            self.wait_enqueued()  # a step of a cancelled request may still be unanswered
        except ExecutorTimeout:
            return
        except ExecutorDied:
            raise
        except HybridrtError as e:  # the executor's Error for that step: the request still ends on the executor
            failed = e
        reset = Reset(self.request_id)
        if self.doorbell is not None and self.doorbell.ring(reset) is not None:
            if not self.doorbell.listening():
                self.doorbell.wake()
        else:
            self._send(reset)
            if not self.unresponsive:  # else its Ok comes, if ever, after the abandoned step's StepDone: both dropped
                request_id = self.request_id
                try:
                    self._await(lambda reply: isinstance(reply, Ok) and reply.request_id in (request_id, None),
                                "Reset")
                except ExecutorTimeout:
                    pass
        if failed is not None:
            raise failed

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None:
        """Send the step and return at once: the caller overlaps its own set-up with the executor's launch."""
        self._send_step(Prefill(self.request_id, self._step + 1, num_tokens, start_pos, slot))

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        self._send_step(Decode(self.request_id, self._step + 1, position, argmax, own_input))

    def decode_batch(self, slots: list[int], positions: list[int], chunks: Sequence[PromptChunk] = ()) -> None:
        self._send_step(DecodeBatch(self.request_id, self._step + 1, list(slots), list(positions),
                                    [c.num_tokens for c in chunks], [c.start_pos for c in chunks],
                                    [c.slot for c in chunks]))

    def verify(self, position: int, num_tokens: int, draft_start: int | None = None, tokens: list[int] | None = None,
               accept: bool = False) -> None:
        self._send_step(Verify(self.request_id, self._step + 1, position, num_tokens, draft_start, tokens, accept))
        self._spin_us = SPIN_RUN_US if accept else SPIN_US

    def wake_early(self) -> None:
        """A request has arrived: wake a sleeping executor now (its doorbell's wake pipe), so that its thread's
        wake-up overlaps our tokenization and set-up instead of following the first step's command; woken without
        a command, it watches the bell for a while (graph_executor/server.py). Nothing when it listens already."""
        if self.doorbell is not None and not self.doorbell.listening():
            self.doorbell.wake()

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """A prefill that also scores its first `scored` rows (`ipc.messages.ScorePrompt`): sent over ZeroMQ only
        (its answer's values do not fit the doorbell); waits for the step to have run and returns the values."""
        self._send_step(ScorePrompt(self.request_id, self._step + 1, num_tokens, start_pos, slot, logprobs, scored),
                        ring=False)
        done = self._wait_step()
        if done is None or done.logprobs is None:
            raise HybridrtError("executor: a prompt's scoring step was answered without its values")
        return done.logprobs

    def wait_enqueued(self) -> None:
        """Wait for the executor to have *enqueued* the last step (not run it); our stream then waits on its
        event, so sampling reads the step's logits. Nothing on the host waits for the device."""
        self._wait_step()

    def wait_accepted(self) -> list[int]:
        """The result of the last step, a verify with `accept`: the executor answers once it has run."""
        done = self._wait_step()
        if done is None or done.accepted is None:
            raise HybridrtError("executor: a verify step with acceptance was answered without its result")
        return done.accepted

    def _wait_step(self) -> StepDone | None:
        """Wait for the outstanding step's answer (if any): its StepDone (an accepting verify's result, a scoring
        step's values)."""
        if not self._outstanding:
            return None
        self._outstanding = False  # answered, failed or timed out: never waited for again
        done = self._await_rung(self._rung) if self._rung is not None else None
        if done is None:  # not rung, or failed there (the Error is on ZeroMQ)
            done = self._await(self._is_step_done, f"step {self._step}")
        if self.events and done.accepted is None:  # an accepting step has run: nothing to order after
            torch.cuda.current_stream().wait_event(self.events.executor)
        return done

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

    def _send_step(self, msg: Message, ring: bool = True) -> None:
        """Send the step `msg` (numbered self._step + 1), on the doorbell too unless `ring` is False (a ScorePrompt:
        its answer's values do not fit the bell, so it comes over ZeroMQ, where it is sent only)."""
        self.wait_enqueued()
        self._step += 1
        self._spin_us = SPIN_US
        if self.events:
            self.events.jit.record()  # our writes (prompt ids, sampled token) come before the step
        # Ring first, then ask whether the executor still watches the bell: if it promised to for a while yet,
        # it sees the command before it could sleep, and the ZeroMQ copy is skipped (ipc/doorbell.py).
        self._rung = self.doorbell.ring(msg) if ring and self.doorbell is not None else None
        if self._rung is None or not self.doorbell.listening():
            if self._rung is not None:
                self.doorbell.wake()  # a sleeping executor takes the rung command without waiting for the copy
            self._send_raw(msg)
        self._outstanding = True

    def _await_rung(self, seq: int) -> StepDone | None:
        """Wait for the executor's answer to a rung step on the doorbell or, if it came by ZeroMQ, there (the
        executor answers on one of the two). The step's StepDone (rebuilt from the bell's answer), or None when it
        failed (the Error is on ZeroMQ). ExecutorDied or ExecutorTimeout as `_await`."""
        spin_end = time.perf_counter_ns() + (self._spin_us * 1000 if self.events else 0)
        deadline = time.monotonic() + self.step_timeout_s
        next_check = time.monotonic() + POLL_MS / 1e3
        while True:
            answer = self.doorbell.answered(seq)
            if answer is not None:
                self.unresponsive = False
                if answer.status != OK:
                    return None
                return StepDone(self.request_id, self._step, list(answer.values) or None)
            spinning = time.perf_counter_ns() < spin_end
            reply = self.channel.recv(timeout_ms=0 if spinning else 1)
            if reply is not None:
                if self._accepts(reply, self._is_step_done):
                    return reply
                continue
            if not spinning and time.monotonic() >= next_check:
                next_check = time.monotonic() + POLL_MS / 1e3
                self._check_waiting(deadline, f"step {self._step}")

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
                self._check_waiting(deadline, what, timeout_s)
                continue
            if self._accepts(reply, wanted, raise_errors):
                return reply

    def _accepts(self, reply: Message, wanted, raise_errors: bool = True) -> bool:
        """Whether `wanted` takes this reply; HybridrtError for an Error of the current request (`raise_errors`).
        A stale reply (of an abandoned step, a cancelled request, an Error for an earlier one) is not taken: the
        caller drops it and waits on."""
        self.unresponsive = False
        if isinstance(reply, Error) and raise_errors and reply.request_id in (self.request_id, None):
            raise HybridrtError(f"executor: {reply.message}")
        return wanted(reply)

    def _is_step_done(self, reply: Message) -> bool:
        return isinstance(reply, StepDone) and reply.step == self._step

    def _check_waiting(self, deadline: float, what: str, timeout_s: float | None = None) -> None:
        """While waiting for an answer: ExecutorDied if the executor is gone, ExecutorTimeout past the deadline."""
        if not process_alive(self.executor_pid):
            raise ExecutorDied("the graph executor process died")
        if time.monotonic() >= deadline:
            self.unresponsive = True
            timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
            raise ExecutorTimeout(f"executor_timeout: the graph executor did not answer {what} within "
                                  f"{timeout_s:g} s (it is alive but hung)")
