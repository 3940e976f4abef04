"""The GPU path's step: fused Triton kernels (`FusedDecoder`, `FusedPrefill`) captured as CUDA graphs, the static part
of each step: a decode graph (on small models also one per context bucket), prefill graphs per length bucket for
prompts from position 0, extend graphs per bucket for prompts that continue what the cache holds (prefix reuse, and
the chunks of a prompt longer than the largest bucket), and speculative verify graphs per token count
(`FusedVerify`). One class owns capture and replay.

Graphs are captured one at a time when the executor is idle (`capture_next`), decode first, then the verify
graphs once a request has asked for one, then prefill buckets by demand; a shape without its graph runs the
same model code eagerly, so no request waits for a graph. All graphs share one memory pool.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from graph_executor.fused_batch_decoder import FusedBatchDecoder
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.fused_mixed import FusedMixedStep
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.fused_verify import FusedVerify
from graph_executor.greedy_accept import GreedyAcceptance
from graph_executor.greedy_token import GreedyToken
from graph_executor.kernels.decode_plan import options_for
from graph_executor.model import LlamaModel
from graph_executor.runner import (
    check_batch,
    check_slot,
    check_span,
    check_tokens,
    check_verify,
    eager_prefill,
    eager_score_prompt,
)
from ipc.messages import MAX_CHUNK_TOKENS, PromptChunk
from ipc.step_buffers import MAX_VERIFY_TOKENS, StepBuffers

# Prompt rows a prefill / extend graph computes. Up to 128 every 32: there the step reads the weights once whatever
# the rows (LLaMA-2-7B fp16 on the H200: 64 to 128 rows all 4.8-4.9 ms). Past 128 the GEMMs are compute-bound and
# every 16: a 200-token prompt in 224 rows took 6.68 ms against 6.17 in 200 and 6.28 in 208, a 400-token one 10.82
# in 416 against 10.05 in 400 (bench/NOTES.md, thirty-sixth session). cuBLAS is slower at some row counts than at
# larger ones (216 rows 7.18 ms, 224 6.68), so a prompt takes the cheapest captured bucket that holds it
# (`pick_bucket`, by each graph's replay time measured at capture).
DEFAULT_BUCKETS = (16, 32, 64, 96, 128, *range(144, 513, 16))
WARMUP_RUNS = 1  # compiles/loads the Triton kernels and makes the cuBLAS workspace of the capture stream
TIMED_REPLAYS = 5  # replays of a prefill graph timed at its capture or its cuBLASLt trial (the median is its cost)
# Only prefill buckets past this many rows are timed: below, a step reads the weights once whatever its rows (fp16
# crosses from bandwidth- to compute-bound near 170 rows on an H200, for any model size), the choice is the smallest
# bucket anyway, and the server captures these before it is ready (no timing added to its start-up). An extend
# graph is not timed: it runs the same GEMM shapes as the prefill graph of its bucket and takes that one's figure.
TIMED_FROM_ROWS = 129
# A larger bucket must replay this much faster to be taken: where rows cost nothing (short prompts, all reading the
# weights once) the timings differ by noise, and a 10-token prompt must keep its 16-row graph (the short-prompt
# kernels; a 32-row one is cuBLAS, ~0.1-0.2 ms slower on the 7B); the gains worth having were 7-10%.
BUCKET_MARGIN = 0.03
# A prefill graph captured again with torch's cuBLASLt path for its GEMMs (the trial's name: the graph's +
# LT_TRIAL), while idle once every graph exists, both timed together and the trial kept where it replays LT_MARGIN
# faster; the extend graph of that bucket (the same GEMM shapes) is then captured through cuBLASLt too. Which library
# wins depends on the shape (the 7B's down_proj at 64-128 rows: cuBLASLt 10-15% faster; at 200 rows 5% slower).
LT_MARGIN = 0.01
# The margin is smaller than BUCKET_MARGIN because one graph's two versions timed alternately agree run to run: the
# 7B's 128-row graph through cuBLASLt replayed at 0.972-0.976x in six runs (32 rows 0.94-0.95x, 96 0.93-0.94x) on
# the H200. Past ~300 rows the ratio varies by +-3% between runs (the card's clocks under load): a keep there is a
# coin toss between two equal graphs (thirty-seventh session, bench/NOTES.md).
# Decode.argmax's graph: the decode step, then the greedy token (greedy_token.py) filed and the position moved on
ARGMAX_GRAPH = "decode_argmax"
LT_TRIAL = "@cublaslt"
# Decode graphs per context bucket: "decode_ctx<C>" (and ARGMAX_GRAPH + "_ctx<C>") serve positions below C, their
# attention launching only the splits that can hold keys (FusedDecoder.step's context); C from DECODE_CONTEXT_MIN,
# doubling, below the cache's length ("decode" and ARGMAX_GRAPH serve the rest). A step replays the smallest captured
# one that holds its position. Why: the split grid is sized for the cache, so at a 4096-position cache every layer
# launches 64 attention programs a head whatever the context (at context 300 all but 5 finding no keys). Measured
# (H200, 42nd session): SmolLM2-135M's step -1.5..-2%, the 7B's and 8B's from -1% to +6% (decode_plan.StepOptions'
# context_graphs: where the runner captures them by default).
DECODE_CONTEXT_MIN = 512
CONTEXT_TAG = "_ctx"


def decode_contexts(max_context: int) -> tuple[int, ...]:
    """The context buckets of a cache of `max_context` positions: DECODE_CONTEXT_MIN, doubling, below it."""
    contexts, c = [], DECODE_CONTEXT_MIN
    while c < max_context:
        contexts.append(c)
        c *= 2
    return tuple(contexts)


def pick_bucket(num_tokens: int, buckets: tuple[int, ...], replay_ms: dict[int, float],
                margin: float = BUCKET_MARGIN) -> int:
    """The bucket a prompt of num_tokens rows runs in: the smallest that holds it, unless that one's graph and a
    larger one's are both captured and the larger replays faster by more than `margin` (`replay_ms`: bucket ->
    measured ms, captured graphs only); then the fastest such. An uncaptured smallest bucket runs eagerly, as
    before any measurement."""
    natural = next((b for b in buckets if b >= num_tokens), None)
    if natural is None:
        raise ValueError(f"no bucket holds {num_tokens} rows (the largest is {max(buckets, default=0)})")
    if natural not in replay_ms:
        return natural
    faster = [b for b in buckets if b > natural and b in replay_ms and replay_ms[b] < (1 - margin) * replay_ms[natural]]
    return min(faster, key=lambda b: (replay_ms[b], b)) if faster else natural


@dataclass(frozen=True)
class GraphStatic:
    """Inputs the graphs read besides the shared step buffers, at fixed addresses."""

    position: torch.Tensor  # [1] int64: the decode position
    arange: torch.Tensor  # [max bucket] int64: 0..B-1, the positions of a start-0 prefill
    start: torch.Tensor  # [1] int64: an extend step's first position (or a mixed step's chunk's)
    slot: torch.Tensor  # [1] int64: its KV slot
    # An extend step's rows, or a mixed step's (its chunk's, then its decode rows): [max bucket + decode rows] each
    extend_positions: torch.Tensor  # int64: their positions (computed inside the graph, clamped)
    extend_slots: torch.Tensor  # int64: their KV slot
    extend_flat: torch.Tensor  # int64: the chunk rows' index in input_ids (slot * C + position)
    extend_ids: torch.Tensor  # int64: their token ids (gathered inside the graph)
    logits_index: torch.Tensor  # [1] int64: the row whose logits a prefill keeps
    verify_in: torch.Tensor  # [2 + MAX_VERIFY_TOKENS] int64: a verify step's first position, whether its ids
    # follow (1) or are in input_ids already (0), then the ids: copied from pinned memory inside the graph
    verify_ids: torch.Tensor  # [MAX_VERIFY_TOKENS] int64: its tokens (gathered inside the graph)
    verify_positions: torch.Tensor  # [MAX_VERIFY_TOKENS] int64: their positions (computed inside the graph)

    @classmethod
    def allocate(cls, max_bucket: int, device: torch.device, decode_rows: int = 0) -> GraphStatic:
        """`decode_rows`: the most decode rows a mixed step appends to its chunk (0: no mixed steps)."""
        def zeros(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int64, device=device)

        rows = max_bucket + decode_rows
        return cls(zeros(1), torch.arange(max(max_bucket, MAX_VERIFY_TOKENS), device=device), zeros(1), zeros(1),
                   zeros(rows), zeros(rows), zeros(max_bucket), zeros(rows), zeros(1),
                   zeros(2 + MAX_VERIFY_TOKENS), zeros(MAX_VERIFY_TOKENS), zeros(MAX_VERIFY_TOKENS))


@dataclass
class CaptureStats:
    seconds: dict[str, float] = field(default_factory=dict)  # graph name -> capture time (warm-up included)
    warmup_seconds: dict[str, float] = field(default_factory=dict)  # graph name -> its warm-up runs (kernel compile)
    pool_bytes: int = 0  # memory reserved by captures (the shared pool grows as graphs are added)
    replay_ms: dict[str, float] = field(default_factory=dict)  # timed prefill graph -> median replay (pick_bucket's)
    # a prefill graph's cuBLASLt trial (name + LT_TRIAL) -> [the graph's replay ms, the trial's], timed together
    trials_ms: dict[str, list[float]] = field(default_factory=dict)
    cublaslt: list[str] = field(default_factory=list)  # graphs whose cuBLASLt capture was kept (faster)


class GraphRunner:
    """Same interface as ModelRunner (`buffers`, `max_context`, `prefill`, `decode`), replaying graphs.

    `decoder`: the fused decode step to capture (default: `FusedDecoder(model)`; the GEMV probe passes its own
    block plan). `accepts`: the verify graphs end with the greedy acceptance (`Verify.accept`; a draft model's
    runner has no use for it). `measured_buckets`: see `pick_bucket` (False: always the smallest bucket).
    `argmax_graph`: capture ARGMAX_GRAPH (Decode.argmax's decode; a draft model's runner, whose decodes nobody takes a
    token from, and a tensor-parallel rank do without). `context_graphs`: also a decode graph per context bucket
    (DECODE_CONTEXT_MIN's comment); None: `decode_plan.options_for` the model's hidden size."""

    def __init__(self, model: LlamaModel, buffers: StepBuffers | None = None,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, decoder: FusedDecoder | None = None,
                 accepts: bool = True, measured_buckets: bool = True, argmax_graph: bool = True,
                 context_graphs: bool | None = None) -> None:
        self.model = model
        # Prompts take the cheapest captured bucket by measured replay time (`pick_bucket`). Off for tensor-parallel
        # ranks: each would measure its own, and every rank must replay the same graph (its collectives).
        self.measured_buckets = measured_buckets
        # kind -> bucket -> its prefill graph's replay ms, for the captured graphs of that kind
        self.bucket_ms: dict[str, dict[int, float]] = {"prefill": {}, "extend": {}}
        device = model.embed_tokens.device
        self.buffers = buffers or StepBuffers.allocate(model.config.vocab_size, model.max_context, device,
                                                       model.slots)
        self.max_context = model.max_context
        self.buckets = tuple(b for b in sorted(buckets) if b < model.max_context)
        self.chunk = self.buckets[-1] if self.buckets else 0
        self.static = GraphStatic.allocate(max(self.chunk, 1), self.buffers.logits.device,
                                           decode_rows=model.slots if model.slots > 1 else 0)
        self.stream = torch.cuda.Stream(self.buffers.logits.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.demand: Counter[str] = Counter()  # "prefill_<bucket>" / "extend_<bucket>" -> prompts that took it
        # Fused kernels: 7 launches per decoder layer in decode, ~10 in prefill.
        self.decoder = decoder or FusedDecoder(model)
        # Row buffers for the largest bucket; with slots, also for a mixed step's chunk plus its decode rows.
        self.prefiller = FusedPrefill(model, max(self.chunk, 1) + (model.slots if model.slots > 1 else 0))
        self.verifier = FusedVerify(model, MAX_VERIFY_TOKENS)
        self.verify_used = False  # verify graphs are captured once a request has used speculation
        self.acceptance = GreedyAcceptance(self.buffers)
        self.greedy = GreedyToken(self.buffers)  # Decode.argmax: the kernel after the decode graph, same stream
        # Decode.argmax's own graph (ARGMAX_GRAPH: the decode step, then the argmax kernel, which also moves the
        # position on by one), one rank only (a tensor-parallel rank's logits are gathered on rank 0 alone)
        self.argmax_graphs = (ARGMAX_GRAPH,) if argmax_graph and model.tp is None else ()
        # the batch-1 decode graphs per context bucket, where measured a gain (decode_plan.StepOptions.context_graphs)
        wanted = options_for(model.config.hidden_size).context_graphs if context_graphs is None else context_graphs
        self.decode_contexts = decode_contexts(model.max_context) if wanted else ()
        # what static.position holds once the steps queued so far have run (None: unknown, e.g. after a capture's
        # warm-ups): a decode at that position needs no fill before its replay
        self._position_after: int | None = None
        self.accepts = accepts
        self._verified = 0  # tokens of the last verify step whose acceptance is to be read
        # A verify step's inputs (static.verify_in's layout) are written here on the host and copied up by the graph
        # itself: no CUDA call per step but the replay (each one cost ~25-65 us of host time in the executor, on the
        # critical path of a verify; bench/NOTES.md, issue 11). Rewritten only once the last replay has read them.
        self._verify_host = torch.zeros(2 + MAX_VERIFY_TOKENS, dtype=torch.int64, pin_memory=True)
        self._verify_inputs = self._verify_host.numpy()  # the same memory, written without torch dispatch
        self._inputs_read = torch.cuda.Event()
        self.stats = CaptureStats()
        # KV slots (--max-num-seqs > 1): a batched decode graph per batch size; a batch is padded to the next size by
        # repeating its first row (same slot, position and token: the same values written twice). A prompt in a slot
        # past 0 takes the extend graphs, which read the slot from the device like the start: no graph is per slot.
        self.batch_sizes: tuple[int, ...] = ()
        # A DecodeBatch with a prompt chunk (continuous batching's mixed step) replays "mixed_<bucket>_<size>": the
        # chunk padded to a bucket of at most MAX_CHUNK_TOKENS, its slot and start read from the device like the
        # decode rows', so no graph is per slot. Its decode rows (at most slots - 1: one slot prefills) are always
        # padded to one size: next to a chunk of tens of rows a few more cost next to nothing, and each bucket then
        # needs one graph, not one per batch size (a 4-slot 7B server captured 15 before ready, ~3 s). K > 1 chunks
        # (prompts that arrived together) replay "mixed_<K>x<bucket>_<size>", each chunk padded to the bucket of the
        # longest; those are captured while idle after ready, and until then the later chunks run as prefills first.
        self.mixed_buckets: tuple[int, ...] = ()
        self.mixed_sizes: tuple[int, ...] = ()
        if model.slots > 1:
            self.batch_decoder = FusedBatchDecoder(model, model.slots)
            self.batch_sizes = tuple(sorted({min(1 << i, model.slots) for i in range(model.slots.bit_length() + 1)}))
            device = self.buffers.logits.device
            # [5, slots]: the decode rows' slots and positions, then the chunks' starts, slots and last rows
            self._batch_in = torch.zeros(5, model.slots, dtype=torch.int64, device=device)
            if self.chunk:
                self.mixed = FusedMixedStep(self.prefiller, model.slots)
                self.mixed_buckets = tuple(b for b in self.buckets if b <= MAX_CHUNK_TOKENS)
                self.mixed_sizes = (next(b for b in self.batch_sizes if b >= model.slots - 1),)
            self._batch_tokens = torch.zeros(model.slots, dtype=torch.int64, device=device)
            self._batch_host = torch.zeros(5, model.slots, dtype=torch.int64, pin_memory=True)
            self._batch_host_np = self._batch_host.numpy()
            self._batch_read = torch.cuda.Event()
            # [slots, V] float32: the logits of chunks run as prefills before a step, kept here until the step (whose
            # padding rows may write the batch_logits rows they belong in) is enqueued
            self._chunk_stash = torch.empty_like(self.buffers.batch_logits)

    # -- replay (or, until a graph exists, the same body run eagerly) -------------------------------------

    def _launch(self, name: str, body) -> None:
        graph = self.graphs.get(name)
        if graph is None:
            body()
        else:
            graph.replay()

    def wait_enqueued(self) -> None:
        """In-process steps are enqueued when prefill/decode return: nothing to wait for."""

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        """As ModelRunner.decode; `argmax`'s kernel reads the position from the graph's own buffer. With `argmax`
        and its graph captured, one replay (ARGMAX_GRAPH) that leaves the position at the next step's, so that a
        plain greedy request's steps launch nothing but their graph."""
        check_span(self.max_context, position, 1)
        if position != self._position_after:
            self.static.position.fill_(position)
        if argmax and self.argmax_graphs and (name := self._decode_graph(ARGMAX_GRAPH, position)):
            self.graphs[name].replay()
            self._position_after = position + 1
            return
        self._launch(self._decode_graph("decode", position) or "decode", self._decode_body)
        if argmax:
            self.greedy.run(position, self.static.position)
        self._position_after = position

    def _decode_graph(self, base: str, position: int) -> str | None:
        """The captured graph of decode step `base` ("decode" or ARGMAX_GRAPH) to replay at `position`: the smallest
        context bucket's that holds it, else the whole cache's; None if neither is captured."""
        names = [f"{base}{CONTEXT_TAG}{c}" for c in self.decode_contexts if position < c] + [base]
        return next((name for name in names if name in self.graphs), None)

    def verify(self, position: int, num_tokens: int, tokens: list[int] | None = None, accept: bool = False) -> None:
        """As ModelRunner.verify; the acceptance runs at the end of every verify graph (when `accepts`)."""
        check_verify(self.max_context, position, num_tokens)
        if accept and not self.accepts:
            raise ValueError("this runner's verify steps do not run the acceptance")
        if tokens is not None:
            check_tokens(tokens, num_tokens, self.model.config.vocab_size)
        self.verify_used = True
        if not self._inputs_read.query():
            self._inputs_read.synchronize()
        inputs = self._verify_inputs
        inputs[0], inputs[1] = position, tokens is not None
        if tokens is not None:
            inputs[2:2 + num_tokens] = tokens
        self._launch(f"verify_{num_tokens}", lambda: self._verify_body(num_tokens))
        self._inputs_read.record()
        self._verified = num_tokens if accept else 0

    def wait_accepted(self) -> list[int]:
        """The last verify step's acceptance result, once it has run ([T] argmax tokens, then the count kept)."""
        return self.acceptance.read(self._verified)

    def decode_batch(self, slots: list[int], positions: list[int], chunks: Sequence[PromptChunk] = ()) -> None:
        """As ModelRunner.decode_batch: one graph replay for the batch, padded to the next captured size; with prompt
        chunks, one mixed step for all. Chunks that do not ride it run as prefills first, the last ones first: a
        chunk longer than the mixed buckets, chunks together wider than the largest bucket, and K > 1 chunks whose
        graph is not captured yet (its eager body takes several times the replay: it is captured once idle)."""
        check_batch(self.model.slots, self.max_context, slots, positions, chunks)
        riding = list(chunks)
        stashed = []
        while riding:
            bucket = self._mixed_bucket(riding)
            name = None if bucket is None else self._mixed_name(len(riding), bucket)
            if name is not None and (len(riding) == 1 or name in self.graphs):
                break
            if name is not None:
                self.demand[name] += 1
            last = len(riding) - 1
            chunk = riding.pop()
            self.prefill(chunk.num_tokens, chunk.start_pos, chunk.slot)
            if last:  # chunk 0's logits stay in `logits`, which nothing after writes; the others' wait in the stash
                self._chunk_stash[last].copy_(self.buffers.logits)
                stashed.append(last)
        self._batch_step(slots, positions, riding, bucket if riding else 0)
        for i in stashed:
            self.buffers.chunk_logits(i).copy_(self._chunk_stash[i])

    def _batch_step(self, slots: list[int], positions: list[int], riding: list[PromptChunk], bucket: int) -> None:
        """The batch's decode rows and the chunks that fit one mixed step, each padded to `bucket` rows: one graph
        replay (or its eager body)."""
        if self.model.slots == 1:  # the batch-1 decode graph, on slot 0
            self.decode(positions[0])
            self.buffers.batch_logits[0].copy_(self.buffers.logits)
            return
        size = next(b for b in self.batch_sizes if b >= len(slots)) if not riding else self.mixed_sizes[0]
        if not self._batch_read.query():  # the last batch's inputs are still to be copied up
            self._batch_read.synchronize()
        host = self._batch_host_np
        host[0, :size] = slots[0]  # padding rows repeat row 0
        host[1, :size] = positions[0]
        host[0, :len(slots)], host[1, :len(slots)] = slots, positions
        k = len(riding)
        if riding:
            host[2, :k] = [c.start_pos for c in riding]
            host[3, :k] = [c.slot for c in riding]
            host[4, :k] = [i * bucket + c.num_tokens - 1 for i, c in enumerate(riding)]
        self._batch_in[:, :max(size, k)].copy_(self._batch_host[:, :max(size, k)], non_blocking=True)
        self._batch_read.record()
        if not riding:
            self._launch(f"decode_batch_{size}", lambda: self._decode_batch_body(size))
            return
        if k == 1:
            self.demand[f"mixed_{bucket}"] += 1
        self._launch(self._mixed_name(k, bucket), lambda: self._mixed_body(bucket, size, k))

    def _mixed_bucket(self, chunks: list[PromptChunk]) -> int | None:
        """The bucket these chunks are each padded to in one mixed step, or None when they do not fit one: the
        longest past the mixed buckets, or all of them padded to its bucket wider than the step's row buffers (the
        largest bucket's rows)."""
        longest = max(c.num_tokens for c in chunks)
        if not self.mixed_buckets or longest > self.mixed_buckets[-1]:
            return None
        bucket = next(b for b in self.mixed_buckets if b >= longest)
        return bucket if len(chunks) * bucket <= self.chunk else None

    def _mixed_name(self, chunks: int, bucket: int) -> str:
        """A mixed graph's name: "mixed_<bucket>_<size>" for one chunk, "mixed_<K>x<bucket>_<size>" for K (the
        decode rows always padded to the one size; `_chunk_count` reads K back)."""
        size = self.mixed_sizes[0]
        return f"mixed_{bucket}_{size}" if chunks == 1 else f"mixed_{chunks}x{bucket}_{size}"

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None:
        """A prompt of slot 0 from position 0 in one bucket: its prefill graph (SDPA's causal attention over the new
        tokens); otherwise (another slot, a prompt continuing the cache's contents, or one longer than the largest
        bucket) extend steps of at most the largest bucket each, slot and start read from the device."""
        check_slot(self.model.slots, slot)
        check_span(self.max_context, start_pos, num_tokens)
        if not self.chunk:  # a context too short for any bucket: the reference step
            eager_prefill(self.model, self.buffers, num_tokens, start_pos, slot)
            return
        if start_pos == 0 and slot == 0 and num_tokens <= self.chunk:
            bucket = self._cheapest("prefill", num_tokens)
            self.static.logits_index.fill_(num_tokens - 1)
            self._launch(f"prefill_{bucket}", lambda: self._prefill_body(bucket))
            return
        self.static.slot.fill_(slot)
        for offset in range(0, num_tokens, self.chunk):
            n = min(self.chunk, num_tokens - offset)
            bucket = self._cheapest("extend", n)
            self.static.start.fill_(start_pos + offset)
            self.static.logits_index.fill_(n - 1)
            self._launch(f"extend_{bucket}", lambda: self._extend_body(bucket))

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """As ModelRunner.score_prompt: the reference step, eagerly (a prompt's log-probabilities are asked for once
        per request and need every scored row's logits, which no captured graph makes); its K/V land in the cache
        the graphs read, as a short prompt's eager prefill's do."""
        return eager_score_prompt(self.model, self.buffers, num_tokens, start_pos, slot, logprobs, scored)

    def _bucket(self, kind: str, num_tokens: int, buckets: tuple[int, ...] | None = None) -> int:
        bucket = next(b for b in buckets or self.buckets if b >= num_tokens)
        self.demand[f"{kind}_{bucket}"] += 1
        return bucket

    def _cheapest(self, kind: str, num_tokens: int) -> int:
        """A prefill / extend step's bucket (`pick_bucket`); the demand goes to the smallest that holds it, so that
        its graph is captured next."""
        natural = self._bucket(kind, num_tokens)
        return pick_bucket(natural, self.buckets, self.bucket_ms[kind]) if self.measured_buckets else natural

    # -- the step bodies (captured as graphs, or run eagerly) ----------------------------------------------

    def _decode_batch_body(self, size: int) -> None:
        slots, positions = self._batch_in[0, :size], self._batch_in[1, :size]
        tokens = torch.index_select(self.buffers.next_token, 0, slots, out=self._batch_tokens[:size])
        if size == 1:  # one sequence: the batch-1 step's GEMVs (tuned for it), in that sequence's slot
            self.decoder.step(tokens, positions, self.buffers.batch_logits[0], slot=slots)
        else:
            self.batch_decoder.step(tokens, positions, slots, self.buffers.batch_logits[:size])

    def _chunk_rows(self, bucket: int, start: torch.Tensor, slot: torch.Tensor, row: int = 0) -> None:
        """Rows [row, row + bucket) of the extend_* buffers: a prompt chunk from position start [1] of KV slot
        slot [1] (device tensors: an extend step's static.start/slot, or a mixed step's chunk's in _batch_in)."""
        s = self.static
        rows = slice(row, row + bucket)
        positions, slots, flat = s.extend_positions[rows], s.extend_slots[rows], s.extend_flat[rows]
        torch.add(s.arange[:bucket], start, out=positions)
        # Padding rows past the cache's end write their K/V into its last row (the scratch row, SCRATCH_ROWS),
        # which no prompt token occupies; below it they write positions past the prompt, which no valid row sees.
        positions.clamp_(max=self.max_context - 1)
        slots.copy_(slot.expand(bucket))
        torch.add(positions, slots, alpha=self.max_context, out=flat)  # slot * C + position
        torch.index_select(self.buffers.input_ids, 0, flat, out=s.extend_ids[rows])

    def _mixed_body(self, bucket: int, size: int, chunks: int = 1) -> None:
        s, c = self.static, chunks * bucket
        t = c + size
        for i in range(chunks):
            self._chunk_rows(bucket, self._batch_in[2, i:i + 1], self._batch_in[3, i:i + 1], row=i * bucket)
        ids, positions, slots = s.extend_ids[:t], s.extend_positions[:t], s.extend_slots[:t]  # [K * R + B]
        positions[c:].copy_(self._batch_in[1, :size])
        slots[c:].copy_(self._batch_in[0, :size])
        torch.index_select(self.buffers.next_token, 0, self._batch_in[0, :size], out=ids[c:])
        self.mixed.run(ids, positions, slots, bucket, self._batch_in[4, :chunks],
                       [self.buffers.chunk_logits(i) for i in range(chunks)], self.buffers.batch_logits[:size])

    def _decode_body(self, context: int | None = None) -> None:
        self.decoder.step(self.buffers.token, self.static.position, self.buffers.logits, context=context)

    def _decode_argmax_body(self, context: int | None = None) -> None:
        self._decode_body(context)
        # the kernel reads the ring's slot from the device position (the host's position argument is unused there)
        self.greedy.run(self.max_context - 1, self.static.position, advance=True)

    def _prefill_body(self, bucket: int) -> None:
        ids, positions = self.buffers.slot_ids(0)[:bucket], self.static.arange[:bucket]
        self.prefiller.run(ids, positions, self.static.logits_index, self.buffers.logits)

    def _verify_body(self, num_tokens: int) -> None:
        s, n = self.static, num_tokens
        s.verify_in.copy_(self._verify_host, non_blocking=True)  # the step's inputs, from pinned memory
        positions, ids = s.verify_positions[:n], s.verify_ids[:n]
        torch.add(s.arange[:n], s.verify_in[:1], out=positions)
        torch.index_select(self.buffers.input_ids, 0, positions, out=ids)
        torch.where(s.verify_in[1:2] != 0, s.verify_in[2:2 + n], ids, out=ids)  # the ids sent, if any...
        self.buffers.input_ids.index_copy_(0, positions, ids)  # ...are where a draft or prefill would find them
        self.verifier.run(ids, positions, self.buffers.verify_logits[:n])
        if self.accepts:
            self.acceptance.run(ids)

    def _extend_body(self, bucket: int) -> None:
        s = self.static
        self._chunk_rows(bucket, s.start, s.slot)
        self.prefiller.run(s.extend_ids[:bucket], s.extend_positions[:bucket], s.logits_index, self.buffers.logits,
                           from_cache=True, slots=s.extend_slots[:bucket])

    # -- capture ------------------------------------------------------------------------------------------

    def pending(self) -> list[str]:
        """Graphs not captured yet, in capture order: decode, verify (once used), then the prefill, extend and mixed
        buckets by demand (larger first on ties), and verify graphs last when no request has used them yet."""
        verify = [f"verify_{n}" for n in range(MAX_VERIFY_TOKENS, 1, -1)]
        order = [*self._decode_graphs(), *(f"decode_batch_{b}" for b in self.batch_sizes)] + (
            verify if self.verify_used else [])
        for kind, buckets in (("prefill", self.buckets), ("extend", self.buckets), ("mixed", self.mixed_buckets)):
            by_demand = sorted(buckets, key=lambda b: (-self.demand[f"{kind}_{b}"], -b))
            if kind == "mixed":
                order += [self._mixed_name(1, b) for b in by_demand]
                # K > 1 chunks (prompts arriving together; at least one row decodes): every shape that fits the
                # step's rows, most used first (~0.1 s each on a 7B, after ready: a burst of arrivals soon after
                # start runs them as prefills first until then)
                several = [self._mixed_name(k, b) for k in range(2, self.model.slots) for b in by_demand
                           if k * b <= self.chunk]
                order += sorted(several, key=lambda name: -self.demand[name])
            else:
                order += [f"{kind}_{b}" for b in by_demand]
        order += [] if self.verify_used else verify
        pending = [name for name in order if name not in self.graphs]
        if not pending and self.measured_buckets:  # then each prefill graph once more, through cuBLASLt
            # a prefill trial is done once timed; an extend one (always kept) once its graph is in stats.cublaslt
            pending = [name + LT_TRIAL for name in self.graphs
                       if name.startswith("prefill_") and name + LT_TRIAL not in self.stats.trials_ms]
            extends = ("extend" + name.removeprefix("prefill") for name in self.stats.cublaslt)
            pending += [name + LT_TRIAL for name in extends
                        if name in self.graphs and name not in self.stats.cublaslt]
        return pending

    def capture_next(self, capture: Callable[[str], None] | None = None) -> str | None:
        """Capture the next pending graph; returns its name, or None when all are captured. `capture`: what captures
        it (default `self.capture`; a tensor-parallel leader's relays the capture to every rank)."""
        pending = self.pending()
        if not pending:
            return None
        (capture or self.capture)(pending[0])
        return pending[0]

    def startup_graphs(self, max_tokens: int, verify: bool = False) -> list[str]:
        """What a server captures before it is ready: decode, the prefill and extend buckets up to max_tokens (a chat's
        next turn after prefix reuse is an extend step) and, for a server
        that speculates, the verify graphs (the first requests then run at steady-state speed: a verify step run
        eagerly costs ~15-20 ms on the H200, against ~1 ms replayed; the rest are captured while idle)."""
        names = [*self._decode_graphs(), *(f"decode_batch_{b}" for b in self.batch_sizes),
                 *(f"{kind}_{b}" for kind in ("prefill", "extend") for b in self.buckets if b <= max_tokens),
                 *(self._mixed_name(1, b) for b in self.mixed_buckets if b <= max_tokens)]
        return names + ([f"verify_{n}" for n in range(MAX_VERIFY_TOKENS, 1, -1)] if verify else [])

    def _decode_graphs(self) -> list[str]:
        """The batch-1 decode graphs: the whole cache's ("decode", then ARGMAX_GRAPH), then each context bucket's,
        smallest first."""
        bases = ["decode", *self.argmax_graphs]
        return bases + [f"{base}{CONTEXT_TAG}{c}" for c in self.decode_contexts for base in bases]

    def capture(self, name: str) -> None:
        """Capture one graph (a no-op if it exists): its warm-up runs compile the kernels, then the capture; or a
        cuBLASLt trial (name + LT_TRIAL, `_cublaslt_trial`)."""
        if name.endswith(LT_TRIAL):
            return self._cublaslt_trial(name.removesuffix(LT_TRIAL))
        if name in self.graphs:
            return
        graph = self._record(name)
        kind, _, rows = name.partition("_")
        if self.measured_buckets and kind in self.bucket_ms:
            bucket = int(rows)
            if kind == "prefill" and bucket >= TIMED_FROM_ROWS:
                self._cost(bucket, self._replay_ms(graph)[0])
            if kind == "extend" and bucket in self.bucket_ms["prefill"]:
                self.bucket_ms[kind][bucket] = self.bucket_ms["prefill"][bucket]
        self.graphs[name] = graph

    def _cublaslt_trial(self, name: str) -> None:
        """A prefill graph's trial: captured through cuBLASLt, both timed together (the graph's capture-time figure
        came from another moment's clocks), kept if LT_MARGIN faster. An extend graph's: captured through
        cuBLASLt and kept, its prefill's having been kept (the same GEMM shapes)."""
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            graph = self._record(name + LT_TRIAL, name)
        finally:
            torch.backends.cuda.preferred_blas_library(previous)
        kind, _, rows = name.partition("_")
        if kind == "extend":
            self.graphs[name] = graph
            self.stats.cublaslt.append(name)
            return
        bucket = int(rows)
        ms, trial_ms = self._replay_ms(self.graphs[name], graph)
        self.stats.trials_ms[name + LT_TRIAL] = [ms, trial_ms]
        if trial_ms < (1 - LT_MARGIN) * ms:
            self.graphs[name] = graph  # the other one's memory goes back to the shared pool
            self.stats.cublaslt.append(name)
            if bucket in self.bucket_ms["prefill"]:
                self._cost(bucket, trial_ms)

    def _cost(self, bucket: int, ms: float) -> None:
        """A timed prefill bucket's replay ms (pick_bucket's figure), its extend graph's too once captured (the same
        GEMM shapes; `capture` copies it to one captured later)."""
        self.stats.replay_ms[f"prefill_{bucket}"] = self.bucket_ms["prefill"][bucket] = ms
        if f"extend_{bucket}" in self.graphs:
            self.bucket_ms["extend"][bucket] = ms

    def _replay_ms(self, *graphs: torch.cuda.CUDAGraph) -> list[float]:
        """Median replay ms of each prefill graph (TIMED_REPLAYS each, alternating: a card's clocks drift with its
        recent load, so two graphs compared are timed under the same), the inputs aimed at the scratch row (no slot's
        K/V written). What the rows hold does not matter: on the H200 the real prompt's rows, random ids and all
        zeros at the scratch row replayed within 1% of each other (`bench.probes.ttft_gap`, thirty-seventh session)."""
        self._aim_at_scratch_row()
        times: list[list[float]] = [[] for _ in graphs]
        for _ in range(TIMED_REPLAYS):
            for graph, series in zip(graphs, times):
                series.append(median_event_ms(graph.replay, 1))
        torch.arange(self.static.arange.shape[0], out=self.static.arange)
        return [statistics.median(series) for series in times]

    def _record(self, name: str, step: str | None = None) -> torch.cuda.CUDAGraph:
        """Warm up, capture and upload the graph of step `step` (default: `name`; the stats go under `name`)."""
        step = step or name
        body = self._body(step)
        self._position_after = None  # the warm-ups move the decode position (_aim_at_scratch_row, ARGMAX_GRAPH)
        # ARGMAX_GRAPH's warm-up and upload runs also write next_token and a token_ring slot: harmless because the
        # server captures only while no request is between its Prefill and its Reset (server.capture_when_idle), and
        # a request's first token after its prefill is always the JIT context's draw
        start = time.perf_counter()
        reserved = torch.cuda.memory_reserved()
        self._aim_at_scratch_row()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_RUNS):
                self.static.position.fill_(self.max_context - 1)  # ARGMAX_GRAPH's body moves it on, past the cache
                body()
        torch.cuda.current_stream().wait_stream(self.stream)
        torch.cuda.synchronize()
        self.stats.warmup_seconds[name] = round(time.perf_counter() - start, 4)
        graph = torch.cuda.CUDAGraph()
        # No collection during the capture. Disabling the collector (not freeze/unfreeze) leaves the process's own
        # freeze alone: unfreezing here once put ~170k start-up objects back in the oldest generation, whose
        # next full collection (~0.1 s) then landed inside some token gap (issue 12).
        enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                body()
        finally:
            if enabled:
                gc.enable()
        self.static.position.fill_(self.max_context - 1)  # as in the warm-ups
        graph.replay()  # the first launch uploads the graph (~ms for a large one): here, not in a request's step
        torch.cuda.synchronize()
        torch.arange(self.static.arange.shape[0], out=self.static.arange)
        self.stats.seconds[name] = round(time.perf_counter() - start, 4)
        self.stats.pool_bytes += max(0, torch.cuda.memory_reserved() - reserved)
        return graph

    def _aim_at_scratch_row(self) -> None:
        """Point every static input at the KV cache's last row (SCRATCH_ROWS) before a graph's warm-up and upload
        runs: they then write K/V there only, and the prompt a slot holds for prefix reuse stays valid (the executor
        captures while idle, between a conversation's turns). `capture` restores `arange`; every other input is
        set by the next step that reads it. Also keeps the warm-ups in range: a 200-token prompt leaves logits_index
        at 199, past a 16-row bucket (a device-side assert that kills the context)."""
        last = self.max_context - 1
        self.static.arange.fill_(last)  # prefill, extend (start 0) and verify (start 0) positions
        self.static.position.fill_(last)  # decode
        self.static.start.zero_()
        self.static.slot.zero_()  # extend and mixed steps: slot 0, at its last row (arange)
        self.static.logits_index.zero_()  # row 0 is valid for every shape
        self._inputs_read.synchronize()
        self._verify_inputs[:] = 0
        if self.batch_sizes:
            self._batch_read.synchronize()
            self._batch_in[0].zero_()  # slot 0 at its last row, for every batch size
            self._batch_in[1].fill_(last)
            self._batch_in[2:].zero_()  # mixed steps' chunks: slot 0 from position 0 (+ arange: its last row), row 0

    def capture_all(self) -> None:
        while self.capture_next() is not None:
            pass

    def _body(self, name: str):
        base, tag, context = name.partition(CONTEXT_TAG)
        if base == "decode":
            return lambda: self._decode_body(int(context) if tag else None)
        if base == ARGMAX_GRAPH:
            return lambda: self._decode_argmax_body(int(context) if tag else None)
        if name.startswith("decode_batch_"):
            size = int(name.removeprefix("decode_batch_"))
            return lambda: self._decode_batch_body(size)
        if name.startswith("verify_"):
            num_tokens = int(name.removeprefix("verify_"))
            return lambda: self._verify_body(num_tokens)
        if name.startswith("mixed_"):
            shape, size = name.removeprefix("mixed_").split("_")
            chunks, bucket = (_chunk_count(name), int(shape.split("x")[-1]))
            return lambda: self._mixed_body(bucket, int(size), chunks)
        if name.startswith("extend_"):
            bucket = int(name.removeprefix("extend_"))
            return lambda: self._extend_body(bucket)
        bucket = int(name.removeprefix("prefill_"))
        return lambda: self._prefill_body(bucket)

    def facts(self) -> dict:
        return {"captured": dict(self.stats.seconds), "warmup": dict(self.stats.warmup_seconds),
                "pending": self.pending(), "graph_pool_bytes": self.stats.pool_bytes,
                "replay_ms": dict(self.stats.replay_ms), "cublaslt_trials_ms": dict(self.stats.trials_ms),
                "cublaslt": list(self.stats.cublaslt)}


def median_event_ms(fn: Callable[[], None], reps: int) -> float:
    """Median ms of `reps` calls of fn (e.g. a graph's replay) on the current stream, each between CUDA events and
    waited for (the capture's cost for pick_bucket, and the prefill probes')."""
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def _chunk_count(name: str) -> int:
    """The prompt chunks of a mixed graph's name: "mixed_<K>x<bucket>_<size>" K, "mixed_<bucket>[_<size>]" 1, anything
    else 0 (not a substring test: "mixed" holds an x)."""
    if not name.startswith("mixed_"):
        return 0
    shape = name.removeprefix("mixed_").split("_")[0]
    return int(shape.split("x")[0]) if "x" in shape else 1
