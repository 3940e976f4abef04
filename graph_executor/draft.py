"""The draft model of speculative decoding, in the executor: a small model with the target's tokenizer proposes
k tokens greedily, on the same GPU, in its own graphs, straight into the shared input-ids buffer, so that the
target's verify step reads them there and no proposal crosses the process boundary.

The draft keeps its own KV cache. Before proposing it catches up on the tokens it has not seen (the ones the
target accepted beyond the draft's last run, or produced by plain decode steps): the JIT context names the
first such position (`draft_start`); one token runs as a decode step, up to 9 as a verify step, more as a
prefill. Then each proposal is the argmax of the draft's logits, fed back as the next decode step's token.

`DraftingRunner` puts a target runner and an optional draft behind the one step interface the JIT context
drives (`ExecutorPort`), for the executor process and for `hybridrt generate --in-process` alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graph_executor.loading.loader import LoadedModel
from graph_executor.model import LlamaModel
from graph_executor.runner import ModelRunner, check_verify
from ipc.errors import HybridrtError
from ipc.messages import PromptChunk
from ipc.step_buffers import MAX_VERIFY_TOKENS, TOKEN_RING, StepBuffers


def check_draft(draft: LoadedModel, target: LoadedModel) -> None:
    """HybridrtError (one line) unless the draft can propose for the target: its token ids must be the target's."""
    dv, tv = draft.model.config.vocab_size, target.model.config.vocab_size
    if dv > tv:
        raise HybridrtError(f"draft model {draft.name} has a vocabulary of {dv} tokens, more than the target's "
                            f"{tv}: it needs the target's tokenizer")
    if draft.model.max_context < target.model.max_context:
        raise HybridrtError(f"draft model {draft.name} holds a context of {draft.model.max_context} tokens, less "
                            f"than the target's {target.model.max_context}")


class DraftProposer:
    def __init__(self, model: LlamaModel, input_ids: torch.Tensor, graphs: bool = True) -> None:
        self.model = model
        device = model.embed_tokens.device
        vocab = model.config.vocab_size

        def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        # The draft reads the shared input ids (the target's prompt and tokens) and writes its proposals there.
        buffers = StepBuffers(input_ids=input_ids, next_token=zeros(1, dtype=torch.int64), logits=zeros(vocab),
                              batch_logits=zeros(1, vocab), verify_logits=zeros(MAX_VERIFY_TOKENS, vocab),
                              token_ring=zeros(TOKEN_RING, dtype=torch.int64))
        self.graphs = None
        if device.type == "cuda" and graphs:
            from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

            self.graphs = GraphRunner(model, buffers, accepts=False, argmax_graph=False)  # its decodes sample nothing
        self.runner = self.graphs if self.graphs is not None else ModelRunner(model, buffers)

    @torch.inference_mode()
    def propose(self, start: int, position: int, num_proposals: int) -> None:
        """Run the draft over input_ids[start:position + 1] (what it has not seen, up to the last accepted token),
        then write num_proposals greedy tokens into input_ids[position + 1:position + 1 + num_proposals]."""
        if not 0 <= start <= position:
            raise ValueError(f"draft_start {start} must be in [0, position {position}]")
        check_verify(self.runner.max_context, position, num_proposals + 1)
        r, b = self.runner, self.runner.buffers
        n = position - start + 1
        if n == 1:
            b.next_token.copy_(b.input_ids[position:position + 1])
            r.decode(position)
            row = b.logits
        elif n <= MAX_VERIFY_TOKENS:
            r.verify(start, n)
            row = b.verify_logits[n - 1]
        else:
            r.prefill(n, start)
            row = b.logits
        for j in range(num_proposals):
            if j:
                r.decode(position + j)  # consumes the previous proposal
                row = b.logits
            torch.argmax(row, dim=0, keepdim=True, out=b.next_token)
            b.input_ids[position + 1 + j:position + 2 + j].copy_(b.next_token)


class DraftingRunner:
    """A target runner (ModelRunner or GraphRunner) and an optional draft, as one `ExecutorPort`."""

    def __init__(self, runner, draft: DraftProposer | None = None) -> None:
        self.runner = runner
        self.draft = draft
        self.buffers = runner.buffers
        self.max_context = runner.max_context

    def prefill(self, num_tokens: int, start_pos: int = 0, slot: int = 0) -> None:
        self.runner.prefill(num_tokens, start_pos, slot)

    def score_prompt(self, num_tokens: int, start_pos: int, slot: int, logprobs: int, scored: int) -> list[float]:
        """A prefill that also scores its first `scored` rows (`ipc.messages.ScorePrompt`); the values at once."""
        return self.runner.score_prompt(num_tokens, start_pos, slot, logprobs, scored)

    def decode(self, position: int, argmax: bool = False, own_input: bool = False) -> None:
        self.runner.decode(position, argmax, own_input)

    def decode_batch(self, slots: list[int], positions: list[int], chunks: Sequence[PromptChunk] = ()) -> None:
        self.runner.decode_batch(slots, positions, chunks)

    def wait_enqueued(self) -> None:
        """In-process steps are enqueued when they return: nothing to wait for."""

    def verify(self, position: int, num_tokens: int, draft_start: int | None = None, tokens: list[int] | None = None,
               accept: bool = False) -> None:
        """A verify step of num_tokens at `position`; with draft_start, the draft first proposes its
        num_tokens - 1 tokens after the one at `position` (see DraftProposer.propose); `tokens` and `accept` as
        ModelRunner.verify."""
        if draft_start is not None:
            if self.draft is None:
                raise HybridrtError("this executor has no draft model (start it with --draft-model)")
            if tokens is not None:
                raise ValueError("a verify step's ids come from the draft or from the command, not both")
            self.draft.propose(draft_start, position, num_tokens - 1)
        self.runner.verify(position, num_tokens, tokens, accept)

    def wait_accepted(self) -> list[int]:
        return self.runner.wait_accepted()

    def capture_next(self) -> str | None:
        """Capture the target's next pending graph, then the draft's; None when both are done (or eager)."""
        for name, owner in (("", self.runner), ("draft ", self.draft.graphs if self.draft else None)):
            capture = getattr(owner, "capture_next", None)
            if capture is not None:
                done = capture()
                if done is not None:
                    return name + done
        return None

    def facts(self) -> dict:
        facts = self.runner.facts() if hasattr(self.runner, "facts") else {}
        if self.draft is not None and self.draft.graphs is not None:
            facts = {**facts, "draft": self.draft.graphs.facts()}
        return facts
