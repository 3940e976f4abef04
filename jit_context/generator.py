"""The per-request generation loop of the JIT context: prefill, sample, decode, stop, detokenize, stream.

It drives an executor through `ExecutorPort` (the in-process `ModelRunner`, or the IPC proxy of the
two-process runtime) and only touches the executor's shared step buffers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from ipc.errors import HybridrtError
from ipc.messages import MAX_SCORED_ROWS, FinishReason, TokenLogprob
from ipc.step_buffers import StepBuffers
from jit_context.acceptance import warm_up
from jit_context.detokenizer import IncrementalDetokenizer, StopStringMatcher
from jit_context.grammar_mask import Constraint, Grammars, make_constraint
from jit_context.kv_contents import KvContents
from jit_context.sampler import Sampler
from jit_context.sampler import warm_up as warm_up_sampling
from jit_context.sampling_params import SamplingParams
from jit_context.speculative import SpeculativeLoop
from jit_context.speculative_config import SpeculativeConfig
from jit_context.token_reader import RING, TokenReader


class ExecutorPort(Protocol):
    """What the generation loop needs of an executor: its step buffers, and steps it can enqueue."""

    buffers: StepBuffers
    max_context: int

    def prefill(self, num_tokens: int, start_pos: int = 0) -> None: ...

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """A prefill that also scores its first `scored` rows (`ipc.messages.ScorePrompt`); returns once it has run,
        with the values. Only requests with `SamplingParams.prompt_logprobs` call it."""

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        """`argmax`: the executor takes the greedy token after the step (`ipc.messages.Decode`), into next_token
        and `buffers.ring_slot(position)`; `own_input`: the input token is its own from the step before."""

    def verify(self, position: int, num_tokens: int, draft_start: int | None = None, tokens: list[int] | None = None,
               accept: bool = False) -> None:
        """num_tokens at `position` (the last token, then proposals); draft_start: an executor's draft model
        writes the proposals first (graph_executor.draft); tokens: the executor writes these ids there first;
        accept: the executor also runs the greedy acceptance (read with `wait_accepted`). Only speculating
        requests call it."""

    def wait_enqueued(self) -> None: ...

    def wait_accepted(self) -> list[int]:
        """After a verify with `accept`: [T] argmax tokens, then the count of proposals kept (the step has run)."""


class Detokenizing(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them


@dataclass(frozen=True)
class PrefillProgress:
    """Yielded between prefill chunks (only when `generate(..., yield_during_prefill=True)`), so the caller can
    answer other clients while a long prompt prefills."""

    done: int  # prompt tokens prefilled so far
    total: int


@dataclass(frozen=True)
class PromptScores:
    """The prompt's log-probabilities of positions [start, start + len(logprobs)) (`SamplingParams.prompt_logprobs`),
    yielded as each scoring step returns, before the first token."""

    start: int
    logprobs: list[TokenLogprob]
    first_text: str | None = None  # (start 1) the prompt's first token decoded alone ("" without a tokenizer)


@dataclass(frozen=True)
class PrefillSent:
    """Yielded once the prompt's last prefill chunk is sent (only when `generate(..., yield_when_sent=True)`), so the
    caller can tell its client the request started without delaying the send."""


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # FinishReason.STOP or .LENGTH
    prompt_tokens: int
    ttft_ms: float
    tokens_per_s: float
    token_times_ms: list[float] = field(default_factory=list)  # per token, from the request start
    prefill_enqueued_ms: float = 0.0  # when the executor had the prefill queued, from the request start
    speculation: dict | None = None  # SpecStats.as_dict() when the request speculated
    cached_tokens: int = 0  # leading prompt tokens whose K/V the cache held from the last request (not prefilled)
    prefill_sent_ms: float = 0.0  # when the last prefill chunk was sent to the executor, from the request start
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    # one per prompt token, None first (SamplingParams.prompt_logprobs; None when not asked for)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def check_prompt(prompt_ids: list[int], max_context: int) -> None:
    """ValueError unless the prompt leaves room in the context for at least one generated token."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= max_context:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; the maximum context is {max_context} "
            f"(prompt plus at least one generated token)"
        )


def end_ids(params: SamplingParams, eos_token_ids: frozenset[int]) -> set[int]:
    """The tokens that end a reply of these params (what min_tokens holds off)."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))


# Prompt tokens per Prefill on the CPU, where a step computes before it returns: the JIT context answers other
# clients between chunks, so they wait at most one chunk. None on a GPU (the executor only enqueues there).
CPU_PREFILL_CHUNK = 256
# Decode steps queued when the host waits for a token (Generator's decode_ahead). On a GPU "auto": 2 while the
# steps are short (the executor's token period under SHORT_STEP_MS), else 1. Measured on an H200 (bench/NOTES.md,
# 39th session): SmolLM2-135M through two processes 2,253-2,313 -> 2,382-2,397 tokens/s with 2 (its 0.4 ms step is
# shorter than the host's way around one token: wake-up, the token to the client, the next command's hop, the
# graph launch, ~0.2-0.5 ms); a 7B step (3.7 ms) leaves the host time enough with 1, and 2 would cost one more
# discarded step (3.7 ms of the card's time, ahead of the next request's prefill) after every stop.
AUTO = "auto"
SHORT_STEP_MS = 1.0
DECODE_AHEAD_SHORT = 2
STEP_EMA = 0.25  # weight of the newest token gap in the token period's moving average


def default_decode_ahead(device: torch.device) -> int | str:
    """AUTO on a GPU; 1 on the CPU, where a discarded step after a stop costs a whole step's compute."""
    return AUTO if device.type == "cuda" else 1


def ahead_for(step_ms: float | None) -> int:
    """AUTO's choice: DECODE_AHEAD_SHORT once the token period is known to be under SHORT_STEP_MS, else 1."""
    return DECODE_AHEAD_SHORT if step_ms is not None and step_ms < SHORT_STEP_MS else 1


# Whether the executor takes a plain greedy request's tokens itself (Generator's executor_argmax), on a GPU.
# Measured (H200, 40th session, bench decode on dummy:smollm2-135m, three alternating rounds in one call;
# bench/NOTES.md): two processes 2,364 / 2,365 / 2,361 -> 2,403 / 2,404 / 2,402 tokens/s (+1.7%), P50 0.42 ms
# either way; the executor alone (which this does not touch) 2,368-2,506 across the same rounds.
EXECUTOR_ARGMAX_GPU = True


def default_executor_argmax(device: torch.device) -> bool:
    """EXECUTOR_ARGMAX_GPU on a GPU; off on the CPU (nothing measured there either)."""
    return EXECUTOR_ARGMAX_GPU and device.type == "cuda"


class Generator:
    """One request at a time over one executor."""

    def __init__(self, port: ExecutorPort, tokenizer: Detokenizing | None, eos_token_ids: frozenset[int],
                 prefill_chunk: int | None = None, speculation: SpeculativeConfig | None = None,
                 prefix_reuse: bool = False, decode_ahead: int | str | None = None,
                 executor_argmax: bool | None = None, grammars: Grammars | None = None):
        """`prefix_reuse`: a prompt that starts with the tokens the KV cache holds from the last request prefills
        only the rest (`KvContents`). Only where the executor's steps write nothing but the request's own
        positions: the CPU path (on a GPU, graph captures while idle run warm-up steps over the cache, and the
        prefill graphs start at position 0), without a draft model (whose own cache is not tracked).
        `decode_ahead`: decode steps the plain loop keeps enqueued when the host waits for a token (1: it reads
        token k once the decode that consumes token k is queued; 2: once the one after it is queued too, so a
        token's host work (the wait, the token's way to the client, the next command's hop and the executor's
        launch) may take up to two steps' time before the device idles; after a stop that many steps are
        discarded); AUTO: 2 while the token period (a moving average over the plain steps' token gaps, kept across
        requests) is under SHORT_STEP_MS, else 1 (`ahead_for`). None: `default_decode_ahead` of the device. The
        speculative loop's plain steps take it too.
        `executor_argmax`: in the plain loop and the speculative loop's plain steps, a plain greedy request's tokens
        after the first (and after each verify step) are taken by the executor after each decode (`Decode.argmax`)
        and copied out of the step buffers' token ring, so that on a GPU no sampling of ours sits between two steps
        and the executor waits for nothing of ours (`own_input`).
        None: `default_executor_argmax` of the device.
        `grammars`: the tokenizer's view for structured output (`SamplingParams.structured`; None: none is taken). A
        request with one runs without speculation, and the host reads each token before the next draw is queued
        (its mask depends on it) while the decode that consumes it runs: one step queued ahead, not decode_ahead."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        device = port.buffers.input_ids.device
        on_gpu = device.type == "cuda"
        if decode_ahead is not None and decode_ahead != AUTO and not (
                isinstance(decode_ahead, int) and 1 <= decode_ahead <= RING - 1):
            raise ValueError(f"decode_ahead must be 1..{RING - 1} (the token reader's ring), {AUTO!r} or None, got "
                             f"{decode_ahead!r}")
        self.decode_ahead = default_decode_ahead(device) if decode_ahead is None else decode_ahead
        self.step_ms: float | None = None  # the plain steps' token period (AUTO), a moving average
        self._last_pop: float | None = None  # when the host read the last token of a run of plain steps
        self.executor_argmax = default_executor_argmax(device) if executor_argmax is None else executor_argmax
        self.prefill_chunk = prefill_chunk
        self.kv = KvContents(port.max_context) if prefix_reuse else None
        self.speculation = (speculation or SpeculativeConfig()).for_device(port.buffers.logits.device.type)
        if self.speculation.enabled:
            warm_up(port.buffers.logits.shape[0], port.buffers.logits.device)
        self.port = port
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.token_texts: dict[int, str] = {}  # tokens decoded alone (logprobs), for every request
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler(port.buffers.logits.shape[0], port.buffers.logits.device)
        warm_up_sampling(port.buffers.logits)  # the first request's sampling kernels load now, not in its TTFT
        self.reader = TokenReader(port.buffers.logits.device)  # pinned memory and events, made once
        self._staging = torch.empty(port.max_context, dtype=torch.int64, pin_memory=True) if on_gpu else None
        # the ids go in through numpy views (host memory: the pinned staging on a GPU, the buffer itself on the CPU):
        # one assignment from the list, not a tensor built from it and copied (~3 against ~17 us warm, on the way
        # to the prefill)
        self._ids_host = (self._staging if on_gpu else port.buffers.input_ids).numpy()

    def ahead(self) -> int:
        """The decode steps to keep queued now (decode_ahead, or AUTO's choice from the token period)."""
        return ahead_for(self.step_ms) if self.decode_ahead == AUTO else self.decode_ahead

    def takes_executor_argmax(self) -> bool:
        """Whether the executor takes the started request's plain decode tokens (`executor_argmax`): a plain greedy
        draw is the argmax of the raw logits, which the executor takes after each decode (Decode.argmax)."""
        return self.executor_argmax and self.sampler.plain_greedy and not self.sampler.banning

    def read_token(self, follows: bool) -> int:
        """The oldest token in flight (TokenReader.pop); `follows`: it is the next of a run of plain decode steps,
        so the time since the last one read is a token period (AUTO's measure)."""
        value = self.reader.pop()
        now = time.perf_counter()
        if follows and self._last_pop is not None:
            gap_ms = (now - self._last_pop) * 1e3
            self.step_ms = gap_ms if self.step_ms is None else self.step_ms + STEP_EMA * (gap_ms - self.step_ms)
        self._last_pop = now
        return value

    def write_ids(self, ids: list[int], start: int = 0) -> None:
        """Token ids into the executor's input buffer at [start, start + len(ids)); on a GPU through pinned
        memory, so the copy is a plain asynchronous DMA on our stream (the IPC event recorded next orders it
        before the step). A staging slot is reused only by a later step, after the host has synchronised with
        this one (the plain loop writes only the prompt; the speculative loop reads each verify's result)."""
        end = start + len(ids)
        self._ids_host[start:end] = ids
        if self._staging is not None:
            self.port.buffers.input_ids[start:end].copy_(self._staging[start:end], non_blocking=True)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        check_prompt(prompt_ids, self.port.max_context)

    def constraint(self, params: SamplingParams) -> Constraint | None:
        """A request's structured output matcher and first mask (None without one). ValueError for a bad spec or
        when this generator takes none (no tokenizer)."""
        return make_constraint(self.grammars, params, self.port.buffers.logits.device)

    def generate(self, prompt_ids: list[int], params: SamplingParams, start_time: float | None = None,
                 yield_during_prefill: bool = False,
                 yield_when_sent: bool = False,
                 ) -> Iterator[Chunk | PrefillProgress | PrefillSent | PromptScores | GenerationResult]:
        """Yield one Chunk per generated token (its text may be empty while held back), then a GenerationResult;
        with `yield_during_prefill`, also a PrefillProgress after each prefill chunk but the last; with
        `yield_when_sent`, a PrefillSent right after the last one is sent (a scored prompt's: before its first scoring
        step); with `SamplingParams.prompt_logprobs`, a PromptScores per scoring step (steps of `prefill_chunk` or
        MAX_SCORED_ROWS rows) before the first token.

        The host reads token k (TokenReader, an asynchronous copy) only after the decode that consumes it is
        enqueued (and the next `decode_ahead` - 1 decodes), so the device never waits for the host; after a stop the
        steps in flight are discarded."""
        start = time.perf_counter() if start_time is None else start_time
        self.check_prompt(prompt_ids)
        n = len(prompt_ids)
        buffers = self.port.buffers
        scoring = params.prompt_logprobs is not None
        cached = 0
        if self.kv is not None:
            cached = 0 if scoring else self.kv.reusable(prompt_ids)  # a scored prompt runs from its first token
            self.kv.forget()  # until this request ends normally
        self.write_ids(prompt_ids[cached:], cached)
        out = None  # (a plain request's is made after its prefill is sent: not on the way to the executor)
        if scoring:
            out = self._output(params, prompt_ids, start)
            if yield_when_sent:  # (its client is told before its scoring steps, which return once they have run)
                yield PrefillSent()
            # each step's entries as it returns (the caller answers other clients in between)
            step = min(self.prefill_chunk or MAX_SCORED_ROWS, MAX_SCORED_ROWS)
            for chunk_start in range(0, n, step):
                item = score_step(self.port, out, prompt_ids, 0, params.prompt_logprobs, chunk_start,
                                  min(step, n - chunk_start))
                if item is not None:
                    yield item
        else:
            chunk = self.prefill_chunk or n
            for chunk_start in range(cached, n - chunk, chunk):  # every chunk but the last
                self.port.prefill(chunk, chunk_start)
                self.port.wait_enqueued()
                if yield_during_prefill:
                    yield PrefillProgress(chunk_start + chunk, n)
            last_start = cached + (n - 1 - cached) // chunk * chunk
            self.port.prefill(n - last_start, last_start)  # its logits are the first token's
        sent_ms = (time.perf_counter() - start) * 1e3
        if yield_when_sent and not scoring:
            yield PrefillSent()
        # overlaps with the executor launching the prefill (and so does the first mask of a structured output)
        self.sampler.start_request(params, prompt_ids, end_ids=end_ids(params, self.eos_token_ids),
                                   constraint=self.constraint(params))
        if out is None:
            out = self._output(params, prompt_ids, start)
        out.cached_tokens = cached
        out.prefill_sent_ms = sent_ms
        # (a verify step's rows carry no logprobs, and a structured output's mask is known one token ahead only)
        if self.speculation.enabled and params.logprobs is None and params.structured is None:
            loop = SpeculativeLoop(self, self.speculation, out, prompt_ids)
            yield from loop.run(start)
            out.speculation = loop.stats.as_dict()
            yield from self._finish(out, prompt_ids)
            return
        reader = self.reader
        reader.reset()
        executor_argmax = self.takes_executor_argmax()
        for k in itertools.count():
            self.port.wait_enqueued()  # the step's logits are ordered before our sampling
            if k == 0:
                out.prefill_enqueued_ms = (time.perf_counter() - start) * 1e3
            if k and executor_argmax:  # the executor took token k after the decode at n + k - 1: copy it out
                reader.push(buffers.ring_slot(n + k - 1))
            else:
                host = reader.next_host()  # the token's pinned slot: the sampling writes it there too (GPU)
                token = self.sampler.sample(buffers.logits, out=buffers.token, host=host)  # [1], on the device
                self.sampler.observe(token)
                reader.push(token, written=host is not None,
                            extra=None if params.logprobs is None else self.sampler.last_logprobs)
            last = k + 1 >= params.max_tokens or n + k + 1 >= self.port.max_context
            if not last:  # consumes next_token; enqueued before the host waits for a token
                self.port.decode(n + k, argmax=executor_argmax, own_input=executor_argmax and k > 0)
            # The first token at once (TTFT), the last ones at the end; in between the host reads the token
            # `decode_ahead` - 1 steps back, so that many more steps stay queued while it waits, streams and sends.
            # A structured output's next draw needs this token on the host first (its mask).
            keep = 0 if k == 0 or last or self.sampler.constrained else self.ahead() - 1
            while reader.in_flight > keep and not out.finish:
                token_id = self.read_token(follows=k > 0)
                chunk = out.add(token_id, reader.popped_extra)
                if not out.finish:
                    self.sampler.accept(token_id)
                yield chunk
            if out.finish:
                break  # after a stop, the decodes in flight (at most decode_ahead) are discarded
        yield from self._finish(out, prompt_ids)

    def _output(self, params: SamplingParams, prompt_ids: list[int], start: float) -> RequestOutput:
        return RequestOutput(self.tokenizer, self.eos_token_ids, self.port.max_context, params, prompt_ids, start,
                             self.token_texts)

    def _finish(self, out: RequestOutput, prompt_ids: list[int]) -> Iterator[Chunk | GenerationResult]:
        """The request's last chunk and result; then the KV cache is known to hold the prompt and every output token
        but the last (each of those was the input of a step that ran: a decode, or a verify that accepted it)."""
        self.sampler.end_request()
        items = list(out.close())  # the held-back text, then the result: the request is complete here
        if self.kv is not None:  # before the result goes out: a caller may stop iterating when it has it
            self.kv.hold(prompt_ids + out.token_ids[:-1])
        yield from items



def score_step(port: ExecutorPort, out: RequestOutput, prompt_ids: list[int], slot: int, logprobs: int, start: int,
               count: int) -> PromptScores | None:
    """One scoring step (`ExecutorPort.score_prompt`) of slot `slot`'s prompt positions [start, start + count) (its
    ids in place): every row scored but the prompt's last (whose next token is the reply's first). Its entries, also
    kept in `out.prompt_logprobs`; None for a later step with none. The prompt's last step leaves the first token's
    logits."""
    n = len(prompt_ids)
    width = 2 + 2 * logprobs  # ScorePrompt's row: logprob, rank, top logprobs, top ids
    scored = count if start + count < n else count - 1
    values = port.score_prompt(count, start, slot, logprobs, scored)
    if len(values) != scored * width:
        raise HybridrtError(f"executor: a prompt's scoring step gave {len(values)} values, not {scored * width}")
    rows = [values[i * width:(i + 1) * width] for i in range(scored)]
    entries = [replace(out.token_logprob(prompt_ids[start + i + 1], [row[0], *row[2:]]), rank=int(row[1]))
               for i, row in enumerate(rows)]
    out.prompt_logprobs += entries
    if not entries and start:
        return None
    return PromptScores(start + 1, entries, None if start else out.token_text(prompt_ids[0]))  # (the first: always)


class RequestOutput:
    """The host side of one request: stop checks, detokenization, stop strings, timings."""

    def __init__(self, tokenizer: Detokenizing | None, eos_token_ids: frozenset[int], max_context: int,
                 params: SamplingParams, prompt_ids: list[int], start: float,
                 token_texts: dict[int, str] | None = None) -> None:
        """`token_texts`: the tokens decoded alone so far (a generator's, shared by its requests: the logprobs'
        top tokens repeat)."""
        self.params, self.eos, self.max_context = params, eos_token_ids, max_context
        self.prompt_len, self.start = len(prompt_ids), start
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens) if tokenizer else None
        self.stops = StopStringMatcher(params.stop)
        self.token_ids: list[int] = []
        self.times: list[float] = []
        self.parts: list[str] = []
        self.finish: str | None = None
        self.prefill_enqueued_ms = 0.0
        self.prefill_sent_ms = 0.0
        self.speculation: dict | None = None
        self.cached_tokens = 0
        self.tokenizer = tokenizer
        self.token_texts = {} if token_texts is None else token_texts
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        # the prompt's entries (`score_prompt`), None first: position 0 follows nothing
        self.prompt_logprobs: list[TokenLogprob | None] | None = None if params.prompt_logprobs is None else [None]

    def add(self, token_id: int, logprob_values: list[float] | None = None) -> Chunk:
        """`logprob_values`: the token's `Sampler.last_logprobs` as read, when the request asked for them."""
        self.times.append((time.perf_counter() - self.start) * 1e3)
        self.token_ids.append(token_id)
        p = self.params
        ends = token_id in p.stop_token_ids or (token_id in self.eos and not p.ignore_eos)
        if ends:
            self.finish = FinishReason.STOP
            # Not in the reply's text: no logprobs entry (as OpenAI lists a chat's), unless the prompt is scored too
            # (echo with logprobs): lm-evaluation-harness reads prompt + generated entries there, whatever the
            # generated token is, and would drop a prompt token's entry in place of a missing last one.
            if self.prompt_logprobs is None or self.logprobs is None:
                return Chunk("", [token_id])
        logprobs = None
        if self.logprobs is not None:
            if logprob_values is None:
                raise ValueError("a request that asked for logprobs got a token without them")
            logprobs = [self.token_logprob(token_id, logprob_values)]
            self.logprobs += logprobs
        if ends:
            return Chunk("", [token_id], logprobs)
        if len(self.token_ids) >= p.max_tokens or self.prompt_len + len(self.token_ids) >= self.max_context:
            self.finish = FinishReason.LENGTH
        text = self.detok.add(token_id) if self.detok else ""
        if len(self.token_ids) <= p.min_tokens:  # stop strings count only after min_tokens (as vLLM)
            emit, hit_stop = text, False
        else:
            emit, hit_stop = self.stops.feed(text)
        if hit_stop:
            self.finish = FinishReason.STOP
        self.parts.append(emit)
        return Chunk(emit, [token_id], logprobs)

    def token_logprob(self, token_id: int, values: list[float]) -> TokenLogprob:
        """values: [log p(token), the top k log-probabilities, their ids] (`Sampler.last_logprobs`, or a row of a
        prompt's scoring step)."""
        k = (len(values) - 1) // 2
        top_ids = [int(t) for t in values[1 + k:]]
        return TokenLogprob(token_id, self.token_text(token_id), values[0], top_ids,
                            [self.token_text(t) for t in top_ids], values[1:1 + k])

    def token_text(self, token_id: int) -> str:
        """A token decoded alone (special tokens kept), as OpenAI's logprobs name it; "" without a tokenizer."""
        if self.tokenizer is None:
            return ""
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def close(self) -> Iterator[Chunk | GenerationResult]:
        tail = self.stops.feed(self.detok.flush())[0] + self.stops.flush() if self.detok else ""
        if tail:
            self.parts.append(tail)
            yield Chunk(tail, [])
        yield GenerationResult("".join(self.parts), self.token_ids, self.finish, self.prompt_len, self.times[0],
                               _rate(self.times), self.times, self.prefill_enqueued_ms, self.speculation,
                               self.cached_tokens, self.prefill_sent_ms, self.logprobs, self.prompt_logprobs)


def _rate(times_ms: list[float]) -> float:
    """Decode tokens per second: tokens after the first over the time they took."""
    if len(times_ms) < 2 or times_ms[-1] <= times_ms[0]:
        return 0.0
    return (len(times_ms) - 1) / ((times_ms[-1] - times_ms[0]) / 1e3)
