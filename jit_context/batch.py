"""Continuous batching over the executor's KV slots (`--max-num-seqs` > 1): several requests decode together in one
step, and requests join and leave at step boundaries.

Each running request owns one KV slot (its prompt ids in the slot's row of the shared input-ids buffer, its next
input token at next_token[slot], its own `Sampler` with its parameters and seed) and its own `RequestOutput` (stop
checks, detokenization). One `step` of the engine is one `DecodeBatch` of every request that has a token to consume
(row b's logits land in batch_logits[b], and each request samples its own row) carrying the prompt chunks of the
requests still prefilling (<= `prefill_chunk` tokens in all; the oldest request's first, then, whole, the prompts of
those that arrived with it, while each fits): a long prompt is spread over several steps, prompts arriving together
start in one, and the running streams wait for one step of chunks between two tokens, not for a chunk and a decode
step. When a chunk is its prompt's last, the request's first token is sampled from `StepBuffers.chunk_logits`.
Greedy requests therefore produce the tokens they would alone (each row is the same function of its own sequence;
only floating-point summation order can differ), and seeded sampling draws the same tokens (one generator per
request, one draw per token, as alone).

Prefix reuse: a slot keeps the K/V of its last request when that request ended normally (`KvContents`); a new
request takes the free slot whose contents share the longest prefix with its prompt and prefills only the rest.

The engine never speculates (speculative decoding is the batch-1 server's, `Generator`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ipc.messages import MAX_SCORED_ROWS, PromptChunk
from ipc.step_buffers import StepBuffers
from jit_context.generator import (
    Chunk,
    Detokenizing,
    GenerationResult,
    PrefillProgress,
    PromptScores,
    RequestOutput,
    check_prompt,
    end_ids,
    score_step,
)
from jit_context.grammar_mask import Grammars, make_constraint
from jit_context.kv_contents import KvContents
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams


# What `step` reports per request: a streamed token's text, a prefill's progress, a prompt's log-probabilities, or the
# request's end.
@dataclass(frozen=True)
class RequestFailed:
    """A request ended by an error of its own (its structured output's matcher failed): its slot is free by then; the
    other requests go on."""

    message: str


Item = Chunk | PrefillProgress | PromptScores | GenerationResult | RequestFailed


class BatchPort(Protocol):
    """What the engine needs of an executor with KV slots (the in-process `ModelRunner`, or `RemoteExecutor`)."""

    buffers: StepBuffers
    max_context: int

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None: ...

    def decode_batch(self, slots: list[int], positions: list[int], chunks: Sequence[PromptChunk] = ()) -> None: ...

    def wait_enqueued(self) -> None: ...

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """`ExecutorPort.score_prompt` (only lanes with `SamplingParams.prompt_logprobs` call it)."""


@dataclass
class Lane:
    """One running request in its KV slot."""

    key: Hashable  # the caller's handle of the request
    slot: int
    prompt: list[int]
    out: RequestOutput
    prefilled: int  # prompt positions whose K/V the slot holds (reused ones included)
    admitted: int  # admission order: the oldest prefilling request goes first

    @property
    def scores(self) -> bool:
        """Its prompt's log-probabilities are asked for and not computed yet: its prompt runs in scoring steps of its
        own (`score_prompt`), never as chunks riding a decode."""
        return self.out.params.prompt_logprobs is not None and self.prefilled < len(self.prompt)

    @property
    def decoding(self) -> bool:
        """It has a sampled token for the next decode step to consume."""
        return self.prefilled == len(self.prompt) and self.out.finish is None and bool(self.out.token_ids)

    @property
    def position(self) -> int:
        """The KV position of the token the next decode step consumes (the last one sampled)."""
        return len(self.prompt) + len(self.out.token_ids) - 1


@dataclass
class SlotState:
    """What a slot keeps between requests."""

    sampler: Sampler
    contents: KvContents  # K/V known valid (empty without prefix reuse)
    last_used: float = 0.0  # when its last request ended (free slots are reused least recently used first)


class BatchEngine:
    def __init__(self, port: BatchPort, tokenizer: Detokenizing | None, eos_token_ids: frozenset[int],
                 prefill_chunk: int, prefix_reuse: bool = False, whole_prompt_when_idle: bool = False,
                 incoming: Callable[[float], None] | None = None, send_ahead_margin_s: float | None = None,
                 grammars: Grammars | None = None) -> None:
        """`prefill_chunk`: prompt tokens per step while other requests decode (their token gap is bounded by it).
        `whole_prompt_when_idle`: with nothing else decoding, a prompt is one step (a GPU, where the executor only
        enqueues it); else chunked then too (the CPU, where the JIT context waits for each chunk and answers its
        clients between them). `incoming(timeout_s)`: the server's hook that admits (through `admit`) the requests
        waiting for a slot, watching for arrivals up to timeout_s; called with a slot free just before a step is sent
        ahead, so that a request admitted there rides that very step as its first prompt chunk (a mixed step) instead
        of joining the one after (a whole decode step less of its TTFT), and its admission (tokenized, its sampler
        set) overlaps the step in flight instead of leaving the device idle.
        `send_ahead_margin_s` (a GPU): with a slot free, a step is sent ahead only this long before the step in
        flight is expected to end (the shortest of the last steps), watching for arrivals until then: a request that
        arrives while a step runs then joins the next one, not the one after (sent ahead at the step's start, the next
        decode would already be queued). The margin covers the send and the executor's launch, so the device stays
        busy.
        `grammars`: the tokenizer's view for structured output (`SamplingParams.structured`; None: none is taken). A
        lane's token is read (and its matcher moved on) before its next draw is queued, as every lane's is: the steps
        sent ahead are drawn only after the tokens before them are read."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.whole_prompt_when_idle = whole_prompt_when_idle
        self.port = port
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.token_texts: dict[int, str] = {}  # tokens decoded alone (logprobs), for every request
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = prefill_chunk
        self.prefix_reuse = prefix_reuse
        self.incoming = incoming
        self.send_ahead_margin_s = send_ahead_margin_s
        self._read_end: float | None = None  # when the last decode's tokens were read (about when the next began)
        # Read-to-read times of the last pipelined decode steps. Their minimum is the step's length: a late send only
        # ever lengthens one, so a moving average would feed each late send into a later deadline for the next.
        self._periods: deque[float] = deque(maxlen=16)
        buffers = port.buffers
        vocab, device = buffers.logits.shape[0], buffers.logits.device
        self.slots = [SlotState(Sampler(vocab, device), KvContents(port.max_context)) for _ in range(buffers.slots)]
        self.lanes: dict[int, Lane] = {}  # slot -> its running request
        self._admitted = 0
        self._inflight: list[Lane] | None = None  # the lanes of a decode sent ahead (row b: lane b), if any
        self._inflight_chunks: list[Lane] = []  # the lanes whose prompt chunks ride it (chunk i: lane i)
        self._scored_last = False  # the last step was a scoring step (the decodes go next)
        # Prompt ids go up through pinned memory without a wait: a blocking copy would hold the host until the
        # stream's queued work (the draws behind the step in flight) is done, and an admission during a step could
        # not send the next one ahead of the device. One row per slot: two admissions in one step never share one.
        self._staging: torch.Tensor | None = None
        if device.type == "cuda":
            self._staging = torch.empty(len(self.slots), port.max_context, dtype=torch.int64, pin_memory=True)
            self._staged = [torch.cuda.Event() for _ in self.slots]  # the last copy out of each row has read it

    # -- requests joining and leaving -----------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return len(self.slots)

    @property
    def running(self) -> int:
        return len(self.lanes)

    def has_room(self) -> bool:
        return len(self.lanes) < len(self.slots)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        check_prompt(prompt_ids, self.port.max_context)

    def admit(self, key: Hashable, prompt_ids: list[int], params: SamplingParams,
              start_time: float | None = None) -> int:
        """Give the request a free slot (ValueError when none is free or the prompt does not fit); its prefill
        starts at the next `step`. Returns the prompt tokens reused from the slot's cache."""
        self.check_prompt(prompt_ids)
        constraint = make_constraint(self.grammars, params, self.port.buffers.logits.device)
        reuse = self.prefix_reuse and params.prompt_logprobs is None  # (a scored prompt runs from its first token)
        slot = self._pick_slot(prompt_ids, reuse)
        state = self.slots[slot]
        cached = state.contents.reusable(prompt_ids) if reuse else 0
        state.contents.forget()  # until this request ends normally
        ids = self.port.buffers.slot_ids(slot)  # [C]
        self._upload(slot, ids[cached:len(prompt_ids)], prompt_ids[cached:])
        state.sampler.start_request(params, prompt_ids, end_ids=end_ids(params, self.eos_token_ids),
                                    constraint=constraint)
        start = time.perf_counter() if start_time is None else start_time
        out = RequestOutput(self.tokenizer, self.eos_token_ids, self.port.max_context, params, prompt_ids, start,
                            self.token_texts)
        out.cached_tokens = cached
        self._admitted += 1
        self.lanes[slot] = Lane(key, slot, list(prompt_ids), out, cached, self._admitted)
        return cached

    def _upload(self, slot: int, dest: torch.Tensor, values: list[int]) -> None:
        """dest [n] int64 on the executor's device <- values, queued on the current stream (the host does not wait)."""
        if self._staging is None:
            dest.copy_(torch.tensor(values, dtype=torch.int64))
            return
        self._staged[slot].synchronize()  # the slot's last copy (its previous request's: long done) has read the row
        staged = self._staging[slot, :len(values)]
        staged.numpy()[:] = values
        dest.copy_(staged, non_blocking=True)
        self._staged[slot].record()

    def _pick_slot(self, prompt_ids: list[int], reuse: bool) -> int:
        """A free slot: with `reuse`, the longest reusable prefix first; then the slot left idle longest (its
        contents are the least likely to be asked for again; a scored prompt, which reuses nothing, takes it too)."""
        free = [s for s in range(len(self.slots)) if s not in self.lanes]
        if not free:
            raise ValueError(f"all {len(self.slots)} KV slots are in use")
        return max(free, key=lambda s: (self.slots[s].contents.reusable(prompt_ids) if reuse else 0,
                                        -self.slots[s].last_used))

    def cancel(self, key: Hashable) -> bool:
        """End a request without a result (cancelled, or its client left); its slot is free at once. False if the
        engine does not run it."""
        for slot, lane in list(self.lanes.items()):
            if lane.key == key:
                self._release(slot, keep=None)
                return True
        return False

    def abort_all(self) -> list[Hashable]:
        """Drop every running request (a step failed: what the slots hold is unknown); their keys."""
        self._inflight, self._inflight_chunks = None, []
        keys = [lane.key for lane in self.lanes.values()]
        for slot in list(self.lanes):
            self._release(slot, keep=None)
        return keys

    def _release(self, slot: int, keep: list[int] | None) -> None:
        """Free the slot; `keep`: the token ids whose K/V it now holds (a request that ended normally)."""
        del self.lanes[slot]
        if not self.lanes:
            # a step sent ahead for requests that all ended: nothing left to read of it
            self._inflight, self._inflight_chunks = None, []
        state = self.slots[slot]
        state.sampler.end_request()
        if keep is not None and self.prefix_reuse:
            state.contents.hold(keep)
        else:
            state.contents.forget()
        state.last_used = time.monotonic()

    # -- one step -----------------------------------------------------------------------------------------

    def step(self) -> list[tuple[Hashable, Item]]:
        """Advance the running requests by one step; what each produced, in order. A request's GenerationResult is
        its last item (its slot is free by then). Exceptions from the executor propagate: the caller fails the
        running requests (`abort_all`).

        A step is one `DecodeBatch` of every request that has a token to consume, carrying a prompt chunk of the
        oldest request still prefilling if there is one (the executor runs both in one pass over the weights: a
        mixed step), or that chunk alone when nothing decodes. While every running request decodes, the steps are
        pipelined as the batch-1 loop's are: the next decode is sent as soon as this one's tokens are drawn on the
        device (it reads them from next_token there), before the host reads them, so the device never waits for the
        host. A request that then turns out to have ended (EOS, a stop) leaves a wasted row in the step in flight,
        whose K/V write lands past what its slot keeps."""
        events: list[tuple[Hashable, Item]] = []
        if self._inflight is not None:  # the step sent at the end of the last one
            sent, chunk_lanes = self._inflight, self._inflight_chunks
            self._inflight, self._inflight_chunks = None, []
            self._finish_decode(sent, events, chunk_lanes, pipelined=not chunk_lanes)
            return events  # its tokens go out now
        decoding = sorted((lane for lane in self.lanes.values() if lane.decoding), key=lambda lane: lane.slot)
        scoring = [lane for lane in self.lanes.values() if lane.scores]
        # A scoring step is a step of its own (nothing is in flight here), taking turns with the decodes: the running
        # streams wait one scoring step of at most prefill_chunk rows between two tokens.
        if scoring and not (decoding and self._scored_last):
            self._scored_last = True
            self._score(min(scoring, key=lambda lane: lane.admitted), events)
            return events
        self._scored_last = False
        if decoding:
            lanes, chunks = self._next_chunks()
            self.port.decode_batch([d.slot for d in decoding], [d.position for d in decoding], chunks)
            self._finish_decode(decoding, events, lanes)
        elif (lane := self._oldest_prefilling()) is not None:
            self._prefill_chunk(lane, events)
        return events

    def _prefilling(self) -> list[Lane]:
        """The requests with prompt tokens still to run in chunks, oldest first (not those to score)."""
        return sorted((lane for lane in self.lanes.values() if lane.prefilled < len(lane.prompt) and not lane.scores),
                      key=lambda lane: lane.admitted)

    def _oldest_prefilling(self) -> Lane | None:
        prefilling = self._prefilling()
        return prefilling[0] if prefilling else None

    def _next_chunks(self) -> tuple[list[Lane], list[PromptChunk]]:
        """The prompt chunks to ride the next decode (counted as prefilled from here on): the oldest prefilling
        request's next chunk (<= prefill_chunk tokens), then the whole rest of each next one's prompt while the
        chunks, each padded as long as the longest, still fit prefill_chunk rows (an executor pads them so)."""
        lanes: list[Lane] = []
        chunks: list[PromptChunk] = []
        for lane in self._prefilling():
            rest = len(lane.prompt) - lane.prefilled
            if lanes:
                longest = max(rest, *(c.num_tokens for c in chunks))
                if (len(chunks) + 1) * longest > self.prefill_chunk:
                    break
            count = min(self.prefill_chunk, rest)
            chunks.append(PromptChunk(count, lane.prefilled, lane.slot))
            lanes.append(lane)
            lane.prefilled += count
        return lanes, chunks

    def _prefill_chunk(self, lane: Lane, events: list[tuple[Hashable, Item]]) -> None:
        """A prompt chunk alone (nothing decodes): with `whole_prompt_when_idle`, the rest of the prompt."""
        n = len(lane.prompt)
        count = n - lane.prefilled if self.whole_prompt_when_idle else min(self.prefill_chunk, n - lane.prefilled)
        self.port.prefill(count, lane.prefilled, lane.slot)
        self.port.wait_enqueued()
        lane.prefilled += count
        if self._chunk_ran(lane, events):
            self._draw([(lane, self.port.buffers.logits[None], 0)])
            self._read([lane], events)

    def _score(self, lane: Lane, events: list[tuple[Hashable, Item]]) -> None:
        """The lane's next scoring step (`score_step`: it returns once it has run, with its entries) of at most
        prefill_chunk rows; after the prompt's last, its first token, drawn from `logits`."""
        count = min(self.prefill_chunk, MAX_SCORED_ROWS, len(lane.prompt) - lane.prefilled)
        item = score_step(self.port, lane.out, lane.prompt, lane.slot, lane.out.params.prompt_logprobs, lane.prefilled,
                          count)
        if item is not None:
            events.append((lane.key, item))
        lane.prefilled += count
        if self._chunk_ran(lane, events):
            self._draw([(lane, self.port.buffers.logits[None], 0)])
            self._read([lane], events)

    @staticmethod
    def _chunk_ran(lane: Lane, events: list[tuple[Hashable, Item]]) -> bool:
        """A chunk of the lane's prompt was enqueued: report its progress, or, when it was the prompt's last, note
        when and say so (its first token is then drawn from `logits`)."""
        n = len(lane.prompt)
        if lane.prefilled < n:
            events.append((lane.key, PrefillProgress(lane.prefilled, n)))
            return False
        lane.out.prefill_enqueued_ms = (time.perf_counter() - lane.out.start) * 1e3
        return True

    def _finish_decode(self, sent: list[Lane], events: list[tuple[Hashable, Item]],
                       chunk_lanes: Sequence[Lane] = (), pipelined: bool = False) -> None:
        """The decode of `sent` (row b: sent[b]) was sent, with a chunk of chunk_lanes[i]'s prompt as its chunk i:
        draw each live row's token (and each chunk lane's first, when its chunk ended its prompt), send the next step
        right away when every running request decodes (`_send_ahead`), then read the tokens. `pipelined`: `sent`
        went out ahead as a decode alone, right behind the step before it (its read-to-read time is a step's
        length)."""
        self.port.wait_enqueued()
        buffers = self.port.buffers
        # (lane, logits [R, V], row): each live row of the step (not cancelled since), then the chunks' last tokens
        draws = [(lane, buffers.batch_logits, b) for b, lane in enumerate(sent) if self._live(lane)]
        draws += [(lane, buffers.chunk_logits(i)[None], 0) for i, lane in enumerate(chunk_lanes)
                  if self._live(lane) and self._chunk_ran(lane, events)]
        if not draws:
            return
        self._draw(draws)
        lanes = [lane for lane, _, _ in draws]
        if all(lane.prefilled == len(lane.prompt) for lane in self.lanes.values()):
            self._send_ahead(lanes)
        live = [lane for lane in lanes if self._live(lane)]  # (a client may have cancelled meanwhile)
        if live:
            self._read(live, events)
        now = time.perf_counter()
        if pipelined and self._read_end is not None:
            self._periods.append(now - self._read_end)
        self._read_end = now

    @property
    def _step_s(self) -> float | None:
        """A pipelined decode step's length, as the last steps show it (None before any)."""
        return min(self._periods) if self._periods else None

    def _live(self, lane: Lane) -> bool:
        return self.lanes.get(lane.slot) is lane

    def _send_ahead(self, lanes: list[Lane]) -> None:
        """Every running request decodes and `lanes` have their next tokens drawn on the device: send the next step
        now, before the host reads them (the executor takes them from next_token). With a slot free, first let the
        server admit arrivals (watching for them until the margin before the step in flight ends): their prompt
        chunks then ride this step."""
        if self.incoming is not None and self.has_room():
            wait = 0.0
            if self.send_ahead_margin_s is not None and self._step_s is not None and self._read_end is not None:
                wait = self._read_end + self._step_s - self.send_ahead_margin_s - time.perf_counter()
            self.incoming(max(0.0, wait))
        # Those that go on unless the token just drawn ends them (EOS, a stop: known once read).
        going = [lane for lane in lanes if self._live(lane) and not _last_by_length(lane)]
        if not going:
            return
        chunk_lanes, chunks = self._next_chunks()
        # The token just drawn is at position len(prompt) + len(tokens): one past what the host knows.
        self.port.decode_batch([lane.slot for lane in going], [lane.position + 1 for lane in going], chunks)
        self._inflight, self._inflight_chunks = going, chunk_lanes

    def _draw(self, draws: list[tuple[Lane, torch.Tensor, int]]) -> None:
        """Queue each lane's draw from row `row` of its logits [R, V] into next_token[slot] (device work only). Plain
        greedy lanes in consecutive rows and slots take one argmax for all (one kernel, where one per row cost the
        4-row step ~26 us more on an H200: bench/NOTES.md), the rest their sampler's draw."""
        next_token = self.port.buffers.next_token  # [slots]
        i = 0
        while i < len(draws):
            lane, logits, row = draws[i]
            sampler = self.slots[lane.slot].sampler
            if not sampler.plain_greedy or sampler.banning:
                sampler.observe(sampler.sample(logits[row], out=next_token[lane.slot:lane.slot + 1]))  # [1]
                i += 1
                continue
            j = i + 1
            while j < len(draws) and _greedy_run_goes_on(draws[j], logits, row + j - i, lane.slot + j - i,
                                                         self.slots[draws[j][0].slot].sampler):
                j += 1
            # argmax of each row: what Sampler.sample takes for a plain greedy request (the same first maximum)
            torch.argmax(logits[row:row + j - i], dim=-1, out=next_token[lane.slot:lane.slot + j - i])
            i = j

    def _read(self, lanes: list[Lane], events: list[tuple[Hashable, Item]]) -> None:
        """Read every lane's drawn token at once; report them (and the requests that end)."""
        next_token = self.port.buffers.next_token
        slots = [lane.slot for lane in lanes]
        first = slots[0]
        # [B]; consecutive slots (the usual batch) as a view: no index tensor to copy up before the read
        tokens = next_token[first:first + len(slots)] if slots == list(range(first, first + len(slots))) \
            else next_token[slots]
        for lane, token in zip(lanes, tokens.tolist()):
            sampler = self.slots[lane.slot].sampler
            logprobs = None if sampler.logprobs_k is None else sampler.last_logprobs.tolist()  # (after the read)
            events.append((lane.key, lane.out.add(token, logprobs)))
            if lane.out.finish is None:
                try:
                    sampler.accept(token)  # (a structured output's next mask, before its next draw)
                except ValueError as e:  # its matcher failed: this request ends, the others go on
                    events.append((lane.key, RequestFailed(str(e))))
                    self._release(lane.slot, keep=None)
                continue
            events.extend((lane.key, item) for item in lane.out.close())
            # Every token but the last was the input of a step that ran: the slot holds the prompt and those.
            self._release(lane.slot, keep=lane.prompt + lane.out.token_ids[:-1])


def _greedy_run_goes_on(draw: tuple[Lane, torch.Tensor, int], logits: torch.Tensor, row: int, slot: int,
                        sampler: Sampler) -> bool:
    """Whether `draw` extends a run of plain greedy draws: the next row of the same logits, into the next slot."""
    lane, its_logits, its_row = draw
    return its_logits is logits and its_row == row and lane.slot == slot and sampler.plain_greedy \
        and not sampler.banning


def _last_by_length(lane: Lane) -> bool:
    """Whether the token just drawn (not yet read) is the lane's last by max_tokens or the context."""
    made = len(lane.out.token_ids) + 1
    return made >= lane.out.params.max_tokens or lane.out.prompt_len + made >= lane.out.max_context
