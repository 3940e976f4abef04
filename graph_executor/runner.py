"""The executor's reference step: the model code run eagerly over the step buffers (`ipc.step_buffers`).

It is what the CPU path runs, and what the GPU path falls back to for a shape it has no kernels for; the GPU
path's own step (fused Triton kernels replayed as CUDA graphs) is `graph_executor.graphs.GraphRunner`, and
both fill the same buffers the same way: prompt ids in `input_ids`, the decode token in `next_token`, the
logits of the last position in `logits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from graph_executor.greedy_accept import GreedyAcceptance
from graph_executor.greedy_token import GreedyToken
from graph_executor.model import LlamaModel
from ipc.messages import MAX_CHUNK_TOKENS, PromptChunk
from ipc.step_buffers import MAX_VERIFY_TOKENS, StepBuffers

# Prompt tokens per forward pass: bounds the activation memory of long prompts (chunked prefill).
PREFILL_CHUNK = 1024


def check_span(max_context: int, start_pos: int, num_tokens: int) -> None:
    """ValueError unless positions [start_pos, start_pos + num_tokens) fit the KV cache."""
    if num_tokens < 1 or start_pos < 0 or start_pos + num_tokens > max_context:
        raise ValueError(
            f"positions [{start_pos}, {start_pos + num_tokens}) do not fit the context of {max_context}"
        )


def check_verify(max_context: int, position: int, num_tokens: int) -> None:
    """ValueError unless a verify step of num_tokens at `position` fits the cache and the verify buffer."""
    if not 1 <= num_tokens <= MAX_VERIFY_TOKENS:
        raise ValueError(f"a verify step takes 1..{MAX_VERIFY_TOKENS} tokens, got {num_tokens}")
    check_span(max_context, position, num_tokens)


def check_tokens(tokens: list[int], num_tokens: int, vocab_size: int) -> None:
    """ValueError unless a verify step's ids are num_tokens ids of the vocabulary."""
    if len(tokens) != num_tokens or not all(0 <= t < vocab_size for t in tokens):
        raise ValueError(f"a verify step of {num_tokens} tokens needs {num_tokens} ids in [0, {vocab_size}), "
                         f"got {tokens[:MAX_VERIFY_TOKENS + 1]}")


def verify_ids(buffers: StepBuffers, vocab_size: int, position: int, num_tokens: int,
               tokens: list[int] | None) -> torch.Tensor:
    """A verify step's ids, input_ids[position:position + num_tokens] ([T], a view), with `tokens` written there first
    when given (ValueError unless they are num_tokens ids of the vocabulary)."""
    ids = buffers.input_ids[position:position + num_tokens]
    if tokens is not None:
        check_tokens(tokens, num_tokens, vocab_size)
        ids.copy_(torch.tensor(tokens, dtype=torch.int64))
    return ids


def eager_verify(model: LlamaModel, buffers: StepBuffers, position: int, num_tokens: int) -> None:
    """Run input_ids[position:position + num_tokens] at their positions; every row's logits land in
    verify_logits[:num_tokens]."""
    device = buffers.input_ids.device
    ids = buffers.input_ids[position:position + num_tokens]  # [T]
    positions = torch.arange(position, position + num_tokens, device=device)  # [T]
    rows = torch.arange(num_tokens, device=device)  # [T]: every row's logits
    buffers.verify_logits[:num_tokens].copy_(model(ids, positions, rows, position + num_tokens))  # [T, V]


def eager_prefill(model: LlamaModel, buffers: StepBuffers, num_tokens: int, start_pos: int = 0,
                  slot: int = 0) -> None:
    """Run slot `slot`'s ids at positions [start_pos, start_pos + num_tokens), in chunks; the last one's logits
    land in `logits`."""
    device = buffers.input_ids.device
    slot_ids = buffers.slot_ids(slot)  # [C]
    for chunk_start in range(0, num_tokens, PREFILL_CHUNK):
        chunk_end = min(chunk_start + PREFILL_CHUNK, num_tokens)
        ids = slot_ids[start_pos + chunk_start:start_pos + chunk_end]  # [t]
        positions = torch.arange(start_pos + chunk_start, start_pos + chunk_end, device=device)  # [t]
        last = torch.full((1,), chunk_end - chunk_start - 1, dtype=torch.int64, device=device)
        logits = model(ids, positions, last, start_pos + chunk_end, slot=slot)  # [1, V]
    buffers.logits.copy_(logits[0])


# Scored rows whose logits and float32 log-softmax are made at once (a 128k vocabulary: 64 MB).
SCORE_ROWS = 128


def eager_score_prompt(model: LlamaModel, buffers: StepBuffers, num_tokens: int, start_pos: int, slot: int,
                       logprobs: int, scored: int) -> list[float]:
    """`eager_prefill` that also scores its first `scored` rows (`ipc.messages.ScorePrompt`): row i's log-probability
    of the id at position start_pos + i + 1 of the slot's row of input_ids, and the `logprobs` most likely tokens',
    from the raw logits in float32. Returns the values row after row, [logprob, rank, top logprobs, top ids] (2 + 2k
    a row; the rank 1 + the tokens more likely; ids as floats); the last row's logits land in `logits`. ValueError for
    a span past the cache or a next id outside the vocabulary."""
    targets = check_score(model, buffers, num_tokens, start_pos, slot, scored)  # [scored]
    device = buffers.input_ids.device
    slot_ids = buffers.slot_ids(slot)  # [C]
    values: list[torch.Tensor] = []  # [r, 2 + 2k] float32 per block of scored rows
    last = None  # [1, H]: the step's last row
    for chunk_start in range(0, num_tokens, PREFILL_CHUNK):
        chunk_end = min(chunk_start + PREFILL_CHUNK, num_tokens)
        rows = max(0, min(scored, chunk_end) - chunk_start)  # this chunk's scored rows: its first ones
        ids = slot_ids[start_pos + chunk_start:start_pos + chunk_end]  # [t]
        positions = torch.arange(start_pos + chunk_start, start_pos + chunk_end, device=device)  # [t]
        index = torch.arange(rows, device=device)  # [rows], then the chunk's last row (the next token's logits)
        index = torch.cat([index, torch.full((1,), chunk_end - chunk_start - 1, dtype=torch.int64, device=device)])
        hidden = model(ids, positions, index, start_pos + chunk_end, slot=slot, project=False)  # [rows + 1, H]
        last = hidden[-1:]
        for r in range(0, rows, SCORE_ROWS):  # the logits a block at a time: [rows, V] may not fit beside the model
            block = torch.log_softmax(model.project_logits(hidden[r:min(r + SCORE_ROWS, rows)]).float(), dim=-1)
            next_ids = targets[chunk_start + r:chunk_start + r + block.shape[0]]  # [b]
            chosen = block.gather(1, next_ids[:, None])  # [b, 1]
            parts = [chosen, (block > chosen).sum(dim=1, keepdim=True).float() + 1]  # [b, 1] each: its rank
            if logprobs:
                top = block.topk(logprobs, dim=-1)  # most likely first
                parts += [top.values, top.indices.float()]  # [b, k] each
            values.append(torch.cat(parts, dim=1))
    buffers.logits.copy_(model.project_logits(last)[0])
    return torch.cat(values).flatten().tolist() if values else []


def check_score(model: LlamaModel, buffers: StepBuffers, num_tokens: int, start_pos: int, slot: int,
                scored: int) -> torch.Tensor:
    """ValueError unless a ScorePrompt's span fits the cache and the ids it scores (each scored row's next one, up
    to position start_pos + scored) are in the vocabulary; those ids, [scored] (a view of the slot's row)."""
    check_slot(model.slots, slot)
    check_span(model.max_context, start_pos, num_tokens)
    if not 0 <= scored <= num_tokens or start_pos + scored >= model.max_context:
        raise ValueError(f"scoring {scored} rows from position {start_pos} needs the ids up to position "
                         f"{start_pos + scored} (a context of {model.max_context}, a step of {num_tokens} tokens)")
    targets = buffers.slot_ids(slot)[start_pos + 1:start_pos + 1 + scored]
    vocab = model.config.vocab_size
    if scored and not 0 <= int(targets.min()) <= int(targets.max()) < vocab:
        raise ValueError(f"the prompt ids to score must be in [0, {vocab}) (the vocabulary)")
    return targets


def check_slot(slots: int, slot: int) -> None:
    """ValueError unless `slot` is one of the executor's KV slots."""
    if not 0 <= slot < slots:
        raise ValueError(f"KV slot {slot} does not exist (the executor holds {slots}: --max-num-seqs)")


def check_batch(slots: int, max_context: int, batch_slots: list[int], positions: list[int],
                chunks: Sequence[PromptChunk] = ()) -> None:
    """ValueError unless a batched decode names distinct existing slots, each with a position in its cache, and its
    prompt chunks (if any) lie in the caches of other existing slots, one chunk per slot, MAX_CHUNK_TOKENS in all."""
    if not batch_slots or len(positions) != len(batch_slots) or len(set(batch_slots)) != len(batch_slots):
        raise ValueError(f"a batched decode needs distinct slots and one position each, got {batch_slots}, "
                         f"{positions}")
    for slot, position in zip(batch_slots, positions):
        check_slot(slots, slot)
        check_span(max_context, position, 1)
    every = list(batch_slots) + [chunk.slot for chunk in chunks]
    if len(set(every)) != len(every) or any(c.num_tokens < 1 for c in chunks) \
            or sum(c.num_tokens for c in chunks) > MAX_CHUNK_TOKENS:
        raise ValueError(f"a batched decode's prompt chunks need >= 1 token each, {MAX_CHUNK_TOKENS} in all, each of a "
                         f"slot of its own that does not decode in the step, got {list(chunks)}")
    for chunk in chunks:
        check_slot(slots, chunk.slot)
        check_span(max_context, chunk.start_pos, chunk.num_tokens)


class _PrefillsIntoBuffers(Protocol):
    buffers: StepBuffers

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None: ...


def prefill_chunks(runner: _PrefillsIntoBuffers, chunks: Sequence[PromptChunk]) -> None:
    """A DecodeBatch's prompt chunks run as prefills of `runner` (its `prefill` and `buffers`), the first last: its
    logits stay in `logits`, each other chunk's are copied to buffers.chunk_logits(i) (they touch slots of their own,
    so the order changes nothing else)."""
    for i in reversed(range(len(chunks))):
        chunk = chunks[i]
        runner.prefill(chunk.num_tokens, chunk.start_pos, chunk.slot)
        if i:
            runner.buffers.chunk_logits(i).copy_(runner.buffers.logits)


class ModelRunner:
    """Runs steps of one model over its step buffers, eagerly (the CPU path)."""

    def __init__(self, model: LlamaModel, buffers: StepBuffers | None = None) -> None:
        self.model = model
        device = model.embed_tokens.device
        self.buffers = buffers or StepBuffers.allocate(model.config.vocab_size, model.max_context, device,
                                                       model.slots)
        if self.buffers.slots != model.slots:
            raise ValueError(f"step buffers for {self.buffers.slots} slots, a model with {model.slots}")
        self._last_row = torch.zeros(1, dtype=torch.int64, device=device)  # [1]: row 0 of a decode step
        self.acceptance = GreedyAcceptance(self.buffers)
        self.greedy = GreedyToken(self.buffers)
        self._verified = 0  # tokens of the last verify step that ran the acceptance

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None:
        """Run slot `slot`'s prompt tokens at positions [start_pos, start_pos + num_tokens); the last one's logits
        land in `logits`."""
        check_slot(self.model.slots, slot)
        check_span(self.max_context, start_pos, num_tokens)
        eager_prefill(self.model, self.buffers, num_tokens, start_pos, slot)

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """A prefill that also scores its first `scored` rows (`eager_score_prompt`, `ipc.messages.ScorePrompt`)."""
        return eager_score_prompt(self.model, self.buffers, num_tokens, start_pos, slot, logprobs, scored)

    def wait_enqueued(self) -> None:
        """In-process steps are enqueued when prefill/decode return: nothing to wait for."""

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        """Run slot 0's `next_token` at `position`; its logits land in `logits`. `argmax`: then the greedy token into
        next_token and token_ring (graph_executor/greedy_token.py). `own_input` (`Decode.own_input`): nothing to
        order in one process."""
        check_span(self.max_context, position, 1)
        positions = torch.full((1,), position, dtype=torch.int64, device=self.buffers.next_token.device)
        logits = self.model(self.buffers.token, positions, self._last_row, position + 1)  # [1, V]
        self.buffers.logits.copy_(logits[0])
        if argmax:
            self.greedy.run(position)

    def decode_batch(self, slots: list[int], positions: list[int], chunks: Sequence[PromptChunk] = ()) -> None:
        """Row b: next_token[slots[b]] at positions[b] of slot slots[b]; its logits land in batch_logits[b].
        `chunks`: prompt chunks of other slots in the same step, chunk i's last logits in buffers.chunk_logits(i)
        (here: their prefills, then the decode; they touch different slots, so the order changes nothing)."""
        check_batch(self.model.slots, self.max_context, slots, positions, chunks)
        prefill_chunks(self, chunks)
        device = self.buffers.next_token.device
        index = torch.tensor(slots, dtype=torch.int64, device=device)  # [B]
        ids = self.buffers.next_token.index_select(0, index)  # [B]
        logits = self.model.forward_batch(ids, torch.tensor(positions, dtype=torch.int64, device=device), slots)
        self.buffers.batch_logits[:len(slots)].copy_(logits)  # [B, V]

    def verify(self, position: int, num_tokens: int, tokens: list[int] | None = None, accept: bool = False) -> None:
        """Run input_ids[position:position + num_tokens] (last accepted token, then proposals; `tokens` are written
        there first); their logits land in verify_logits[:num_tokens]. `accept`: then the greedy acceptance
        (graph_executor/greedy_accept.py), read with `wait_accepted`."""
        check_verify(self.max_context, position, num_tokens)
        ids = verify_ids(self.buffers, self.model.config.vocab_size, position, num_tokens, tokens)
        eager_verify(self.model, self.buffers, position, num_tokens)
        if accept:
            self.acceptance.run(ids)
        self._verified = num_tokens if accept else 0

    def wait_accepted(self) -> list[int]:
        """The last verify step's acceptance result ([T] argmax tokens, then the count kept)."""
        return self.acceptance.read(self._verified)
