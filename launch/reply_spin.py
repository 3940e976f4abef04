"""When a client waits for its server's next message by spinning instead of sleeping (issue 12: the hop to the client).

A client that sleeps in a poll pays a thread wake-up for every message: ZeroMQ's I/O thread receives the frame, then
wakes the waiting thread through its mailbox. Measured with `bench.probes.socket_hop` (40-byte round trips, P50):
106 us blocking against 39 us with the client spinning on the CPU machine; a ZeroMQ hop on the H200 host was
0.3-0.6 ms. Every TTFT through a client crosses one such hop to the client (the first token), and every token after
it one more.

Spinning holds a core, so a client spins only while the server answers fast: for up to `window_s` per wait, and only
while the last wait ended within that window. A server on a GPU (tokens every 0.5-15 ms) keeps its clients spinning;
one on the CPU (a token every tens of ms or more) is waited for by sleeping after the first wait that outlasts the
window, which costs the server's cores one window at most before the client falls back, and nothing after. A wait
that sleeps is still timed, so a server that speeds up (a shorter prompt, a smaller model) is spun for again.

Spinning also needs a core to spare: the JIT context and the executor spin on one core each while a request runs,
so on a machine of few cores a spinning client takes the server's. Measured on the 2-core CPU machine
(`bench.probes.client_spin`, a 2-layer model whose steps take ~1.4 ms, so the rule above kept spinning): client TTFT
10.8 ms spinning against 3.8 sleeping, the JIT context's own TTFT 4.7 against 2.0. So by default a client spins only
on a machine with at least `MIN_SPARE_CORES` cores it may run on (a client on another machine than its server spins
on its own cores, which costs the server nothing; the default does not know where the server is).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_SPIN_MS = 20.0  # the longest TTFT of the H200 benches (7B, 500 tokens: ~14 ms) fits; a CPU step does not
MIN_SPARE_CORES = 4  # the executor's and the JIT context's spinning cores, the client's, and one for the rest


def default_spin_ms(cores: int | None = None) -> float:
    """The clients' default window: DEFAULT_SPIN_MS where this process may run on MIN_SPARE_CORES cores or more
    (`cores`: that count, for tests), else 0 (always sleep)."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return DEFAULT_SPIN_MS if cores >= MIN_SPARE_CORES else 0.0


@dataclass
class ReplySpin:
    """The spin rule of one client (shared by its sockets and threads: a race on `fast` only moves one wait)."""

    window_s: float = DEFAULT_SPIN_MS / 1e3  # 0: never spin
    fast: bool = field(default=True)  # the last wait ended within the window (at first: assume a fast server)

    def __post_init__(self) -> None:
        if not self.window_s >= 0:
            raise ValueError(f"the spin window must be >= 0 seconds, got {self.window_s}")

    def spin_s(self) -> float:
        """How long the next wait may spin before it sleeps."""
        return self.window_s if self.fast else 0.0

    def waited(self, seconds: float) -> None:
        """A wait ended after `seconds` (a message came; time-outs are not reported)."""
        self.fast = seconds <= self.window_s
