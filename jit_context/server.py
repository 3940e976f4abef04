"""The JIT context's serving loop: client-facing socket, first-come-first-served request queue, streaming of each
token, cancellation, tokenization requests, metrics, and errors that never stop the server. The process around it
(arguments, handshake, signals) is `jit_context.process`.

Requests run on the executor one at a time (`Generator`, with speculative decoding) when it holds one KV slot, and
together (`BatchEngine`: continuous batching, requests join and leave at step boundaries) when it holds several
(`--max-num-seqs`).

One rule: no exception from one request ends the process. Whatever fails while handling a client's frame or
advancing its request becomes an `Error` reply to that request (dropped if its client is gone) and is counted
in the metrics; only the executor's death or a signal ends the loop.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from ipc.client_ports import ClientPorts
from ipc.codec import encode
from ipc.errors import HybridrtError, PeerUnreachableError, ProtocolError
from ipc.liveness import process_alive
from ipc.messages import (
    AUTHENTICATED,
    PROTOCOL_VERSION,
    CancelRequest,
    DetokenizeReply,
    DetokenizeRequest,
    Error,
    Finished,
    FinishReason,
    GenerateRequest,
    Handshake,
    LogprobsChunk,
    PromptLogprobsChunk,
    Ready,
    Started,
    Status,
    StatusReply,
    TokenChunk,
    TokenizeReply,
    TokenizeRequest,
)
from ipc.reply_spin import server_spin_ms
from ipc.startup import StartupPhases
from jit_context.batch import BatchEngine, RequestFailed
from jit_context.generator import (
    CPU_PREFILL_CHUNK,
    Chunk,
    GenerationResult,
    PrefillProgress,
    PrefillSent,
    PromptScores,
)
from jit_context.metrics import FAILED, ServingMetrics
from jit_context.remote_executor import ExecutorDied, RemoteExecutor
from jit_context.request_log import RequestLog
from jit_context.request_side import PromptInput, RequestSide
from jit_context.sampling_params import SamplingParams, quote

MAX_ERROR_CHARS = 1000  # an Error reply's message is cut here (it may quote what a client sent)


def _request_level(e: BaseException) -> bool:
    """Failures that belong to one request. The tokenizers library reports Rust panics as PanicException, a
    BaseException; KeyboardInterrupt, SystemExit and the SIGTERM exception are the process's, not a request's."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"

def _error_code(e: BaseException) -> str:
    """The Error code of a failed generation: a subsystem's error says its own (e.g. executor_timeout); anything
    else failed the generation."""
    code = getattr(e, "code", None) if isinstance(e, HybridrtError) else None
    return code if isinstance(code, str) else "generation_failed"


IDLE_POLL_MS = 50
# A prompt's log-probabilities per PromptLogprobsChunk: 20 top tokens of long texts each stay well inside a frame
PROMPT_ENTRIES_PER_CHUNK = 256
GPU_BATCH_PREFILL_CHUNK = 256  # prompt tokens per step while other requests decode (GPU; the CPU's is its own)
# How long before a batched decode step should end the next one is sent (GPU, a slot free): the send and the
# executor's launch take ~0.1-0.2 ms (bench/NOTES.md, issue 12); the rest of the step is watched for arrivals.
SEND_AHEAD_MARGIN_S = 0.0005


WARM_UP = b""  # the identity of the start-up's own request (`JitServer.warm_up`); ClientPorts never gives an empty one


@dataclass(eq=False)  # compared and hashed by identity: a running request's handle in the batch engine
class Pending:
    identity: bytes
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    received: float  # perf_counter at arrival (read, decoded, checked and queued)
    polled: float = 0.0  # perf_counter when the wait that read its frame returned (ClientPorts.polled_at)
    started: float = 0.0  # perf_counter when it reached the executor's turn
    counted: bool = True  # logged and counted in the metrics (not a start-up request: ours, or a launcher's)
    # it arrived while another request ran or waited: its client may leave before its turn, so it is told Started
    # (which finds that out) before its prefill; one arriving at an idle server is told right after the send
    queued: bool = False
    # perf_counter after each TokenChunk's send (Finished's sent_times_ms)
    sent: list[float] = field(default_factory=list)


class JitServer:
    def __init__(self, clients: ClientPorts, executor: RemoteExecutor, side: RequestSide, ready: Ready,
                 api_key: str | None = None, log: RequestLog | None = None,
                 startup: StartupPhases | None = None, idle_spin_ms: float = 0.0) -> None:
        if not idle_spin_ms >= 0:
            raise ValueError(f"idle_spin_ms must be >= 0, got {idle_spin_ms}")
        self.clients = clients
        self.startup = startup  # this process's start-up phases (status reports them)
        self.log = log  # serve's request and throughput lines on stderr; None: quiet
        self._api_key = api_key.encode() if api_key is not None else None  # None: every client is served
        self.executor = executor
        self.side = side
        self.generator = side.generator
        self.tokenizer = side.tokenizer
        self.ready = ready
        self.queue: deque[Pending] = deque()
        self.active: Pending | None = None  # one slot: the request on the executor
        self.stream = None  # the active request's generator
        self.engine: BatchEngine | None = None  # several slots: the requests on the executor, batched
        if ready.max_num_seqs > 1:
            on_cpu = ready.device == "cpu"
            self.engine = BatchEngine(executor, self.tokenizer, side.eos_token_ids,
                                      CPU_PREFILL_CHUNK if on_cpu else GPU_BATCH_PREFILL_CHUNK,
                                      prefix_reuse=self.generator.kv is not None,
                                      whole_prompt_when_idle=not on_cpu, incoming=self._admit_arrivals,
                                      send_ahead_margin_s=None if on_cpu else SEND_AHEAD_MARGIN_S,
                                      grammars=side.grammars)
        self.running: list[Pending] = []  # the engine's requests, in admission order
        self._batches = 0  # busy periods of the engine (each is one request id on the executor)
        self._executor_facts_cache = ready.facts
        self.metrics = ServingMetrics()
        self._spin_ms = server_spin_ms(ready.device)  # what each Started tells its client (ipc.reply_spin)
        # After its last request the loop polls its clients without sleeping this long (off by default until a card
        # measures it: bench/NOTES.md, 43rd session): a request that comes meanwhile is read without a thread wake-up
        # (an AF_UNIX hop to a sleeping reader 51 us P50 on the H200 host, 8 us to a spinning one, 18th session), as
        # the executor watches its doorbell for 20 ms after a step (graph_executor.server.SPIN_US).
        self._idle_spin_s = idle_spin_ms / 1e3
        self._busy_at = -float("inf")  # perf_counter of the last turn with a request running or queued
        self.idle_spinning = False  # the last turn polled without sleeping though nothing was running

    def executor_ready(self, ready: Ready) -> None:
        """The executor's second Ready (its start-up captures done): its facts replace the first's."""
        self.ready = ready
        self._executor_facts_cache = ready.facts

    def warm_up(self) -> None:
        """One short request per KV slot through the whole request path before the first client's: the chat template
        and tokenizer, the queue, the executor's steps (prefill and decode graphs, IPC events, doorbell), sampling,
        detokenization and each reply's encoding (never sent: its identity is `WARM_UP`), and the end of a request
        (not logged, not counted). What runs for the first time in this process is paid here, not in a user's TTFT:
        on the CPU machine the first chat's TTFT in this process was 13-20 ms against 5-8 ms for the next ones. With
        several slots they arrive together, so the batched paths run too (mixed steps, batched decodes and draws of
        several rows) and every slot has served once."""
        short = [i % self.ready.vocab_size for i in range(1, min(9, self.ready.max_context - 3))]  # repeat nothing
        ids = short
        if self.tokenizer is not None and self.tokenizer.has_chat_template:
            try:
                ids = self.side.prompt_ids(PromptInput(messages=[{"role": "user", "content": "Hi"}]))
                (self.engine or self.generator).check_prompt(ids + [0] * 3)
            except (ValueError, HybridrtError):  # a template that wants more, or a context too short for the chat
                ids = short
        if not ids:
            return  # a context of a few tokens: nothing worth warming
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        for _ in range(self.engine.capacity if self.engine is not None else 1):
            self.queue.append(Pending(WARM_UP, "warm-up", ids, params, time.perf_counter(), counted=False))
        while self.queue or self.num_running():
            self._step()  # no client is answered meanwhile: a status reply would tell the launcher "ready" too soon

    def run(self) -> None:
        while True:
            if not self.turn(IDLE_POLL_MS) and not self.idle_spinning \
                    and not process_alive(self.executor.executor_pid):  # (a /proc read: not on every spin)
                raise ExecutorDied("the graph executor process died")

    def num_running(self) -> int:
        return len(self.running) if self.engine is not None else int(self.active is not None)

    def turn(self, idle_wait_ms: int) -> bool:
        """One pass of the loop: answer clients (waiting up to idle_wait_ms when there is nothing to do), start
        queued requests where there is room, advance the running ones by one step. True if a request advanced."""
        busy = self.num_running() > 0 or bool(self.queue)
        now = time.perf_counter()
        if busy:
            self._busy_at = now
        self.idle_spinning = not busy and now - self._busy_at < self._idle_spin_s
        self._drain_clients(0 if busy or self.idle_spinning else idle_wait_ms)
        if self.log is not None:
            self.log.tick(self.num_running(), len(self.queue))
        return self._step()

    def _step(self) -> bool:
        """Start queued requests where there is room, advance the running ones by one step."""
        if self.engine is not None:
            return self._turn_batched()
        if self.active is None and self.queue:
            self._start(self.queue.popleft())
        if self.active is None:
            return False
        self._advance()
        return True

    # -- client messages ----------------------------------------------------------------------------------

    def _drain_clients(self, timeout_ms: int) -> None:
        while (got := self.clients.recv_from(timeout_ms=timeout_ms)) is not None:
            timeout_ms = 0
            identity, msg = got
            try:
                self._handle_client(identity, msg)
            except ExecutorDied:
                raise
            except BaseException as e:
                if not _request_level(e):
                    raise
                print(f"jit_context: {type(msg).__name__} failed: {type(e).__name__}: {quote(str(e))}",
                      file=sys.stderr)
                self._reply(identity, Error("internal_error", f"{type(e).__name__}: {e}",
                                            getattr(msg, "request_id", None)))

    def _handle_client(self, identity: bytes, msg) -> None:
        if isinstance(msg, ProtocolError):
            self._reply(identity, Error(msg.code, msg.detail))
        elif type(msg) in AUTHENTICATED and not self._authorized(msg):
            self._reply(identity, Error("unauthorized", "missing or incorrect API key (the server runs with "
                                        "--api-key: pass --api-key or set HYBRIDRT_API_KEY)",
                                        getattr(msg, "request_id", None)))
        elif isinstance(msg, GenerateRequest):
            if self.num_running() == 0:  # else the executor is mid-request and listening
                self.executor.wake_early()
            self._enqueue(identity, msg)
        elif isinstance(msg, CancelRequest):
            self._cancel(identity, msg.request_id)
        elif isinstance(msg, Status):
            self._reply(identity, StatusReply(self.status()))
        elif isinstance(msg, (TokenizeRequest, DetokenizeRequest)):
            self._reply(identity, self._tokenize(msg))  # cheap: answered now, even mid-generation
        elif isinstance(msg, Handshake):
            self._reply(identity, Handshake(PROTOCOL_VERSION, "jit_context", os.getpid()))
        else:
            self._reply(identity, Error("unexpected", f"clients may not send {type(msg).__name__}"))

    def _authorized(self, msg) -> bool:
        if self._api_key is None:
            return True
        given = (msg.api_key or "").encode("utf-8", "surrogateescape")
        return secrets.compare_digest(given, self._api_key)

    def status(self) -> dict:
        running = self._active_ids()
        return {"ready": True, "model": self.ready.model_name, "max_context": self.ready.max_context,
                "device": self.ready.device, "dtype": self.ready.dtype, "queued": len(self.queue),
                "tokenizer": self.tokenizer is not None,
                "chat_template": bool(self.tokenizer and self.tokenizer.has_chat_template),
                "tool_call_format": self.tokenizer.tool_call_format if self.tokenizer else None,
                "active": running[0] if running else None, "running": running,
                "max_num_seqs": self.ready.max_num_seqs, "executor": self._executor_facts(),
                "jit_context_pid": os.getpid(), "local_stream": self.clients.local_path,
                "startup": self.startup.facts() if self.startup is not None else {},
                "metrics": self.metrics.snapshot(running=self.num_running(), waiting=len(self.queue))}

    def _active_ids(self) -> list[str]:
        return [p.request_id for p in self.running] if self.engine is not None else \
            [self.active.request_id] if self.active else []

    def _executor_facts(self) -> dict:
        """Live facts (captured graphs, memory) when the executor is idle; the ready-time ones mid-request,
        where a status round trip would interleave with the steps."""
        if self.num_running() == 0:
            self._executor_facts_cache = self.executor.status()
        return self._executor_facts_cache

    def _enqueue(self, identity: bytes, msg: GenerateRequest) -> None:
        try:
            params = SamplingParams.from_dict(msg.params)
            params.check_vocabulary(self.side.vocab_size)  # here, as the prompt's ids: an Error before it queues
            self.side.check_structured(params)
            ids = self.side.prompt_ids(PromptInput(msg.prompt, msg.messages, msg.token_ids, use_chat_template=False,
                                                     chat=msg.chat))
            (self.engine or self.generator).check_prompt(ids)
        except (ValueError, TypeError, HybridrtError) as e:
            self._reply(identity, Error("invalid_request", str(e), msg.request_id))
            return
        queued = self.num_running() > 0 or bool(self.queue)
        self.queue.append(Pending(identity, msg.request_id, ids, params, time.perf_counter(), self.clients.polled_at,
                                  counted=not msg.warm_up, queued=queued))

    def _tokenize(self, msg: TokenizeRequest | DetokenizeRequest):
        try:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer")
            if isinstance(msg, DetokenizeRequest):
                self.side.check_token_ids(msg.token_ids)
                return DetokenizeReply(msg.request_id, self.tokenizer.decode(msg.token_ids, skip_special_tokens=False))
            if msg.messages is not None:
                ids = self.tokenizer.apply_chat_template(msg.messages, msg.add_generation_prompt, tools=msg.tools)
            else:
                ids = self.tokenizer.encode(msg.prompt)
            return TokenizeReply(msg.request_id, ids, self.ready.max_context)
        except (ValueError, TypeError) as e:
            return Error("invalid_request", str(e), msg.request_id)

    def _cancel(self, identity: bytes, request_id: str) -> None:
        if self.active is not None and self.active.request_id == request_id and self.active.identity == identity:
            self._finish_abort("cancelled by the client")
            return
        for pending in list(self.running):
            if pending.request_id == request_id and pending.identity == identity:
                self._abort_running(pending, "cancelled by the client")
                return
        for pending in list(self.queue):
            if pending.request_id == request_id and pending.identity == identity:
                self.queue.remove(pending)
                self._reply(identity, Finished(request_id, "", [], FinishReason.ABORT, {}, {}))
                if pending.counted:
                    self.metrics.record(FinishReason.ABORT, len(pending.prompt_ids), [],
                                        time.perf_counter() - pending.received)

    def _reply(self, identity: bytes, msg) -> bool:
        """Send to one client; False if it is gone. A reply too big for a frame becomes an `oversized` error."""
        if identity == WARM_UP:
            encode(msg)  # the encoding runs as for a client; nobody to send it to
            return True
        if isinstance(msg, Error):
            self.metrics.record_error(msg.code)
            if len(msg.message) > MAX_ERROR_CHARS:
                msg = Error(msg.code, msg.message[:MAX_ERROR_CHARS] + "...", msg.request_id)
        try:
            self.clients.send_to(identity, msg)
            return True
        except PeerUnreachableError:
            return False
        except (ProtocolError, ValueError) as e:  # too large for a frame, or not encodable (e.g. an int > 64 bits)
            if isinstance(msg, Error) and msg.code in ("oversized", "internal_error"):
                return False  # the replacement failed too: give up on this reply rather than loop
            code = "oversized" if isinstance(e, ProtocolError) else "internal_error"
            return self._reply(identity, Error(code, f"the reply cannot be sent: {quote(str(e))}",
                                               getattr(msg, "request_id", None)))

    # -- the active request -------------------------------------------------------------------------------

    def _announce(self, pending: Pending) -> bool:
        """Tell the client its request reaches the executor now; False (counted as aborted) if the client left while
        it waited: nobody to answer, so no prefill for it."""
        pending.started = time.perf_counter()
        if self._send_started(pending):
            return True
        if pending.counted:
            self.metrics.record(FinishReason.ABORT, len(pending.prompt_ids), [], pending.started - pending.received)
        return False

    def _send_started(self, pending: Pending) -> bool:
        queue_ms = round((pending.started - pending.received) * 1e3, 3)
        return self._reply(pending.identity, Started(pending.request_id, queue_ms, self._spin_ms))

    def _start(self, pending: Pending) -> None:
        """A queued request is told Started first (and dropped if its client left); one that found the server idle
        is told right after its prefill is sent (`PrefillSent`): the message's encode and send are then not on the
        way to the executor (~0.03-0.09 ms on the CPU machine)."""
        if pending.queued:
            if not self._announce(pending):
                return
        else:
            pending.started = time.perf_counter()
        self.active = pending
        self.executor.request_id = pending.request_id
        self.stream = self.generator.generate(pending.prompt_ids, pending.params, start_time=pending.received,
                                              yield_during_prefill=True, yield_when_sent=not pending.queued)

    def _advance(self) -> None:
        active = self.active
        try:
            item = next(self.stream)
        except ExecutorDied:
            self.fail_everyone("executor_died", "the graph executor process died")
            raise
        except BaseException as e:
            if not _request_level(e):
                raise
            if not isinstance(e, (ValueError, HybridrtError)):
                print(f"jit_context: request {active.request_id} failed: {type(e).__name__}: {quote(str(e))}",
                      file=sys.stderr)
            self._end(Error(_error_code(e), str(e), active.request_id))
            return
        if isinstance(item, PrefillProgress):
            return  # a long prompt between two prefill chunks: the loop answers other clients now
        if isinstance(item, PrefillSent):
            if not self._send_started(active):
                self._finish_abort("client went away")
            return
        if isinstance(item, GenerationResult):
            self._end(self._finished(active, item))
        elif not self._stream(active, item):
            self._finish_abort("client went away")  # nobody to stream to: free the executor

    def _stream(self, pending: Pending, item: Chunk | PromptScores) -> bool:
        """Send a generated chunk to its client, stamp its send and count its tokens (or a prompt's log-probabilities,
        in frames of at most PROMPT_ENTRIES_PER_CHUNK entries); False if the client is gone."""
        if isinstance(item, PromptScores):
            entries = item.logprobs
            return all(self._reply(pending.identity, PromptLogprobsChunk(
                pending.request_id, "", [], item.start + i, entries[i:i + PROMPT_ENTRIES_PER_CHUNK],
                item.first_text if i == 0 else None))
                for i in range(0, max(len(entries), 1), PROMPT_ENTRIES_PER_CHUNK))
        chunk = TokenChunk(pending.request_id, item.text, item.token_ids) if item.logprobs is None else \
            LogprobsChunk(pending.request_id, item.text, item.token_ids, item.logprobs)
        if not self._reply(pending.identity, chunk):
            return False
        if item.token_ids:  # a detokenizer's tail carries none: one stamp per token_times_ms entry
            pending.sent.append(time.perf_counter())
        if self.log is not None and pending.counted:
            self.log.streamed(len(item.token_ids))
        return True

    def _finished(self, active: Pending, result: GenerationResult) -> Finished:
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        timings = {"ttft_ms": round(result.ttft_ms, 3), "tokens_per_s": round(result.tokens_per_s, 3),
                   "queue_ms": round((active.started - active.received) * 1e3, 3),
                   "prefill_enqueued_ms": round(result.prefill_enqueued_ms, 3),
                   "prefill_sent_ms": round(result.prefill_sent_ms, 3),  # (batch-1) the last chunk's send
                   "token_times_ms": [round(t, 3) for t in result.token_times_ms],
                   # each TokenChunk's send, same origin: token_times_ms to sent_times_ms is the JIT context's own
                   # work on a token (detokenize, stop strings, encode, the ZeroMQ send), the rest of a client's
                   # gap is the hop (bench.probes.client_spin splits them)
                   "sent_times_ms": [round((t - active.received) * 1e3, 3) for t in active.sent],
                   # its arrival on this process's perf_counter: CLOCK_MONOTONIC on Linux, one clock for every
                   # process of the machine, so a client beside it can tell the request's way in from the rest
                   "received_at_s": round(active.received, 6),
                   # when the wait that read its frame returned: the way in splits there into the client's send and
                   # this process's wake-up, then its own read, decode and checks up to received_at_s
                   "polled_at_s": round(active.polled, 6)}
        if result.cached_tokens:
            timings["cached_prompt_tokens"] = result.cached_tokens  # prompt tokens not prefilled (prefix reuse)
        if result.speculation is not None:
            timings["speculation"] = result.speculation
        return Finished(active.request_id, result.text, result.token_ids, result.finish_reason, usage, timings)

    def _finish_abort(self, reason: str) -> None:
        self.stream.close()
        self._end(Finished(self.active.request_id, "", [], FinishReason.ABORT, {}, {"reason": reason}))

    def _end(self, msg: Finished | Error) -> None:
        self._report_end(self.active, msg)
        self.active, self.stream = None, None
        self._finish_on_executor()

    def _report_end(self, pending: Pending, msg: Finished | Error) -> None:
        """Send a request's last message; log and count it (not the start-up's own request)."""
        self._reply(pending.identity, msg)
        if not pending.counted:
            return
        if self.log is not None and isinstance(msg, Finished):
            self.log.finished(msg.request_id, msg.finish_reason, msg.usage.get("prompt_tokens", 0),
                              msg.usage.get("completion_tokens", 0), msg.timings.get("ttft_ms", 0.0),
                              msg.timings.get("tokens_per_s", 0.0), msg.timings.get("cached_prompt_tokens", 0))
        elif self.log is not None:
            self.log.failed(msg.request_id, msg.code)
        if isinstance(msg, Finished):
            self.metrics.record(msg.finish_reason, msg.usage.get("prompt_tokens", len(pending.prompt_ids)),
                                msg.timings.get("token_times_ms", []), time.perf_counter() - pending.received,
                                msg.timings.get("speculation"), msg.timings.get("cached_prompt_tokens", 0))
        else:
            self.metrics.record(FAILED, len(pending.prompt_ids), [], time.perf_counter() - pending.received)

    def _finish_on_executor(self) -> None:
        """The executor's request (one request, or one busy period of the batch engine) is over."""
        try:
            self.executor.finish_request()
        except ExecutorDied:
            raise
        except HybridrtError as e:  # e.g. the executor refused a step of the request just ended
            print(f"jit_context: ending a request: {quote(str(e))}", file=sys.stderr)

    # -- the running requests, batched (several KV slots) -------------------------------------------------

    def _admit_arrivals(self, timeout_s: float) -> None:
        """The batch engine's hook before it sends a step ahead with a slot free: answer the clients' messages and
        admit the requests that wait while there is room, watching for arrivals up to timeout_s (its send-ahead
        window). Admitted here, a request's first prompt chunk rides that step (and its tokenization and admission
        overlap the step in flight)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            if self.clients.poll(0):
                self._drain_clients(0)
            admitted = self._admit_queued()
            left = deadline - time.perf_counter()
            if admitted or left <= 0 or not self.engine.has_room():
                return
            time.sleep(min(left, 0.0002))

    def _admit_queued(self) -> bool:
        """Admit queued requests, oldest first, while a slot is free; whether any was taken off the queue."""
        taken = False
        while self.queue and self.engine.has_room():
            self._admit(self.queue.popleft())
            taken = True
        return taken

    def _turn_batched(self) -> bool:
        self._admit_queued()
        if not self.running:
            return False
        try:
            events = self.engine.step()
        except ExecutorDied:
            self.fail_everyone("executor_died", "the graph executor process died")
            raise
        except BaseException as e:
            if not _request_level(e):
                raise
            self._fail_running(e)
            return True
        gone: set[int] = set()  # requests ended while this step's items are delivered
        for pending, item in events:
            if id(pending) in gone or isinstance(item, PrefillProgress):
                continue  # a prefill chunk of a long prompt: nothing to tell its client yet
            if isinstance(item, GenerationResult):
                self.running.remove(pending)
                self._report_end(pending, self._finished(pending, item))
                gone.add(id(pending))
            elif isinstance(item, RequestFailed):
                self.running.remove(pending)
                self._report_end(pending, Error("generation_failed", item.message, pending.request_id))
                gone.add(id(pending))
            elif not self._stream(pending, item):
                self._abort_running(pending, "client went away")  # nobody to stream to: free its slot
                gone.add(id(pending))
        if not self.running:
            self._finish_on_executor()
        return True

    def _admit(self, pending: Pending) -> None:
        if not self._announce(pending):
            return
        if not self.running:  # a new busy period: one request id on the executor for its steps
            self._batches += 1
            self.executor.request_id = f"batch-{self._batches}"
        try:
            self.engine.admit(pending, pending.prompt_ids, pending.params, start_time=pending.received)
        except (ValueError, HybridrtError) as e:  # this request's own (e.g. its grammar's matcher): it alone fails
            self._report_end(pending, Error("invalid_request", str(e), pending.request_id))
            if not self.running:
                self._finish_on_executor()
            return
        self.running.append(pending)

    def _abort_running(self, pending: Pending, reason: str) -> None:
        self.engine.cancel(pending)
        self.running.remove(pending)
        self._report_end(pending, Finished(pending.request_id, "", [], FinishReason.ABORT, {}, {"reason": reason}))
        if not self.running:
            self._finish_on_executor()

    def _fail_running(self, e: BaseException) -> None:
        """A batched step failed: every request in it fails (what their slots hold is unknown)."""
        print(f"jit_context: a batched step failed: {type(e).__name__}: {quote(str(e))}", file=sys.stderr)
        self.engine.abort_all()
        failed, self.running = self.running, []
        for pending in failed:
            self._report_end(pending, Error(_error_code(e), str(e), pending.request_id))
        self._finish_on_executor()

    def fail_everyone(self, code: str, message: str) -> None:
        """Answer the running and every queued request with an `Error` (the process is about to exit)."""
        waiting = ([self.active] if self.active else []) + self.running + list(self.queue)
        for pending in waiting:
            self._reply(pending.identity, Error(code, message, pending.request_id))
        self.active, self.stream = None, None
        if self.engine is not None:
            self.engine.abort_all()
        self.running = []
        self.queue.clear()
