"""Serving metrics of the JIT context: request, token and latency counters for `/metrics` (Prometheus).

Updated once per finished request (never per token on the hot path); read through the status message as a
plain dict, so the HTTP process renders it without touching this one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ipc.messages import FinishReason

FAILED = "error"  # a request answered with an `Error` (it has no finish reason)
OUTCOMES = (*FinishReason.ALL, FAILED)  # the `finished_reason` label values of /metrics

# Bucket upper bounds in seconds, as vLLM's histograms for the same figures.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; one more for +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1  # le semantics: value <= bound
        self.total += value

    def snapshot(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.total}


@dataclass
class ServingMetrics:
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    errors: dict[str, int] = field(default_factory=dict)  # Error replies to clients, by code
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens not prefilled: the KV cache held them (prefix reuse)
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    # speculative decoding, as vLLM's spec_decode counters: verify steps, proposals, accepted proposals (in
    # total and by their index within a verify step)
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)

    def record(self, finish_reason: str, prompt_tokens: int, token_times_ms: list[float], e2e_s: float,
               speculation: dict | None = None, cached_prompt_tokens: int = 0) -> None:
        """One finished request: its outcome (one of OUTCOMES), prompt size, each token's time since arrival, what
        its speculation did (`SpecStats.as_dict()`, None when it did not speculate), and how many of its prompt
        tokens the KV cache already held."""
        if finish_reason not in OUTCOMES:
            raise ValueError(f"unknown request outcome {finish_reason!r}; one of {OUTCOMES}")
        self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.cached_prompt_tokens += cached_prompt_tokens
        self.generation_tokens += len(token_times_ms)
        if token_times_ms:
            self.ttft.observe(token_times_ms[0] / 1e3)
        for before, after in zip(token_times_ms, token_times_ms[1:]):
            self.time_per_output_token.observe((after - before) / 1e3)
        self.e2e_latency.observe(e2e_s)
        if speculation:
            self.spec_drafts += speculation["num_drafts"]
            self.spec_draft_tokens += speculation["num_draft_tokens"]
            self.spec_accepted_tokens += speculation["num_accepted_tokens"]
            per = speculation["accepted_per_position"]
            if len(per) > len(self.spec_accepted_per_position):
                self.spec_accepted_per_position += [0] * (len(per) - len(self.spec_accepted_per_position))
            for i, n in enumerate(per):
                self.spec_accepted_per_position[i] += n

    def record_error(self, code: str) -> None:
        """One `Error` reply sent to a client (a bad frame, an invalid request, a failed generation)."""
        self.errors[code] = self.errors.get(code, 0) + 1

    def snapshot(self, running: int, waiting: int) -> dict:
        return {"running": running, "waiting": waiting, "finished": dict(self.finished), "errors": dict(self.errors),
                "prompt_tokens": self.prompt_tokens, "cached_prompt_tokens": self.cached_prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "ttft_s": self.ttft.snapshot(), "time_per_output_token_s": self.time_per_output_token.snapshot(),
                "e2e_latency_s": self.e2e_latency.snapshot(),
                "spec_decode": {"num_drafts": self.spec_drafts, "num_draft_tokens": self.spec_draft_tokens,
                                "num_accepted_tokens": self.spec_accepted_tokens,
                                "accepted_per_position": list(self.spec_accepted_per_position)}}
