"""When a client waits for its server's next message by spinning instead of sleeping (issue 12: the hop to the client).

A client that sleeps in a poll pays a thread wake-up for every message: ZeroMQ's I/O thread receives the frame, then
wakes the waiting thread through its mailbox. Measured with `bench.probes.socket_hop` (40-byte round trips, P50):
106 us blocking against 39 us with the client spinning on the CPU machine; a ZeroMQ hop on the H200 host was
0.3-0.6 ms. Every TTFT through a client crosses one such hop to the client (the first token), and every token after
it one more.

Spinning holds a core, and it pays only where the answers come fast and a core is spare:
- **The server decides whether its clients spin** (`Started.spin_ms`, `server_spin_ms`): a server on a GPU answers
  every 0.5-15 ms, and a machine of `MIN_SPARE_CORES` or more has a core for the client beside the JIT context's and
  the executor's spinning ones. A server on the CPU says 0: its torch threads use every core, and a spinning client
  would take one from them. Measured on the 2-core CPU machine with a 2-layer model (steps of ~1.4 ms, so the rule
  below kept spinning; `bench.probes.client_spin`): client TTFT 10.8 ms spinning against 3.8 sleeping, the JIT
  context's own TTFT 4.7 against 2.0.
- **Within a request**, a wait spins for up to the window, and only while the last wait ended within it: a long
  prompt's prefill is waited for by sleeping after the first wait that outlasts the window. A wait that sleeps is
  still timed, so spinning resumes once the answers come fast again.
- **One spinning wait per process** (`ProcessWaits`): a thread that spins holds the GIL between its non-blocking reads,
  so every other thread of its process that needs it (another client's wait that its message woke, a thread about to
  send the next request) waits the interpreter's switch interval (5 ms) for each turn. Measured on the H200 (cuda
  test `test_gpu_concurrent_requests_get_their_tokens_alone`): 8 clients on 8 threads of one process, all spinning,
  reached the server one at a time (at most 1 request running, against 4 slots). A wait spins only while it is the
  only wait in progress in its process, and stops spinning as soon as another one starts.
A client's own `spin_ms` overrides the server's (0: always sleep).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

DEFAULT_SPIN_MS = 20.0  # the longest TTFT of the H200 benches (7B, 500 tokens: ~14 ms) fits
MAX_SPIN_MS = 100.0  # a server's hint is capped at this
MIN_SPARE_CORES = 4  # the executor's and the JIT context's spinning cores, the client's, and one for the rest


def server_spin_ms(device: str, cores: int | None = None) -> float:
    """The window a server tells its clients (`Started.spin_ms`): DEFAULT_SPIN_MS on a GPU where this process may run
    on MIN_SPARE_CORES cores or more (`cores`: that count, for tests), else 0."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return DEFAULT_SPIN_MS if device.startswith("cuda") and cores >= MIN_SPARE_CORES else 0.0


@dataclass
class ReplySpin:
    """The spin rule of one client (shared by its sockets and threads: a race on its fields only moves one wait).
    `own_s`: the client's window, None to follow the server's (`server_said`)."""

    own_s: float | None = None
    server_s: float = 0.0  # the last Started's window (nothing said yet: sleep)
    fast: bool = field(default=True)  # the last wait ended within the window

    def __post_init__(self) -> None:
        if self.own_s is not None and not self.own_s >= 0:
            raise ValueError(f"the spin window must be >= 0 seconds, got {self.own_s}")

    @property
    def window_s(self) -> float:
        return self.server_s if self.own_s is None else self.own_s

    def server_said(self, spin_ms: float) -> None:
        """A request's Started: the server's window for its next messages."""
        self.server_s = min(max(spin_ms, 0.0), MAX_SPIN_MS) / 1e3

    def spin_s(self) -> float:
        """How long the next wait may spin before it sleeps."""
        return self.window_s if self.fast else 0.0

    def waited(self, seconds: float) -> None:
        """A wait ended after `seconds` (a message came; time-outs are not reported). Without a window (the server
        said nothing yet, or 0) there is nothing to judge by."""
        if self.window_s > 0:
            self.fast = seconds <= self.window_s


class ProcessWaits:
    """The client waits in progress in one process (every Client of it shares `PROCESS_WAITS`: the GIL it guards
    is the process's): `waiting()` counts one for its duration and gives a test of whether it is still the only one,
    which a spinning wait checks between reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    @contextmanager
    def waiting(self) -> Iterator[Callable[[], bool]]:
        with self._lock:
            self._count += 1
        try:
            yield lambda: self._count == 1
        finally:
            with self._lock:
                self._count -= 1


PROCESS_WAITS = ProcessWaits()  # the process's one (see the module's docstring: one spinning wait per process)
