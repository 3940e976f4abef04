"""The HTTP app's native client (`AsyncClient`) waiting for the JIT context's messages, under asyncio and uvloop,
sleeping or spinning (issue 12: on the H200 host the app's waits were slower on uvloop + httptools than on asyncio
+ h11, by 0.2-0.3 ms a wait, and its spinning gained ~0.04 ms there against 0.5 on asyncio; `bench.probes.http_split`).

A peer process plays the JIT context: for each request, a Started and 8 TokenChunks 1 ms apart (it sleeps between
them), each stamped with its send time (perf_counter: CLOCK_MONOTONIC, one clock for the host's processes); this
process times each message's arrival at the `async for` over `AsyncClient.generate`. No uvicorn, no HTTP: if the
loops differ here, the difference is the client's wait; if not, it is the app's.

    python -m bench.probes.async_wait [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import time

import zmq

from ipc import messages as m
from ipc.channel import bind_server
from ipc.runtime_dir import RuntimeDir

TOKENS = 8
GAP_S = 0.001


def _peer(address: str, requests: int) -> None:
    ctx = zmq.Context()
    sock = bind_server(ctx, address)
    for _ in range(requests):
        got = sock.recv_from(20_000)
        if got is None:
            break
        identity, msg = got
        time.sleep(GAP_S)
        sock.send_to(identity, m.Started(msg.request_id, time.perf_counter(), 20.0))  # queue_ms carries the stamp
        for i in range(TOKENS):
            time.sleep(GAP_S)
            sock.send_to(identity, m.TokenChunk(msg.request_id, repr(time.perf_counter()), [i]))
        sock.send_to(identity, m.Finished(msg.request_id, "x", list(range(TOKENS)), "length"))
    sock.close()
    ctx.destroy(linger=1000)


async def _client(address: str, requests: int, spin_ms: float, latencies: list[float]) -> None:
    from launch.async_client import AsyncClient

    client = AsyncClient(address, spin_ms=spin_ms)
    try:
        for _ in range(requests):
            async for msg in client.generate(prompt="hi", started=True):
                now = time.perf_counter()
                if isinstance(msg, m.Started):
                    latencies.append(now - msg.queue_ms)
                elif isinstance(msg, m.TokenChunk):
                    latencies.append(now - float(msg.text))
    finally:
        client.close()


def measure(loop: str, spin_ms: float, requests: int) -> list[float]:
    """One-way latencies (s) of every message of `requests` requests on `loop` ("asyncio" or "uvloop")."""
    latencies: list[float] = []
    with RuntimeDir() as d:
        address = d.ipc_address("peer")
        peer = mp.Process(target=_peer, args=(address, requests))
        peer.start()
        try:
            if loop == "uvloop":
                import uvloop

                uvloop.run(_client(address, requests, spin_ms, latencies))
            else:
                asyncio.run(_client(address, requests, spin_ms, latencies))
        finally:
            peer.join(10)
    return latencies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="requests per variant (9 messages each; default 300)")
    args = ap.parse_args(argv)
    print(f"| loop | client wait | one-way P50 us | P90 us | P99 us |  ({args.requests} requests x {TOKENS + 1} "
          f"messages, {GAP_S * 1e3:g} ms apart)")
    print("|---|---|---|---|---|")
    for loop in ("asyncio", "uvloop"):
        for spin_ms in (0.0, 20.0):
            lat = measure(loop, spin_ms, args.requests)
            q = statistics.quantiles(lat, n=100)
            wait = "sleeps" if spin_ms == 0 else f"spins {spin_ms:g} ms"
            print(f"| {loop} | {wait} | {statistics.median(lat) * 1e6:.1f} | {q[89] * 1e6:.1f} | {q[98] * 1e6:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
