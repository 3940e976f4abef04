"""A free TCP port on 127.0.0.1 for a listener that binds it later (the tensor-parallel ranks' rendezvous, a test's or
a probe's `serve`), chosen below the kernel's ephemeral range.

Why not `bind(("127.0.0.1", 0))` and close: the kernel draws that port from its ephemeral range, the same range every
outgoing connection takes its local port from. Between the close and the listener's bind (seconds, while a process
imports torch and loads a model) any connect on the machine may take it (ZeroMQ clients retrying a connect to a server
that is still loading make many; a connect to a port in that range can even connect to itself), and the listener
fails with "Address already in use" (seen in CI: tests/test_tensor_parallel.py, about one run in ten). A port below
the ephemeral range is never handed out that way: only another listener choosing the same port can take it, and the
choice is random over ~20,000 ports and checked by a bind.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000  # above the well-known and most registered service ports
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux; elsewhere the IANA default, 49152-65535)."""
    try:
        low, high = (int(v) for v in RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port that a bind on `host` accepted just now, below the ephemeral range where that leaves room (else from
    the kernel, as bind(0) gives). OSError when none of `attempts` random picks binds."""
    low = ephemeral_range()[0]
    if low - LOWEST < 1000:  # a machine whose ephemeral range starts low: the kernel's choice is all there is
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    rng = random.Random()  # its own generator: seeded tests (random.seed) must not make parallel runs pick alike
    for _ in range(attempts):
        port = rng.randrange(LOWEST, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port on {host} in {LOWEST}-{low - 1} after {attempts} tries")
