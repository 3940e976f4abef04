"""The per-request generation loop of the JIT context: prefill, sample, decode, stop, detokenize, stream.

It drives an executor through `ExecutorPort` (the in-process `ModelRunner`, or the IPC proxy of the
two-process runtime) and only touches the executor's shared step buffers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from jit_context.detokenizer import IncrementalDetokenizer, StopStringMatcher
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams


class StepBuffersView(Protocol):
    input_ids: torch.Tensor  # [max_context] int64
    next_token: torch.Tensor  # [1] int64
    logits: torch.Tensor  # [vocab] float32


class ExecutorPort(Protocol):
    buffers: StepBuffersView
    max_context: int

    def prefill(self, num_tokens: int, start_pos: int = 0) -> None: ...

    def decode(self, position: int) -> None: ...


class Detokenizing(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    ttft_ms: float
    tokens_per_s: float
    token_times_ms: list[float] = field(default_factory=list)  # per token, from the request start

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Generator:
    """One request at a time over one executor."""

    def __init__(self, port: ExecutorPort, tokenizer: Detokenizing | None, eos_token_ids: frozenset[int]):
        self.port = port
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler(port.buffers.logits.shape[0], port.buffers.logits.device)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.port.max_context:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the maximum context is {self.port.max_context} "
                f"(prompt plus at least one generated token)"
            )

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 start_time: float | None = None) -> Iterator[Chunk | GenerationResult]:
        """Yield one Chunk per generated token (its text may be empty while held back), then a GenerationResult."""
        start = time.perf_counter() if start_time is None else start_time
        self.check_prompt(prompt_ids)
        n = len(prompt_ids)
        self.sampler.start_request(params, prompt_ids)
        buffers = self.port.buffers
        buffers.input_ids[:n].copy_(torch.tensor(prompt_ids, dtype=torch.int64))
        self.port.prefill(n, 0)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        stops = StopStringMatcher(params.stop)
        generated: list[int] = []
        times: list[float] = []
        text_parts: list[str] = []
        finish = None
        while finish is None:
            token = self.sampler.sample(buffers.logits, out=buffers.next_token)
            self.sampler.observe(token)
            token_id = int(token)  # host sync: the GPU path replaces this by a copy one step behind
            times.append((time.perf_counter() - start) * 1e3)
            generated.append(token_id)
            finish = self._finish_reason(token_id, params, n, len(generated))
            is_stop_token = finish == "stop"
            piece = detok.add(token_id) if detok and not is_stop_token else ""
            emit, hit_stop = stops.feed(piece)
            if hit_stop:
                finish = "stop"
            text_parts.append(emit)
            yield Chunk(emit, [token_id])  # one chunk per token (text may be ''): a cancel point per step
            if finish is None:
                self.port.decode(n + len(generated) - 1)
        tail = stops.feed(detok.flush())[0] + stops.flush() if detok and not stops.stopped else ""
        if tail:
            text_parts.append(tail)
            yield Chunk(tail, [])
        yield GenerationResult("".join(text_parts), generated, finish, n, times[0], _rate(times), times)

    def _finish_reason(self, token_id: int, params: SamplingParams, prompt_len: int, generated: int) -> str | None:
        if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
            return "stop"
        if generated >= params.max_tokens or prompt_len + generated >= self.port.max_context:
            return "length"
        return None


def _rate(times_ms: list[float]) -> float:
    """Decode tokens per second: tokens after the first over the time they took."""
    if len(times_ms) < 2 or times_ms[-1] <= times_ms[0]:
        return 0.0
    return (len(times_ms) - 1) / ((times_ms[-1] - times_ms[0]) / 1e3)
