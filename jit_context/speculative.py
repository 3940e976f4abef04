"""Speculative decoding in the JIT context: propose k tokens, have the executor verify them in one step
(`Verify`: k + 1 positions, k + 1 logits rows, one CUDA graph per k), accept on the device (`acceptance.accept`),
stream every accepted token.

The loop has two modes. While proposals pay, it runs verify steps; each needs the accepted tokens on the host
before the next proposal (one device-to-host read per step, which the plain loop avoids). While there is
nothing to propose, or the adaptive k is 0, it runs plain decode steps pipelined exactly as `Generator` does
(the host reads token t while the device computes step t + 1), asking the proposer after each token (a hash
lookup); a proposal then costs one drain of the pipeline. So open-ended text, where n-grams rarely repeat,
runs at the plain loop's speed.

Adaptive k: the acceptance rate a (per proposed token, a moving average) predicts (1 - a^(k+1)) / (1 - a)
tokens from a verify of k proposals, whose cost relative to a decode step is modelled as 1 + overhead +
slope * k. k is the value that maximises tokens per cost; when no k beats a plain step, speculation pauses for
a back-off of tokens that doubles while it keeps failing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ipc.step_buffers import MAX_SPECULATIVE_TOKENS
from jit_context.acceptance import accept
from jit_context.proposers import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, NgramProposer

if TYPE_CHECKING:  # the generator imports this module
    from jit_context.generator import Chunk, Generator, _Output

METHODS = ("off", "ngram")
DEFAULT_METHOD = "off"  # the committed bench decides (README): see bench/NOTES.md, issue 11


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a JIT context speculates; `method` "off" is plain decoding."""

    method: str = DEFAULT_METHOD
    num_tokens: int = 4  # the most proposals per verify step (adaptive k stays at or below it)
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    # Cost of a verify step of k proposals relative to a decode step: 1 + overhead + slope * k (the H200
    # measurements in bench/NOTES.md; the host's read of the accepted tokens is most of the overhead).
    overhead: float = 0.1
    slope: float = 0.03

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 1 <= self.num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}, got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"n-gram sizes need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.overhead < 0 or self.slope < 0:
            raise ValueError("the verify cost model's overhead and slope must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def argv(self) -> list[str]:
        """As the JIT context process's flags (the inverse of `launch.options.speculative_config`)."""
        return ["--speculative", self.method, "--num-speculative-tokens", str(self.num_tokens),
                "--ngram-min", str(self.ngram_min), "--ngram-max", str(self.ngram_max)]


class AdaptiveK:
    """The number of proposals to verify next, from the recent acceptance rate."""

    PRIOR = 0.6  # acceptance rate assumed before a request's first verify
    WEIGHT = 0.3  # of the newest step in the moving average
    BACKOFF_MIN, BACKOFF_MAX = 8, 256  # plain tokens before speculating again after it stopped paying

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.rate = self.PRIOR
        self.backoff = self.BACKOFF_MIN
        self.paused_until = 0  # output length before which no proposal is asked for

    def k(self) -> int:
        """The k in 0..num_tokens that maximises expected tokens per unit of step cost (0: a plain step)."""
        a, c = min(self.rate, 0.999), self.config
        best_k, best = 0, 1.0
        for k in range(1, c.num_tokens + 1):
            value = (1 - a ** (k + 1)) / (1 - a) / (1 + c.overhead + c.slope * k)
            if value > best:
                best_k, best = k, value
        return best_k

    def allowed(self, produced: int) -> bool:
        return produced >= self.paused_until

    def update(self, proposed: int, accepted: int, produced: int) -> None:
        """After a verify of `proposed` tokens that kept `accepted`; `produced` = output tokens so far."""
        self.rate = (1 - self.WEIGHT) * self.rate + self.WEIGHT * accepted / proposed
        if accepted:
            self.backoff = self.BACKOFF_MIN
        if self.k() == 0:  # pause, and look again later with the average where it stood
            self.paused_until = produced + self.backoff
            self.backoff = min(2 * self.backoff, self.BACKOFF_MAX)
            self.rate = max(self.rate, self.PRIOR)


@dataclass
class SpecStats:
    """What one request's speculation did (vLLM's spec_decode counters, per request)."""

    drafts: int = 0  # verify steps
    draft_tokens: int = 0  # proposals verified
    accepted_tokens: int = 0  # proposals kept
    accepted_per_position: list[int] | None = None  # [num_tokens]: kept proposals by their index in a draft

    def as_dict(self) -> dict:
        rate = self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0
        return {"num_drafts": self.drafts, "num_draft_tokens": self.draft_tokens,
                "num_accepted_tokens": self.accepted_tokens, "acceptance_rate": round(rate, 4),
                "accepted_per_position": list(self.accepted_per_position or [])}


class SpeculativeLoop:
    """The decode loop of one request with speculation (see the module docstring); yields what the plain loop of
    `Generator.generate` yields, one Chunk per token."""

    def __init__(self, gen: Generator, config: SpeculativeConfig, out: _Output, prompt_ids: list[int]) -> None:
        self.gen, self.config, self.out = gen, config, out
        self.port, self.sampler, self.reader = gen.port, gen.sampler, gen.reader
        self.buffers = gen.port.buffers
        self.proposer = NgramProposer(config.ngram_min, config.ngram_max)
        self.proposer.reset(prompt_ids)
        self.k = AdaptiveK(config)
        self.stats = SpecStats(accepted_per_position=[0] * config.num_tokens)
        self.cuda = self.buffers.input_ids.device.type == "cuda"
        self._host = torch.zeros(MAX_SPECULATIVE_TOKENS + 2, dtype=torch.int64, pin_memory=self.cuda)
        self._done = torch.cuda.Event() if self.cuda else None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far (prompt + output); the last one is not in the KV cache yet."""
        return self.out.prompt_len + len(self.out.token_ids)

    def _budget(self) -> int:
        """The most proposals the next verify may carry: its tokens stay within max_tokens and the context."""
        out, params = self.out, self.out.params
        return min(MAX_SPECULATIVE_TOKENS, params.max_tokens - len(out.token_ids) - 1,
                   self.port.max_context - self.length)

    def _proposals(self) -> list[int]:
        if not self.k.allowed(len(self.out.token_ids)):
            return []
        k = min(self.k.k(), self._budget())
        return self.proposer.propose(k) if k >= 1 else []

    def run(self, start: float) -> Iterator[Chunk]:
        """From the prefill's logits (enqueued) to the request's end."""
        out = self.out
        self.reader.reset()
        self.port.wait_enqueued()
        out.prefill_enqueued_ms = (time.perf_counter() - start) * 1e3
        token = self.sampler.sample(self.buffers.logits, out=self.buffers.next_token)  # [1]
        self.sampler.observe(token)
        self.reader.push(token)
        first = self.reader.pop()
        self.proposer.extend([first])
        yield out.add(first)
        while not out.finish:
            proposals = self._proposals()
            if proposals:
                yield from self._verify(proposals)
            else:
                yield from self._plain()

    def _verify(self, proposals: list[int]) -> Iterator[Chunk]:
        """One verify step of len(proposals) tokens after the last one; yields the accepted tokens and the added
        one. next_token holds the last output token afterwards (a plain step may follow)."""
        k, position = len(proposals), self.length - 1
        tokens = [self.out.token_ids[-1], *proposals]
        self.gen.write_ids(tokens, position)  # input_ids[position:position + k + 1]
        self.port.verify(position, k + 1)
        self.port.wait_enqueued()
        result = accept(self.sampler, self.buffers.verify_logits[:k + 1],
                        self.buffers.input_ids[position + 1:position + k + 1])  # [k + 2]
        accepted_dev = result[k + 1:]
        torch.index_select(result, 0, accepted_dev, out=self.buffers.next_token)  # the last output token
        values = self._read(result)
        accepted = values[k + 1]
        emitted = values[:accepted + 1]
        self.sampler.observe_ids(emitted)
        self.stats.drafts += 1
        self.stats.draft_tokens += k
        self.stats.accepted_tokens += accepted
        for j in range(accepted):
            self.stats.accepted_per_position[j] += 1
        self.k.update(k, accepted, len(self.out.token_ids) + accepted + 1)
        self.proposer.extend(emitted)
        for t in emitted:
            yield self.out.add(t)
            if self.out.finish:
                return

    def _read(self, result: torch.Tensor) -> list[int]:
        """result [n] int64 on the device -> host ints, waiting for this copy only."""
        n = result.shape[0]
        if not self.cuda:
            return result.tolist()
        self._host[:n].copy_(result, non_blocking=True)
        self._done.record()
        self._done.synchronize()
        return self._host[:n].tolist()

    def _plain(self) -> Iterator[Chunk]:
        """Plain decode steps, pipelined as in `Generator.generate` (decode t + 1 is enqueued before the host
        reads token t), until the request ends or the proposer matches; then the step in flight is drained (its
        token sampled and read, no further decode) and the caller verifies."""
        out, params, port = self.out, self.out.params, self.port
        port.decode(self.length - 1)  # consumes next_token, the last output token
        drain = False
        while True:
            port.wait_enqueued()
            token = self.sampler.sample(self.buffers.logits, out=self.buffers.next_token)  # [1]
            self.sampler.observe(token)
            self.reader.push(token)
            # the sampled token sits at index self.length; it is the last one if it fills max_tokens or the context
            last = len(out.token_ids) + 1 >= params.max_tokens or self.length + 1 >= port.max_context
            if not (last or drain):
                port.decode(self.length)  # consumes the token just sampled
            value = self.reader.pop()
            self.proposer.extend([value])
            yield out.add(value)
            if out.finish or last or drain:
                return
            drain = self.k.allowed(len(out.token_ids)) and self.k.k() > 0 and bool(self.proposer.propose(1))
