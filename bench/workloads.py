"""The timed workloads, the same for every engine: TTFT sweep, decode latency, decode latency vs context; and
two that only engines with the matching methods run: the speculative workload (chat prompts through the
tokenizer, `generate_chat`) and the verify-step cost (`verify_cost`).

An engine only has to generate greedily, ignoring EOS, and say when each token reached the host; prompts are
random token ids from a fixed seed, so every engine (in its own process) sees the same prompts.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Protocol

from bench.spec import ARRIVAL_PROMPT, ARRIVALS, DRAIN_TOKENS, TURN_NEW, TURN_PROMPT, TURN_REPLY, BenchSpec

SPEC_PROMPTS = Path(__file__).resolve().parent / "data" / "spec_prompts.json"
from bench.stats import gaps_ms, percentile, r3, token_summary, ttft_summary

ID_MARGIN = 100  # keep clear of special tokens at both ends of the vocabulary


class EngineUnavailable(Exception):
    """The runtime an engine drives is not there (yet): the run records a skip, not an error."""


class Engine(Protocol):
    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        """Greedy, EOS ignored; for each of `new_tokens` tokens, ms from the request start until the host
        held it (so entry 0 is the TTFT)."""
        ...

    def facts(self) -> dict:
        """What the engine knows about itself: versions, graph captures, compile time, ..."""
        ...

    def memory(self) -> dict:
        """Peak memory figures of the process(es) that hold the model."""
        ...

    def close(self) -> None: ...


def prompt_ids(length: int, vocab_size: int, seed: int) -> list[int]:
    """Random ids in [100, vocab - 100), one fixed sequence per (seed, length) in every process."""
    rng = random.Random(seed * 1_000_003 + length)
    hi = max(vocab_size - ID_MARGIN, ID_MARGIN + 1)
    return [rng.randrange(min(ID_MARGIN, hi - 1), hi) for _ in range(length)]


def _check(times_ms: list[float], expected: int) -> list[float]:
    if len(times_ms) != expected:
        raise RuntimeError(f"the engine returned {len(times_ms)} tokens, expected {expected}")
    return times_ms


def timed_steps(engine: Engine, prompt: list[int], steps: int) -> list[float]:
    """Token times of the first token and `steps` decode steps after it; the drain tokens are cut off."""
    return _check(engine.generate(prompt, steps + 1 + DRAIN_TOKENS), steps + 1 + DRAIN_TOKENS)[: steps + 1]


# The TTFT sweep's second series: each request after this much idle, as a chat user's comes. Back to back (the
# first series, the one every ratio uses) the H200 runs a 7B prefill of 300-500 tokens 10-15% slower than after
# even 5 ms of idle (its clocks under a sustained tensor-core load; bench/NOTES.md, thirty-seventh session), while
# the processes' threads pay more after a pause (README: ~1-1.5 ms after > 20 ms idle, two processes).
TTFT_PAUSE_S = 0.1


def ttft_sweep(engine: Engine, spec: BenchSpec) -> dict:
    """{prompt length: median/P99/min over `repeats` requests back to back, and under "after_pause" the same over
    `repeats` requests each after TTFT_PAUSE_S of idle}; one untimed run per length first (new shapes)."""
    vocab = spec.model_config["vocab_size"]
    out = {}
    for n in spec.prompt_lens:
        ids = prompt_ids(n, vocab, spec.seed)
        engine.generate(ids, 1)
        samples = [_check(engine.generate(ids, 1), 1)[0] for _ in range(spec.repeats)]
        paused = []
        for _ in range(spec.repeats):
            time.sleep(TTFT_PAUSE_S)
            paused.append(_check(engine.generate(ids, 1), 1)[0])
        out[str(n)] = {**ttft_summary(samples), "after_pause": {**ttft_summary(paused), "pause_s": TTFT_PAUSE_S}}
    return out


def decode(engine: Engine, spec: BenchSpec) -> dict:
    """Per-token gaps over `decode_tokens` steps after a `decode_prompt_len` prompt; every gap kept."""
    ids = prompt_ids(spec.decode_prompt_len, spec.model_config["vocab_size"], spec.seed)
    times = timed_steps(engine, ids, spec.decode_tokens)
    summary = token_summary(gaps_ms(times), keep=True)
    return {"prompt_len": spec.decode_prompt_len, "ttft_ms": r3(times[0]), **summary}


def context_sweep(engine: Engine, spec: BenchSpec) -> dict:
    """{context length c: per-token summary of `context_steps` steps after a c-token prompt}."""
    vocab = spec.model_config["vocab_size"]
    out = {}
    for c in spec.contexts:
        times = timed_steps(engine, prompt_ids(c, vocab, spec.seed), spec.context_steps)
        out[str(c)] = token_summary(gaps_ms(times))
    return out


def speculative(engine: Engine, spec: BenchSpec) -> dict:
    """Per prompt kind (grounded, open): tokens/s over the decode part of each chat (first token to last),
    summed over prompts; per prompt its tokens, time, acceptance and token ids (runs with and without
    speculation compare them). Engines without `generate_chat` (or without a tokenizer) are skipped."""
    run = getattr(engine, "generate_chat", None)
    if run is None:
        return {"skipped": "this engine has no chat generation"}
    prompts = json.loads(SPEC_PROMPTS.read_text())
    try:
        run([{"role": "user", "content": prompts["grounded"][0]}], 16)  # warm-up: verify and acceptance run
    except EngineUnavailable as e:
        return {"skipped": str(e)}
    out: dict = {"method": spec.speculative, "max_tokens": spec.spec_tokens}
    for kind in ("grounded", "open"):
        rows = []
        for text in prompts[kind]:
            token_ids, times_ms, stats = run([{"role": "user", "content": text}], spec.spec_tokens)
            rows.append({"tokens": len(token_ids), "ttft_ms": r3(times_ms[0]),
                         "decode_ms": r3(times_ms[-1] - times_ms[0]), "speculation": stats, "token_ids": token_ids})
        decoded = sum(r["tokens"] - 1 for r in rows)
        ms = sum(r["decode_ms"] for r in rows)
        drafted = sum((r["speculation"] or {}).get("num_draft_tokens", 0) for r in rows)
        accepted = sum((r["speculation"] or {}).get("num_accepted_tokens", 0) for r in rows)
        out[kind] = {"tokens_per_s": round(decoded / ms * 1e3, 2) if ms > 0 else None,
                     "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
                     "tokens": sum(r["tokens"] for r in rows), "prompts": rows}
    return out


def verify_cost(engine: Engine, spec: BenchSpec) -> dict:
    """Verify step of k + 1 tokens vs one decode step (engines with `verify_cost`: the executor on a GPU)."""
    measure = getattr(engine, "verify_cost", None)
    if measure is None or not spec.on_gpu:
        return {"skipped": "needs hybridrt-executor on a GPU"}
    return measure()


def chat(engine: Engine, spec: BenchSpec) -> dict:
    """TTFT of a short and a long chat sent as text (engines with `chat_ttft`: the server's chat template and
    tokenizer are in the time), one untimed run each first; median/P99/min over `repeats`. An engine with a second
    client (`chat_ttft_http_client`: the HTTP API through the standard library's client) runs each chat through
    both in turn, reported as "<kind>_http_client"."""
    run = getattr(engine, "chat_ttft", None)
    if run is None:
        return {"skipped": "this engine takes no chats"}
    lean = getattr(engine, "chat_ttft_http_client", None)
    long_text = json.loads(SPEC_PROMPTS.read_text())["grounded"][0]
    chats = {"short": [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "Name three primary colours."}],
             "long": [{"role": "user", "content": long_text}]}
    out = {}
    for name, messages in chats.items():
        try:
            run(messages)
            if lean is not None:
                lean(messages)
        except EngineUnavailable as e:
            return {"skipped": str(e)}
        times: dict[str, list[float]] = {name: [], f"{name}_http_client": []}
        for _ in range(spec.repeats):  # the two clients alternate: the same server state for both
            times[name].append(run(messages))
            if lean is not None:
                times[f"{name}_http_client"].append(lean(messages))
        out.update({key: ttft_summary(values) for key, values in times.items() if values})
    return out


def concurrency(engine: Engine, spec: BenchSpec) -> dict:
    """N = --max-num-seqs streams at once on one server (engines with `run_concurrent`), against one stream alone on
    the same server; then a 100-token prompt arriving while N - 1 streams decode."""
    run = getattr(engine, "run_concurrent", None)
    if run is None or spec.max_num_seqs < 2:
        return {"skipped": "needs the hybridrt engine and --max-num-seqs >= 2"}
    n, steps, vocab = spec.max_num_seqs, spec.decode_tokens, spec.model_config["vocab_size"]
    prompts = [prompt_ids(spec.decode_prompt_len, vocab, spec.seed + i) for i in range(n)]
    want = steps + 1 + DRAIN_TOKENS
    run([(prompts[0], 4, 0.0)] * 1)  # untimed: the server's first request of this shape
    alone = _check(run([(prompts[0], want, 0.0)])[0], want)[: steps + 1]
    together = [_check(t, want)[: steps + 1] for t in run([(p, want, 0.0) for p in prompts])]
    single = token_summary(gaps_ms(alone))
    streams = [token_summary(gaps_ms(t)) for t in together]
    wall_ms = max(t[-1] for t in together)  # every stream started at once
    out = {"streams": n, "tokens_per_stream": steps + 1, "single": single, "per_stream": streams,
           "worst_p50_ratio": round(max(s["p50_ms"] for s in streams) / single["p50_ms"], 3),
           "single_tokens_per_s": round((steps + 1) / alone[-1] * 1e3, 2),
           "aggregate_tokens_per_s": round(n * (steps + 1) / wall_ms * 1e3, 2)}
    out["aggregate_vs_single"] = round(out["aggregate_tokens_per_s"] / out["single_tokens_per_s"], 3)
    # The same once every stream decodes (from the last stream's first token to the last token, against one stream
    # from its first token): without the prompts' start, which N prompts arriving at once pay one after the other.
    since = max(t[0] for t in together)
    after = sum(sum(1 for x in t if x > since) for t in together)
    out["decode_phase_tokens_per_s"] = round(after / (wall_ms - since) * 1e3, 2) if wall_ms > since else 0.0
    out["decode_phase_vs_single"] = round(out["decode_phase_tokens_per_s"] / (steps / (alone[-1] - alone[0]) * 1e3),
                                          3) if alone[-1] > alone[0] else 0.0
    # The arrival: idle TTFTs of 100-token prompts, then as many arriving while n - 1 streams decode; a prompt of its
    # own each time (with --prefix-reuse a repeated one would find itself in a slot's cache).
    arrivals = max(ARRIVALS, spec.repeats)
    idle = [run([(prompt_ids(ARRIVAL_PROMPT, vocab, spec.seed + 1000 + r), 1, 0.0)])[0][0] for r in range(arrivals)]
    busy_ttft, worst_gap, running_p50 = [], [], []
    for r in range(arrivals):
        arriving = prompt_ids(ARRIVAL_PROMPT, vocab, spec.seed + 2000 + r)
        # The others are past their prefill and decoding by then; each arrival lands at another point of their
        # decode step (offsets spread over one step): the TTFT depends on how much of the step in flight is left.
        delay_s = (alone[0] + (8 + r / arrivals) * single["p50_ms"]) / 1e3
        times = run([(p, want, 0.0) for p in prompts[: n - 1]] + [(arriving, 1, delay_s)])
        first = times[-1][0]
        busy_ttft.append(first)
        window = (delay_s * 1e3, delay_s * 1e3 + first)  # while the arriving prompt was prefilled
        for t in times[:-1]:
            gaps = gaps_ms(t)
            running_p50.append(token_summary(gaps)["p50_ms"])
            worst_gap.append(max((g for a, g in zip(t[1:], gaps) if window[0] <= a <= window[1] + g), default=0.0))
    out["arrival"] = {"prompt_tokens": ARRIVAL_PROMPT, "running": n - 1, "idle_ttft": ttft_summary(idle),
                      "busy_ttft": ttft_summary(busy_ttft),
                      "ttft_ratio": round(percentile(busy_ttft, 50) / percentile(idle, 50), 3),
                      "running_p50_ms": r3(percentile(running_p50, 50)), "worst_gap_ms": r3(max(worst_gap)),
                      "worst_gap_ratio": round(max(worst_gap) / percentile(running_p50, 50), 3)}
    return out


TURN_REPEATS = 9  # H200 7B: 3 second turns spread 6.33-6.75 ms (a median of 3 moved the ratio 1.12 <-> 1.25x)


def turns(engine: Engine, spec: BenchSpec) -> dict:
    """A chat's second turn against a fresh short prompt (engines that report their reply's ids: the hybridrt one).
    Each repeat is a new conversation (its own first turn), so the cache holds exactly that turn when the second
    comes."""
    if not hasattr(engine, "last_token_ids"):
        return {"skipped": "needs the hybridrt engine"}
    vocab = spec.model_config["vocab_size"]
    repeats = max(TURN_REPEATS, spec.repeats)
    short = [engine.generate(prompt_ids(TURN_NEW, vocab, spec.seed + 3000 + r), 1)[0] for r in range(repeats + 1)][1:]
    second, reused = [], []
    for r in range(repeats + 1):  # the first conversation is untimed (its shapes' first run)
        first = prompt_ids(TURN_PROMPT, vocab, spec.seed + 4000 + r)
        engine.generate(first, TURN_REPLY)
        follow = first + engine.last_token_ids + prompt_ids(TURN_NEW, vocab, spec.seed + 5000 + r)
        ttft = engine.generate(follow, 1)[0]
        if r:
            second.append(ttft)
            reused.append(engine.last_server_timings.get("cached_prompt_tokens", 0))
    return {"prefix_reuse": spec.prefix_reuse, "second_turn_tokens": TURN_PROMPT + TURN_REPLY + TURN_NEW,
            "short_tokens": TURN_NEW, "second_turn_ttft": ttft_summary(second), "short_ttft": ttft_summary(short),
            "ratio": round(percentile(second, 50) / percentile(short, 50), 3), "cached_prompt_tokens": reused}


TIMED_WORKLOADS = {"ttft": ttft_sweep, "decode": decode, "context": context_sweep, "speculative": speculative,
                   "verify": verify_cost, "chat": chat, "concurrency": concurrency,
                   "turns": turns}
