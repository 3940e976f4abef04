"""The graph executor's serving loop: answers the JIT context's handshake with `Ready` (model facts and the
step buffers' specs), then runs Prefill/Decode/Verify steps and replies `StepDone`; captures graphs while idle. The
process around it (arguments, loading, signals) is `graph_executor.process`.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import torch
import zmq

from graph_executor.draft import DraftingRunner, DraftProposer
from graph_executor.loading.loader import LoadedModel
from graph_executor.runner import ModelRunner
from graph_executor.tensor_parallel import TensorParallel
from graph_executor.tp_relay import LeaderRunner
from ipc.channel import Channel
from ipc.doorbell import FAILED, OK, Doorbell
from ipc.errors import HybridrtError, ProtocolError
from ipc.events import StepEvents
from ipc.liveness import process_alive
from ipc.messages import (
    PROTOCOL_VERSION,
    Decode,
    DecodeBatch,
    Error,
    Handshake,
    Message,
    Ok,
    Prefill,
    Ready,
    Reset,
    ScorePrompt,
    Status,
    StatusReply,
    StepDone,
    Verify,
)
from ipc.shared_tensor import dtype_name
from ipc.startup import StartupPhases
from ipc.step_buffers import SharedStepBuffers

POLL_MS = 100  # how often an idle executor checks that its peers are alive
SPIN_US = 20_000  # while a request runs on the GPU, busy-poll this long for the next step before sleeping
CAPTURE_AFTER_IDLE_S = 1.0  # the remaining graphs are captured once no command came for this long


class ExecutorServer:
    def __init__(self, channel: Channel, loaded: LoadedModel, supervisor_pid: int | None,
                 graphs: bool = True, quiet: bool = False, draft: LoadedModel | None = None,
                 doorbell: Doorbell | None = None, startup: StartupPhases | None = None,
                 tp: TensorParallel | None = None) -> None:
        """`tp`: this is rank 0 of a tensor-parallel executor: each step is relayed to the other ranks
        (graph_executor/tp_relay.py)."""
        self.quiet = quiet
        self.startup = startup  # this process's start-up phases, for its facts
        self.channel = channel
        self.doorbell = doorbell  # step commands without a ZeroMQ hop (ipc/doorbell.py); None: ZeroMQ only
        self._idle_poller = zmq.Poller()  # asleep: the control socket and the doorbell's wake pipe
        self._idle_poller.register(channel.socket, zmq.POLLIN)
        if doorbell is not None and doorbell.wake_fd is not None:
            self._idle_poller.register(doorbell.wake_fd, zmq.POLLIN)
        self.promise_ns = 0  # we watch the doorbell until then (CLOCK_MONOTONIC) before sleeping in a poll
        # (request id, step) of the last step run; a step numbered at or below it is a copy from the other path, dropped
        # (the numbers are the JIT context's, increasing over its life; a Handshake starts them again)
        self.last_step: tuple[str, int] = ("", 0)
        self.loaded = loaded
        model = loaded.model
        device = model.embed_tokens.device
        self.shared = SharedStepBuffers.export(model.config.vocab_size, model.max_context, device, model.slots)
        buffers = self.shared.buffers
        self.cuda = device.type == "cuda"
        self.graphs = None  # the GraphRunner on the GPU path: it captures while idle and reports its graphs
        if self.cuda and graphs:
            from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

            # tensor-parallel ranks take the smallest bucket that holds a prompt: the same graph on every rank
            self.graphs = GraphRunner(model, buffers, measured_buckets=tp is None or tp.size == 1)
        self.draft = draft
        proposer = DraftProposer(draft.model, buffers.input_ids, graphs) if draft is not None else None
        inner = self.graphs if self.graphs is not None else ModelRunner(model, buffers)
        self.leader = LeaderRunner(inner, tp) if tp is not None and tp.size > 1 else None
        self.runner = DraftingRunner(self.leader or inner, proposer)
        # GPU hand-over: the JIT context records `jit_event` after writing inputs / sampling; we wait on it
        # before a step and record `exec_event` after it. Neither side's host ever waits for the device.
        self.events = StepEvents.create(device) if self.cuda else None
        self.supervisor_pid = supervisor_pid
        self.peer_pid: int | None = None
        self.busy = False  # a request is between its Prefill and its Reset: no graph capture then
        # (request id, position) of the last step, if it was a decode that took its token here (Decode.argmax): an
        # own_input decode skips the wait for the JIT context only right after it (else it waits, as any step)
        self._argmax_step: tuple[str, int] | None = None
        self.last_command = time.monotonic()  # captures wait until the executor has been idle a while
        self.answered_early = False  # the Handshake was answered while start-up captures ran (Ready.captures_pending)
        # a message read but not run yet (during the start-up captures, or by `rung_copy` behind the bell's
        # command): `next_turn` hands it out first
        self.held: Message | None = None
        # when the last Prefill was taken up and when its step had been launched (status facts: bench.probes.idle_gap
        # splits a request's way to its prefill with them)
        self.last_prefill: dict[str, float] = {}

    def facts(self) -> dict:
        """What `status` shows about the executor (informational: nothing the protocol depends on)."""
        facts = {"load_seconds": round(self.loaded.load_seconds, 3), "source": self.loaded.source,
                 "executor_pid": os.getpid(), "num_params": self.loaded.model.config.num_params(),
                 "weight_format": self.loaded.weight_format, "kv_cache_bytes": self.loaded.kv_cache_bytes,
                 "graphs": self.runner.facts()}
        if self.last_prefill:
            facts["last_prefill"] = dict(self.last_prefill)
        if self.leader is not None:
            facts["tensor_parallel"] = self.leader.tp.size
        if self.startup is not None:
            facts["startup"] = self.startup.facts()
        if self.draft is not None:
            facts["draft"] = {"model": self.draft.name, "source": self.draft.source,
                              "num_params": self.draft.model.config.num_params(),
                              "load_seconds": round(self.draft.load_seconds, 3)}
        if self.cuda:
            facts["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            facts["device_name"] = torch.cuda.get_device_name(self.loaded.model.embed_tokens.device)
        return facts

    def ready_message(self, captures_pending: bool = False) -> Ready:
        """`captures_pending`: sent while start-up graphs are still being captured; the executor is ready (its start-up
        phases end) only with the Ready that follows them."""
        if self.startup is not None and not captures_pending:
            self.startup.ready()
        model, cfg = self.loaded.model, self.loaded.model.config
        tokenizer = str(self.loaded.tokenizer_path) if self.loaded.tokenizer_path else None
        return Ready(PROTOCOL_VERSION, self.loaded.name, cfg.vocab_size, model.max_context,
                     dtype_name(model.dtype), str(model.embed_tokens.device), self.shared.specs(),
                     sorted(cfg.eos_token_ids), events=self.events.handles() if self.events else None,
                     tokenizer_path=tokenizer, facts=self.facts(),
                     draft_model=self.draft.name if self.draft is not None else None,
                     draft_params=self.draft.model.config.num_params() if self.draft is not None else 0,
                     doorbell=str(self.doorbell.path) if self.doorbell is not None else None,
                     max_num_seqs=model.slots, captures_pending=captures_pending)

    def peers_alive(self) -> bool:
        pids = [p for p in (self.peer_pid, self.supervisor_pid) if p is not None]
        return all(process_alive(p) for p in pids)

    def serve(self) -> None:
        while True:
            try:
                got = self.next_turn()
            except ProtocolError as e:
                if not self.reply(Error(e.code, str(e))):
                    return
                continue
            if got is None:
                if not self.peers_alive():
                    self.say_peer_gone()
                    return
                self.capture_when_idle()
                continue
            if not isinstance(got[1], Status):  # a status poll (a bench waiting for the graphs) is not work
                self.last_command = time.monotonic()
            answer = self.dispatch(*got)
            if answer is not None and not self.reply(answer):
                self.say_peer_gone()
                return

    def next_turn(self) -> tuple[int | None, Message] | None:
        """The next command to run: the held message first, else `next_command`. (`rung_copy` holds a message in
        the very call that hands out the bell's command: `held` must not be cleared after that call, which lost a
        Status sent right after a rung Reset until the JIT context's step time-out.)"""
        if self.held is not None:
            held, self.held = self.held, None
            return None, held
        return self.next_command()

    def next_command(self) -> tuple[int | None, Message] | None:
        """The next command and its doorbell seq (None: it came over ZeroMQ only), or None after an idle poll.

        Mid-request on the GPU the next step is due within a token time: spin instead of sleeping, so the
        command is picked up without a thread wake-up (and, rung on the doorbell, without a ZeroMQ hop at all).
        Idle (or on the CPU) it sleeps in the poll."""
        spin = self.busy and (self.cuda or self.doorbell is not None)
        bell = self.doorbell
        if bell is None:
            msg = self.channel.recv(timeout_ms=POLL_MS, spin_us=SPIN_US if spin else 0)
            return None if msg is None else (None, msg)
        if spin:
            self.promise_ns = time.monotonic_ns() + SPIN_US * 1000
            bell.listen_until(self.promise_ns)
        while True:
            while True:  # until the promise made runs out (the JIT context may have rung without a ZeroMQ copy)
                if (taken := bell.take()) is not None:
                    return taken
                if self.channel.poll(0):
                    return self.rung_copy(self.channel.recv(timeout_ms=0))
                if time.monotonic_ns() >= self.promise_ns:
                    break
            if (taken := bell.take()) is not None:  # rung just before the promise ran out
                return taken
            if bell.wake_fd is None:
                msg = self.channel.recv(timeout_ms=POLL_MS)
                return None if msg is None else self.rung_copy(msg)
            # asleep until the JIT context's byte in the wake pipe (a request arrived, or it rang the bell) or a
            # ZeroMQ message
            ready = dict(self._idle_poller.poll(POLL_MS))
            if bell.wake_fd in ready:
                bell.drain_wake()
                if (taken := bell.take()) is not None:
                    return taken
            if self.channel.socket in ready:
                return self.rung_copy(self.channel.recv(timeout_ms=0))
            if bell.wake_fd not in ready:
                return None  # an idle poll
            # woken ahead of a request's first step (`RemoteExecutor.wake_early`): watch the bell for it a while
            self.promise_ns = time.monotonic_ns() + SPIN_US * 1000
            bell.listen_until(self.promise_ns)

    def rung_copy(self, msg: Message | None) -> tuple[int | None, Message] | None:
        """A message from ZeroMQ, with the doorbell seq of the same step if it was also rung (and not taken). A
        command on the bell not taken yet and not this one comes first, and this message is held for the next turn:
        the bell goes before ZeroMQ (a Reset rung with nothing waiting for it must not be read after the next
        request's first step, even one that came over ZeroMQ only)."""
        if msg is None:
            return None
        rung = self.doorbell.peek()
        if rung is None:
            return None, msg
        self.doorbell.taken = rung[0]  # what was peeked (take() would read again, and could skip a newer command)
        if isinstance(msg, STEPS) and _step_key(rung[1]) == _step_key(msg):
            return rung[0], msg
        self.held = msg
        return rung

    def dispatch(self, seq: int | None, msg: Message) -> Message | None:
        """Run one command; the ZeroMQ reply to send, or None (answered on the doorbell, or a duplicate)."""
        key = _step_key(msg)
        if key is not None and key[1] <= self.last_step[1]:
            return None  # the other path's copy of a step run (ipc/doorbell.py: why not only the last one's)
        answer = self.handle(msg)
        if key is not None:
            self.last_step = key
        if seq is None:
            return answer
        ok = isinstance(answer, (StepDone, Ok))  # a rung Reset is answered on the bell too (nothing waits for it)
        self.doorbell.answer(seq, OK if ok else FAILED, (getattr(answer, "accepted", None) or ()) if ok else ())
        return None if ok else answer  # an Error also goes over ZeroMQ, with its text

    def say_peer_gone(self) -> None:
        if self.supervisor_pid is None:  # supervised, the supervisor reports which process ended and why
            print("graph_executor: peer process is gone, exiting", file=sys.stderr)

    def reply(self, msg: Message) -> bool:
        """Send to the JIT context; False once it is gone."""
        return self.channel.send_while(msg, self.peers_alive, POLL_MS)

    def own_input_trusted(self, msg: Decode) -> bool:
        """Whether a decode may skip the wait for the JIT context's GPU work (`Decode.own_input`): only right after
        this executor's own argmax decode of the same request at the position before (a wrong flag would otherwise
        race the JIT context's writes to next_token)."""
        return msg.own_input and self._argmax_step == (msg.request_id, msg.position - 1)

    def handle(self, msg: Message) -> Message:
        own = isinstance(msg, Decode) and self.own_input_trusted(msg)
        self._argmax_step = None  # any step but an argmax decode ends the chain
        try:
            if isinstance(msg, Prefill):
                self.busy = True
                handled = time.perf_counter()
                with self.ordered():
                    self.runner.prefill(msg.num_tokens, msg.start_pos, msg.slot)
                # on perf_counter (CLOCK_MONOTONIC on Linux): the JIT context's timings use the same clock
                self.last_prefill = {"handled_at_s": round(handled, 6), "launched_at_s": round(time.perf_counter(), 6)}
                return StepDone(msg.request_id, msg.step)
            if isinstance(msg, ScorePrompt):  # answered once it has run: the values are read back here
                self.busy = True
                with self.ordered():
                    values = self.runner.score_prompt(msg.num_tokens, msg.start_pos, msg.slot, msg.logprobs,
                                                      msg.scored)
                return StepDone(msg.request_id, msg.step, logprobs=values)
            if isinstance(msg, DecodeBatch):
                with self.ordered():
                    self.runner.decode_batch(msg.slots, msg.positions, msg.chunks)
                return StepDone(msg.request_id, msg.step)
            if isinstance(msg, Decode):
                # own_input (trusted): the JIT context wrote nothing this step reads (its input is our last argmax)
                with self.ordered(after_jit=not own):
                    self.runner.decode(msg.position, msg.argmax, own)
                if msg.argmax:
                    self._argmax_step = (msg.request_id, msg.position)
                return StepDone(msg.request_id, msg.step)
            if isinstance(msg, Verify):
                with self.ordered():
                    self.runner.verify(msg.position, msg.num_tokens, msg.draft_start, msg.tokens, msg.accept)
                # With the acceptance here, answer once it has run, with its result (ipc.messages.Verify).
                accepted = self.runner.wait_accepted() if msg.accept else None
                return StepDone(msg.request_id, msg.step, accepted)
            if isinstance(msg, Handshake):
                self.peer_pid = msg.pid
                self.last_step = ("", 0)  # a JIT context numbers its steps from 1
                return self.ready_message()
            if isinstance(msg, Reset):
                self.busy = False
                return Ok(msg.request_id)
            if isinstance(msg, Status):
                return StatusReply(self.facts())
        except (ValueError, HybridrtError) as e:
            return Error("step_failed", str(e), getattr(msg, "request_id", None))
        return Error("unexpected", f"the executor does not handle {type(msg).__name__}")

    @contextmanager
    def ordered(self, after_jit: bool = True):
        """Order a step after the JIT context's last GPU work (unless `after_jit` is False: it reads nothing the JIT
        context wrote) and publish its completion as an event."""
        if after_jit and self.events and not self.events.jit.query():  # done already: no wait (one costs ~25 us)
            torch.cuda.current_stream().wait_event(self.events.jit)
        yield
        if self.events:
            self.events.executor.record()

    def capture_before_ready(self, max_tokens: int, verify: bool = False) -> None:
        """Capture decode, the prefill graphs up to max_tokens and (`verify`: the JIT context speculates) the verify
        graphs before answering the handshake, with a start-up line each for the kernels' compile (the warm-up runs)
        and the captures; the rest come while idle."""
        if self.graphs is None or max_tokens <= 0:
            return
        names = self.graphs.startup_graphs(max_tokens, verify)
        capture = (self.leader or self.graphs).capture  # a tensor-parallel leader captures on every rank at once
        for name in names:
            self.answer_handshake_early()
            capture(name)
        if self.startup is not None:
            stats = self.graphs.stats
            warmup = sum(stats.warmup_seconds.get(n, 0.0) for n in names)
            self.startup.add("kernel compile and warm-up", warmup)
            self.startup.add(f"graph capture ({len(names)} graphs: decode, prefill and extend up to {max_tokens} tokens"
                             + (", verify" if verify else "") + ")",
                             sum(stats.seconds.get(n, 0.0) for n in names) - warmup)
        self.end_start_up_captures()

    def end_start_up_captures(self) -> None:
        """The start-up captures are done: if the Handshake was answered while they ran, the second Ready (the JIT
        context may send steps now)."""
        if self.answered_early:
            self.reply(self.ready_message())

    def answer_handshake_early(self) -> None:
        """Between start-up captures: answer the JIT context's Handshake as soon as it has come, with a Ready whose
        captures are pending, so that it opens the step buffers and sets itself up (CUDA IPC, its sampler) while we
        capture, instead of after (on the H200 its 0.3-0.4 s after Ready were on the path to ready). It sends no step
        before the second Ready (`capture_before_ready`). Anything else that came (nothing should, before Ready) is
        kept for `serve`."""
        if self.answered_early or self.held is not None or not self.channel.poll(0):
            return
        try:
            msg = self.channel.recv(timeout_ms=0)
        except ProtocolError as e:
            self.reply(Error(e.code, str(e)))
            return
        if isinstance(msg, Handshake):
            self.peer_pid = msg.pid
            self.answered_early = self.reply(self.ready_message(captures_pending=True))
        elif msg is not None:
            self.held = msg

    def capture_when_idle(self) -> None:
        # Not right after a request or the handshake: a burst of requests (a chat's turns, the first requests after
        # ready) would otherwise wait for a capture (~0.1-0.3 s each) between them.
        if self.busy or self.graphs is None or time.monotonic() - self.last_command < CAPTURE_AFTER_IDLE_S:
            return
        start = time.perf_counter()
        name = self.runner.capture_next()
        if name is not None and not self.quiet:
            print(f"graph_executor: captured {name} in {(time.perf_counter() - start) * 1e3:.0f} ms",
                  file=sys.stderr)

    def close(self) -> None:
        self.shared.close()
        if self.doorbell is not None:
            self.doorbell.close()


# the commands that run a step (each but ScorePrompt may be rung, and a Reset)
STEPS = (Prefill, Decode, DecodeBatch, Verify, ScorePrompt)


def _step_key(msg: Message) -> tuple[str, int] | None:
    return (msg.request_id, msg.step) if isinstance(msg, STEPS) else None
