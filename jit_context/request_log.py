"""`hybridrt serve`'s log on stderr, as vLLM's: one line per finished request (id, prompt and generated tokens,
TTFT, tokens/s, finish reason) and, while requests run, the generation throughput every few seconds. `--quiet`
turns both off (the JIT context then gets no log)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

STATS_INTERVAL_S = 5.0


class RequestLog:
    def __init__(self, interval_s: float = STATS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self.clock = clock
        self.generated = 0  # tokens streamed since the last throughput line
        self.since = clock()

    def finished(self, request_id: str, reason: str, prompt_tokens: int, completion_tokens: int, ttft_ms: float,
                 tokens_per_s: float, cached_tokens: int = 0) -> None:
        reused = f" ({cached_tokens} reused from the KV cache)" if cached_tokens else ""
        _say(f"request {request_id} finished ({reason}): {prompt_tokens} prompt{reused} + {completion_tokens} "
             f"generated tokens, TTFT {ttft_ms:.1f} ms, {tokens_per_s:.1f} tokens/s")

    def failed(self, request_id: str, code: str) -> None:
        _say(f"request {request_id} failed ({code})")

    def streamed(self, tokens: int) -> None:
        self.generated += tokens

    def tick(self, running: int, waiting: int) -> None:
        """Each turn of the serving loop: a throughput line every interval_s while anything ran or waits."""
        now = self.clock()
        if now - self.since < self.interval_s:
            return
        if self.generated or running or waiting:
            _say(f"generation throughput {self.generated / (now - self.since):.1f} tokens/s, {running} running, "
                 f"{waiting} waiting")
        self.generated, self.since = 0, now


def _say(line: str) -> None:
    print(f"jit_context: {line}", file=sys.stderr, flush=True)
