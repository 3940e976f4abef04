"""The executor's step interface: static buffers allocated once, and prefill/decode steps that fill `logits`.

The JIT context writes prompt ids into `input_ids` and the sampled token into `next_token`, and reads `logits`;
the buffers never move, so they can be shared across processes (shared memory on CPU, CUDA IPC on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_executor.model import LlamaModel

# Prompt tokens per forward pass: bounds the activation memory of long prompts (chunked prefill).
PREFILL_CHUNK = 1024


@dataclass(frozen=True)
class StepBuffers:
    input_ids: torch.Tensor  # [max_context] int64: prompt tokens of a prefill, from index 0
    next_token: torch.Tensor  # [1] int64: the token a decode step consumes (written by the sampler)
    logits: torch.Tensor  # [vocab] float32: logits of the last position of the last step

    @classmethod
    def allocate(cls, vocab_size: int, max_context: int, device: torch.device) -> StepBuffers:
        return cls(
            input_ids=torch.zeros(max_context, dtype=torch.int64, device=device),
            next_token=torch.zeros(1, dtype=torch.int64, device=device),
            logits=torch.zeros(vocab_size, dtype=torch.float32, device=device),
        )


class ModelRunner:
    """Runs steps of one model over its static buffers (eagerly; the GPU path adds graphs on top)."""

    def __init__(self, model: LlamaModel, buffers: StepBuffers | None = None) -> None:
        self.model = model
        device = model.embed_tokens.device
        self.buffers = buffers or StepBuffers.allocate(model.config.vocab_size, model.max_context, device)
        self._last_row = torch.zeros(1, dtype=torch.int64, device=device)  # [1]: row 0 of a decode step

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def check_span(self, start_pos: int, num_tokens: int) -> None:
        if num_tokens < 1 or start_pos < 0 or start_pos + num_tokens > self.max_context:
            raise ValueError(
                f"positions [{start_pos}, {start_pos + num_tokens}) do not fit the context of {self.max_context}"
            )

    def prefill(self, num_tokens: int, start_pos: int = 0) -> None:
        """Run input_ids[:num_tokens] at positions start_pos...; logits of the last one land in `logits`."""
        self.check_span(start_pos, num_tokens)
        device = self.buffers.input_ids.device
        for chunk_start in range(0, num_tokens, PREFILL_CHUNK):
            chunk_end = min(chunk_start + PREFILL_CHUNK, num_tokens)
            ids = self.buffers.input_ids[chunk_start:chunk_end]  # [t]
            positions = torch.arange(start_pos + chunk_start, start_pos + chunk_end, device=device)  # [t]
            last = torch.full((1,), chunk_end - chunk_start - 1, dtype=torch.int64, device=device)
            logits = self.model(ids, positions, last, start_pos + chunk_end)  # [1, V]
        self.buffers.logits.copy_(logits[0])

    def wait_enqueued(self) -> None:
        """In-process steps are enqueued when prefill/decode return: nothing to wait for."""

    def decode(self, position: int) -> None:
        """Run `next_token` at `position`; its logits land in `logits`."""
        self.check_span(position, 1)
        positions = torch.full((1,), position, dtype=torch.int64, device=self.buffers.next_token.device)
        logits = self.model(self.buffers.next_token, positions, self._last_row, position + 1)  # [1, V]
        self.buffers.logits.copy_(logits[0])
