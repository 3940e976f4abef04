"""How the ranks of a tensor-parallel executor run the same steps (issue 15): the JIT context talks to rank 0 only;
rank 0 (`LeaderRunner`) relays each step to the other ranks over the process group, as a fixed header of host ints
(the step's kind and sizes: a CPU tensor, gloo) and its input ids broadcast from where they are (rank 0's step
buffers: on a GPU a device-to-device broadcast, which rank 0 enqueues without waiting for the JIT context's
writes), then runs its own part; every other rank (`follow`) waits for the next header, receives the ids into its
own step buffers and runs the same step on its own part. The collectives inside the step
(`TensorParallel.all_reduce`, `gather_vocab`) then meet, and rank 0 writes the logits into the shared step buffers.

On the CPU every rank runs its steps eagerly (`ModelRunner`, gloo). On GPUs (one per rank) every rank runs a
`GraphRunner`: the header goes over gloo (the host), the ids and the steps' collectives over NCCL, and the collectives
are captured inside each rank's graphs. A graph with collectives must be captured on every rank at once (its warm-up
runs and its capture meet in them), so rank 0 relays each capture by name (CAPTURE) before its own, and the ranks
always hold the same graphs: each step then replays, or runs eagerly, alike on all of them.

Speculative decoding relays its verify steps like the others: the ids (the n-gram proposals of the command, or the
draft's, which runs whole on rank 0 and writes them into its input ids first) travel with the step, and the
acceptance runs on rank 0 only, over the gathered logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from graph_executor.runner import (
    ModelRunner,
    check_batch,
    check_score,
    check_slot,
    check_span,
    check_verify,
    prefill_chunks,
    verify_ids,
)
from graph_executor.tensor_parallel import TensorParallel
from ipc.messages import PromptChunk
from ipc.step_buffers import StepBuffers

HEADER = 6  # int64 fields: kind, the kind's sizes (up to 3), the host payload's length, the ids' length
PREFILL, DECODE, DECODE_BATCH, STOP, VERIFY, CAPTURE, SCORE = 1, 2, 3, 4, 5, 6, 7


class LeaderRunner:
    """Rank 0's runner: the `ModelRunner` interface, each step relayed to the other ranks before it runs here."""

    def __init__(self, inner: ModelRunner, tp: TensorParallel) -> None:
        self.inner, self.tp = inner, tp
        self.model, self.buffers, self.max_context = inner.model, inner.buffers, inner.max_context

    def _relay(self, kind: int, sizes: tuple[int, ...], host: Sequence[int] = (),
               ids: torch.Tensor | None = None) -> None:
        """Header, then `host` ints (a CPU tensor), then `ids` broadcast from their own device (contiguous int64)."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[:1 + len(sizes)] = torch.tensor((kind, *sizes))
        header[-2] = len(host)
        header[-1] = 0 if ids is None else ids.numel()
        dist.broadcast(header, src=0)
        if host:
            dist.broadcast(torch.tensor(host, dtype=torch.int64), src=0)
        if ids is not None:
            dist.broadcast(ids, src=0)

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None:
        check_slot(self.model.slots, slot)  # refused here, before the other ranks hear of it
        check_span(self.max_context, start_pos, num_tokens)
        ids = self.buffers.slot_ids(slot)[start_pos:start_pos + num_tokens]
        self._relay(PREFILL, (num_tokens, start_pos, slot), ids=ids)
        self.inner.prefill(num_tokens, start_pos, slot)

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """ModelRunner.score_prompt, relayed: every rank runs the same forwards (their logits rows are gathered
        across ranks), with the ids up to the last scored row's next one. Checked here, before the other ranks hear
        of it (they would fail on the same ids)."""
        check_score(self.model, self.buffers, num_tokens, start_pos, slot, scored)
        span = max(num_tokens, scored + 1)  # (within the cache: check_score)
        ids = self.buffers.slot_ids(slot)[start_pos:start_pos + span]
        self._relay(SCORE, (num_tokens, start_pos, slot), host=[logprobs, scored, span], ids=ids)
        return self.inner.score_prompt(num_tokens, start_pos, slot, logprobs, scored)

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        """`argmax`: rank 0 takes the greedy token (its gathered logits); the next step relays it as any input."""
        check_span(self.max_context, position, 1)
        self._relay(DECODE, (position,), ids=self.buffers.token)
        self.inner.decode(position, argmax, own_input)

    def decode_batch(self, slots: list[int], positions: list[int], chunks: Sequence[PromptChunk] = ()) -> None:
        check_batch(self.model.slots, self.max_context, slots, positions, chunks)
        prefill_chunks(self, chunks)  # each relayed as its own prefill: the ranks run eagerly, in turn
        tokens = self.buffers.next_token.index_select(0, torch.tensor(slots, device=self.buffers.next_token.device))
        self._relay(DECODE_BATCH, (len(slots),), host=[*slots, *positions], ids=tokens)
        self.inner.decode_batch(slots, positions)

    def verify(self, position: int, num_tokens: int, tokens: list[int] | None = None, accept: bool = False) -> None:
        """ModelRunner.verify, relayed: `tokens` (else what input_ids holds there: the draft's proposals) go to every
        rank; only rank 0 runs the acceptance (`accept`), read with `wait_accepted`."""
        check_verify(self.max_context, position, num_tokens)
        ids = verify_ids(self.buffers, self.model.config.vocab_size, position, num_tokens, tokens)
        self._relay(VERIFY, (position, num_tokens), ids=ids)
        self.inner.verify(position, num_tokens, None, accept)

    def wait_enqueued(self) -> None:
        self.inner.wait_enqueued()

    def wait_accepted(self) -> list[int]:
        return self.inner.wait_accepted()

    # -- graphs (GPU ranks): every capture on every rank at once -----------------------------------------

    def capture(self, name: str) -> None:
        """Capture graph `name` here and on every other rank (the name relayed as its UTF-8 bytes)."""
        self._relay(CAPTURE, (), host=list(name.encode()))
        self.inner.capture(name)

    def capture_next(self) -> str | None:
        """As GraphRunner.capture_next, on every rank; None when all are captured (or the ranks run eagerly)."""
        capture_next = getattr(self.inner, "capture_next", None)
        return capture_next(self.capture) if capture_next is not None else None

    def stop(self) -> None:
        """Tell the other ranks to leave their loops (the executor is exiting)."""
        self._relay(STOP, ())

    def facts(self) -> dict:
        """Rank 0's graph facts (every rank holds the same graphs); none where the ranks run eagerly."""
        return self.inner.facts() if hasattr(self.inner, "facts") else {}


def follow(model, tp: TensorParallel, graphs: bool = True) -> None:
    """A rank > 0: run every step rank 0 relays, on this rank's part of the model, until it says stop. Raises the
    process group's error when rank 0 is gone. On a GPU with `graphs` (rank 0 runs a GraphRunner then too) the
    steps replay the graphs rank 0 has it capture."""
    device = model.embed_tokens.device
    buffers = StepBuffers.allocate(model.config.vocab_size, model.max_context, device, model.slots)
    if graphs and device.type == "cuda":
        from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

        runner = GraphRunner(model, buffers, measured_buckets=False)  # rank 0's buckets (server.py)
    else:
        runner = ModelRunner(model, buffers)
    while True:
        header = torch.zeros(HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0)
        kind, *sizes, host_count, id_count = header.tolist()
        if kind == STOP:
            return
        host = torch.zeros(host_count, dtype=torch.int64)
        if host_count:
            dist.broadcast(host, src=0)
        if kind == PREFILL:  # the ids land where rank 0's are: this rank's slot ids at the same positions
            num_tokens, start_pos, slot = sizes[:3]
            dist.broadcast(buffers.slot_ids(slot)[start_pos:start_pos + num_tokens], src=0)
            runner.prefill(num_tokens, start_pos, slot)
        elif kind == SCORE:
            (num_tokens, start_pos, slot), (logprobs, scored, span) = sizes[:3], host.tolist()
            dist.broadcast(buffers.slot_ids(slot)[start_pos:start_pos + span], src=0)
            runner.score_prompt(num_tokens, start_pos, slot, logprobs, scored)  # (rank 0 answers with the values)
        elif kind == DECODE:
            dist.broadcast(buffers.token, src=0)
            runner.decode(sizes[0])
        elif kind == DECODE_BATCH:
            b = sizes[0]
            slots, positions = host[:b].tolist(), host[b:].tolist()
            tokens = torch.zeros(id_count, dtype=torch.int64, device=device)
            dist.broadcast(tokens, src=0)
            buffers.next_token.index_copy_(0, torch.tensor(slots, device=device), tokens)
            runner.decode_batch(slots, positions)
        elif kind == VERIFY:
            position, num_tokens = sizes[:2]
            dist.broadcast(buffers.input_ids[position:position + num_tokens], src=0)
            runner.verify(position, num_tokens)
        elif kind == CAPTURE:
            runner.capture(bytes(host.tolist()).decode())
        else:
            raise RuntimeError(f"tensor-parallel rank {tp.rank}: unknown step kind {kind} from rank 0")
