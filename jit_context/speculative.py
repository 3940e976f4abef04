"""Speculative decoding in the JIT context: propose k tokens, have the executor verify them in one step
(`Verify`: k + 1 positions, k + 1 logits rows, one CUDA graph per k), accept on the device (`acceptance.accept`),
stream every accepted token.

Proposals come from the n-gram proposer (host) or from a draft model that the executor runs right before the
verify step, writing its proposals into the shared input ids (no extra round trip; `graph_executor.draft`).

The loop has two modes. While proposals pay, it runs verify steps; each needs the accepted tokens on the host
before the next proposal (one device-to-host read per step, which the plain loop avoids). A greedy request's
acceptance runs in the executor, which answers the verify with its result once it has run; a sampled one's here.
While there is nothing to propose, or the adaptive k is 0, it runs plain decode steps pipelined exactly as
`Generator` does (the host reads token t while the device computes step t + 1, and on a GPU t + 2: `decode_ahead`),
asking the proposer after each token it reads (a hash lookup); a proposal then costs one drain of the pipeline.
So open-ended text, where n-grams rarely repeat, runs at the plain loop's speed.

Adaptive k: the acceptance rate a (per proposed token, a moving average) predicts (1 - a^(k+1)) / (1 - a)
tokens from a verify of k proposals, whose cost relative to a decode step is modelled as 1 + overhead +
slope * k (measured per device kind, `VERIFY_COSTS`; plus the draft's steps). k is the value that maximises
tokens per cost; when no k beats a plain step, speculation pauses for a back-off of tokens that doubles while
it keeps failing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ipc.step_buffers import MAX_SPECULATIVE_TOKENS
from jit_context.acceptance import accept
from jit_context.proposers import NgramProposer
from jit_context.speculative_config import SpeculativeConfig

if TYPE_CHECKING:  # the generator imports this module
    from jit_context.generator import Chunk, Generator, RequestOutput

class AdaptiveK:
    """The number of proposals to verify next, from the recent acceptance rate."""

    PRIOR = 0.8  # acceptance rate assumed before a request's first verify: optimistic, so that it gets measured
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
        if not c.adaptive:
            return c.num_tokens
        best_k, best = 0, 1.0
        for k in range(1, c.num_tokens + 1):
            value = (1 - a ** (k + 1)) / (1 - a) / (1 + c.cost.overhead + (c.cost.slope + c.draft_cost) * k)
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
    `Generator.generate` yields, one Chunk per token.

    The host-known sequence (prompt + output) is the proposer's: tokens join it when the host reads them, before
    they are streamed, so that the next step can be launched first and the device computes while the host
    detokenizes and checks stop strings (a step launched for a request that then stops is discarded, as the
    plain loop discards its steps in flight)."""

    def __init__(self, gen: Generator, config: SpeculativeConfig, out: RequestOutput, prompt_ids: list[int]) -> None:
        self.config, self.out = config, out
        self.gen, self.port, self.sampler, self.reader = gen, gen.port, gen.sampler, gen.reader
        self.buffers = gen.port.buffers
        self.proposer = NgramProposer(config.ngram_min, config.ngram_max)  # also the host-known sequence
        self.proposer.reset(prompt_ids)
        self.drafting = config.method == "draft"
        if not self.drafting:  # built while the prefill runs: the prompt's n-grams are indexed meanwhile
            self.proposer.prepare()
        self.draft_end = 0  # the draft's KV cache matches the sequence before this position
        self.k = AdaptiveK(config)
        self.stats = SpecStats(accepted_per_position=[0] * config.num_tokens)
        # A greedy request without a penalty is accepted in the executor, right after its verify step (no GPU work
        # of ours between two verify steps: `Verify.accept`); any other here (`acceptance.accept`).
        self.accepting = self.sampler.plain_greedy
        # and its plain decode steps' tokens are taken by the executor too (Generator.executor_argmax)
        self.executor_argmax = gen.takes_executor_argmax()
        self.cuda = self.buffers.input_ids.device.type == "cuda"
        self._host = torch.zeros(MAX_SPECULATIVE_TOKENS + 2, dtype=torch.int64, pin_memory=self.cuda)
        self._done = torch.cuda.Event() if self.cuda else None
        self._ends = set(out.params.stop_token_ids) | (set() if out.params.ignore_eos else set(out.eos))

    @property
    def length(self) -> int:
        """Tokens the host knows (prompt + output read so far); the last one is not in the KV cache yet."""
        return len(self.proposer.tokens)

    @property
    def produced(self) -> int:
        return self.length - self.out.prompt_len

    def _budget(self) -> int:
        """The most proposals the next verify may carry: its tokens stay within max_tokens and the context."""
        return min(MAX_SPECULATIVE_TOKENS, self.out.params.max_tokens - self.produced - 1,
                   self.port.max_context - self.length)

    def _k(self) -> int:
        if self.sampler.banning:  # min_tokens: only the sampler's own draw keeps the end tokens out
            return 0
        return min(self.k.k(), self._budget()) if self.k.allowed(self.produced) else 0

    def _launch(self) -> int:
        """Enqueue the next step after the host-known sequence: a verify of k proposals (returns k), or with none
        a plain decode of the last token (returns 0). n-gram proposals are written with the last token; a draft
        model writes its own on the device, after it has run over the tokens it has not seen (written here)."""
        seq, position = self.proposer.tokens, self.length - 1
        k = self._k()
        if self.drafting and k >= 1:
            self.gen.write_ids(seq[self.draft_end:], self.draft_end)  # input_ids[draft_end:position + 1]
            self.port.verify(position, k + 1, draft_start=self.draft_end, accept=self.accepting)
            return k
        proposals = self.proposer.propose(k) if k >= 1 and not self.drafting else []
        if proposals:  # the executor writes them to input_ids[position:position + k + 1]
            self.port.verify(position, len(proposals) + 1, tokens=[seq[-1], *proposals], accept=self.accepting)
        else:  # consumes next_token, the last token (written by a verify, a sampling or the prefill's first draw)
            self.port.decode(position, argmax=self.executor_argmax)
        return len(proposals)

    def _continues(self, tokens: list[int]) -> bool:
        """Whether the request surely goes on after these tokens (no stop or EOS id among them, room left); a stop
        string can still end it, which only wastes a launched step."""
        return (not self._ends.intersection(tokens) and self.produced < self.out.params.max_tokens
                and self.length < self.port.max_context)

    def run(self, start: float) -> Iterator[Chunk]:
        """From the prefill's logits (enqueued) to the request's end."""
        out = self.out
        self.reader.reset()
        self.port.wait_enqueued()
        out.prefill_enqueued_ms = (time.perf_counter() - start) * 1e3
        token = self.sampler.sample(self.buffers.logits, out=self.buffers.token)  # [1]
        self.sampler.observe(token)
        self.reader.push(token)
        first = self.reader.pop()
        self.proposer.extend([first])
        launched = self._launch() if self._continues([first]) else None
        yield out.add(first)
        while not out.finish:
            if launched is None:
                launched = self._launch()
            if launched:
                launched = yield from self._verify(launched)
            else:  # a plain decode step is in flight
                launched = None
                yield from self._plain()

    def _verify(self, k: int) -> Iterator[Chunk]:
        """Accept from the verify step of k proposals in flight; launch the next step, then yield the accepted
        tokens and the added one. Returns what the next launch returned (None: nothing launched). next_token
        holds the last output token afterwards."""
        position = self.length - 1
        if self.accepting:  # the executor accepted, wrote next_token, and answered with the result
            values = self.port.wait_accepted()
        else:
            self.port.wait_enqueued()
            result = accept(self.sampler, self.buffers.verify_logits[:k + 1],
                            self.buffers.input_ids[position + 1:position + k + 1])  # [k + 2]
            torch.index_select(result, 0, result[k + 1:], out=self.buffers.token)  # the added token
            values = self._read(result)
        accepted = values[k + 1]
        emitted = values[:accepted + 1]
        self.sampler.observe_ids(emitted)
        self.proposer.extend(emitted)
        self.k.update(k, accepted, self.produced)
        if self.drafting:  # it ran on position .. position + k - 1: right up to the last accepted proposal
            self.draft_end = min(position + accepted, position + k - 1) + 1
        launched = self._launch() if self._continues(emitted) else None  # the device idles until this
        self.stats.drafts += 1
        self.stats.draft_tokens += k
        self.stats.accepted_tokens += accepted
        for j in range(accepted):
            self.stats.accepted_per_position[j] += 1
        for t in emitted:
            yield self.out.add(t)
            if self.out.finish:
                break
        return launched

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
        """Plain decode steps from the one launched, pipelined as in `Generator.generate` (the host reads a token
        once the decode that consumes it, and the generator's `decode_ahead` - 1 after it, are enqueued), until the
        request ends or the proposer matches; then the steps in flight are drained (their tokens sampled and read,
        no further decode) and the caller verifies."""
        out, params, port, reader = self.out, self.out.params, self.port, self.reader
        executor_argmax = self.executor_argmax
        drain = False
        follows = False  # the first token read here comes after a verify step or the first token: not a period
        while True:
            port.wait_enqueued()
            if executor_argmax:  # the decode in flight consumed the last known-or-unread token and filed its own
                reader.push(self.buffers.ring_slot(self.length + reader.in_flight - 1))
            else:
                token = self.sampler.sample(self.buffers.logits, out=self.buffers.token)  # [1]
                self.sampler.observe(token)
                reader.push(token)
            # the sampled token sits at index self.length + unread - 1 (the host has not read the `unread` last
            # ones); it is the last one if it fills max_tokens or the context
            unread = reader.in_flight
            last = self.produced + unread >= params.max_tokens or self.length + unread >= port.max_context
            if not (last or drain):  # consumes the token just sampled (with executor_argmax: its own, filed)
                port.decode(self.length + unread - 1, argmax=executor_argmax, own_input=executor_argmax)
            keep = 0 if last or drain else self.gen.ahead() - 1
            while reader.in_flight > keep:
                value = self.gen.read_token(follows)
                follows = True
                self.proposer.extend([value])
                yield out.add(value)
                if out.finish:
                    return
            if last or drain:
                return
            drain = self._k() > 0 and (self.drafting or bool(self.proposer.propose(1)))
