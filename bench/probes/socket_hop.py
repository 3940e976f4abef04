"""What one message hop between two processes costs on this host, by transport (issue 12: the client channel).

A server process echoes each message back; the client times round trips of a small message (a control message's
size) and prints the median and P90 per transport: ZeroMQ DEALER/ROUTER over ipc:// and tcp:// (what the native
client and the JIT context use; the client also once spinning on NOBLOCK reads instead of sleeping in a poll), and
plain AF_UNIX and TCP (TCP_NODELAY) stream sockets with blocking reads. Half a round trip is one hop.

`--cadence-ms T` measures instead what a token stream sees: one message every T ms from a sender that stays awake
between them (as the JIT context does, spinning on the GPU's event), each stamped with the sender's clock
(perf_counter: CLOCK_MONOTONIC, one clock for every process of the host); the receiver prints the one-way latency's
P50, P99, P99.9 and max, per transport and reader (sleeping or spinning). Back-to-back round trips keep every thread
hot; at a decode step's cadence the threads between the two (ZeroMQ's I/O thread on each side) go back to sleep
between messages, and the tail of their wake-ups is a candidate for the client's token-gap P99 (issue 12: 4.64 ms at
the client against 4.10 at the JIT context on the H200, P50 4.06).

    python -m bench.probes.socket_hop [--round-trips 3000] [--bytes 40] [--cadence-ms 4 --messages 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import tempfile
import time

import zmq

from ipc.free_port import free_port

WARM_UP = 100


def _zmq_echo(address: str, count: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    for _ in range(count):
        sock.send_multipart(sock.recv_multipart())
    sock.close(linger=1000)
    ctx.term()


def _stream_echo(family: int, address, count: int, size: int) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        if family == socket.AF_INET:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(address)
        srv.listen(1)
        conn, _ = srv.accept()
        with conn:
            if family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(count):
                conn.sendall(_read_exactly(conn, size))


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return data


def zmq_round_trips(address: str, count: int, size: int, spin: bool) -> list[float]:
    server = mp.Process(target=_zmq_echo, args=(address, count + WARM_UP))
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    payload, times = b"x" * size, []
    try:
        for _ in range(count + WARM_UP):
            start = time.perf_counter()
            sock.send(payload)
            if spin:
                while True:
                    try:
                        sock.recv(zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        pass
            else:
                sock.recv()
            times.append(time.perf_counter() - start)
    finally:
        sock.close(linger=0)
        ctx.term()
        server.join(timeout=10)
    return times[WARM_UP:]


def _connect(family: int, address) -> socket.socket:
    """A stream connection to a server process that may not be listening yet (retried for up to 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        conn = socket.socket(family, socket.SOCK_STREAM)
        try:
            conn.connect(address)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def stream_round_trips(family: int, address, count: int, size: int) -> list[float]:
    server = mp.Process(target=_stream_echo, args=(family, address, count + WARM_UP, size))
    server.start()
    conn = _connect(family, address)
    payload, times = b"x" * size, []
    with conn:
        if family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count + WARM_UP):
            start = time.perf_counter()
            conn.sendall(payload)
            _read_exactly(conn, size)
            times.append(time.perf_counter() - start)
    server.join(timeout=10)
    return times[WARM_UP:]


STAMP = struct.Struct("<d")  # the sender's perf_counter at the send, first in each message


def _await(due: float) -> None:
    while time.perf_counter() < due:  # awake between messages, as the JIT context is between tokens
        pass


def _zmq_stream_sender(address: str, count: int, size: int, cadence_s: float) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    identity, _ = sock.recv_multipart()  # the receiver's hello
    pad = b"x" * max(0, size - STAMP.size)
    due = time.perf_counter()
    for _ in range(count):
        due += cadence_s
        _await(due)
        sock.send_multipart([identity, STAMP.pack(time.perf_counter()) + pad])
    sock.close(linger=1000)
    ctx.term()


def _unix_stream_sender(path: str, count: int, size: int, cadence_s: float) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        conn, _ = srv.accept()
        with conn:
            pad = b"x" * max(0, size - STAMP.size)
            due = time.perf_counter()
            for _ in range(count):
                due += cadence_s
                _await(due)
                conn.sendall(STAMP.pack(time.perf_counter()) + pad)


def zmq_one_way(address: str, count: int, size: int, cadence_s: float, spin: bool) -> list[float]:
    """One-way latencies (s) of `count` messages sent every `cadence_s` over ZeroMQ ROUTER -> DEALER."""
    sender = mp.Process(target=_zmq_stream_sender, args=(address, count + WARM_UP, size, cadence_s))
    sender.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    sock.send(b"hello")
    latencies = []
    try:
        for _ in range(count + WARM_UP):
            if spin:
                while True:
                    try:
                        msg = sock.recv(zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        pass
            else:
                msg = sock.recv()
            latencies.append(time.perf_counter() - STAMP.unpack_from(msg)[0])
    finally:
        sock.close(linger=0)
        ctx.term()
        sender.join(timeout=10)
    return latencies[WARM_UP:]


def unix_one_way(path: str, count: int, size: int, cadence_s: float, spin: bool) -> list[float]:
    """One-way latencies (s) over an AF_UNIX stream socket; a spinning reader polls with MSG_DONTWAIT."""
    sender = mp.Process(target=_unix_stream_sender, args=(path, count + WARM_UP, size, cadence_s))
    sender.start()
    conn = _connect(socket.AF_UNIX, path)
    latencies = []
    with conn:
        for _ in range(count + WARM_UP):
            data = b""
            while len(data) < size:
                if spin:
                    try:
                        chunk = conn.recv(size - len(data), socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                else:
                    chunk = conn.recv(size - len(data))
                if not chunk:
                    raise ConnectionError("the sender closed the connection")
                if not data:
                    arrived = time.perf_counter()
                data += chunk
            latencies.append(arrived - STAMP.unpack_from(data)[0])
    sender.join(timeout=10)
    return latencies[WARM_UP:]


def tail_row(name: str, latencies: list[float]) -> str:
    """A table row: P50, P99, P99.9 and max of one-way latencies, in us."""
    q = statistics.quantiles(latencies, n=1000, method="inclusive")
    return (f"| {name} | {statistics.median(latencies) * 1e6:.1f} | {q[989] * 1e6:.1f} | {q[998] * 1e6:.1f} | "
            f"{max(latencies) * 1e6:.1f} |")


def one_way_table(count: int, size: int, cadence_ms: float) -> list[str]:
    cadence_s = cadence_ms / 1e3
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("ZeroMQ ipc://, reader sleeps", zmq_one_way(f"ipc://{tmp}/a.sock", count, size, cadence_s, spin=False)),
            ("ZeroMQ ipc://, reader spins", zmq_one_way(f"ipc://{tmp}/b.sock", count, size, cadence_s, spin=True)),
            ("AF_UNIX stream, reader sleeps", unix_one_way(os.path.join(tmp, "c.sock"), count, size, cadence_s,
                                                           spin=False)),
            ("AF_UNIX stream, reader spins", unix_one_way(os.path.join(tmp, "d.sock"), count, size, cadence_s,
                                                          spin=True)),
        ]
    return [f"| transport | one-way P50 us | P99 us | P99.9 us | max us |  ({count} messages of {size} bytes, one "
            f"every {cadence_ms:g} ms, the sender awake between them)", "|---|---|---|---|---|",
            *(tail_row(name, latencies) for name, latencies in rows)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--round-trips", type=int, default=3000, help="timed round trips per transport (default 3000)")
    ap.add_argument("--bytes", type=int, default=40, help="message size (default 40, a step command's size)")
    ap.add_argument("--cadence-ms", type=float, default=None,
                    help="measure one-way latency of a stream instead: one message every this many ms")
    ap.add_argument("--messages", type=int, default=2000, help="with --cadence-ms: messages per transport")
    args = ap.parse_args(argv)
    n, size = args.round_trips, args.bytes
    if size < STAMP.size:
        ap.error(f"--bytes must be at least {STAMP.size} (the sender's time stamp)")
    if args.cadence_ms is not None:
        if not args.cadence_ms > 0 or args.messages < 1000:
            ap.error("--cadence-ms must be > 0 and --messages at least 1000 (for a P99.9)")
        print("\n".join(one_way_table(args.messages, size, args.cadence_ms)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("ZeroMQ ipc://", zmq_round_trips(f"ipc://{tmp}/z.sock", n, size, spin=False)),
            ("ZeroMQ tcp://", zmq_round_trips(f"tcp://127.0.0.1:{free_port()}", n, size, spin=False)),
            ("ZeroMQ ipc://, client spinning", zmq_round_trips(f"ipc://{tmp}/z2.sock", n, size, spin=True)),
            ("AF_UNIX stream", stream_round_trips(socket.AF_UNIX, os.path.join(tmp, "u.sock"), n, size)),
            ("TCP stream, TCP_NODELAY", stream_round_trips(socket.AF_INET, ("127.0.0.1", free_port()), n, size)),
        ]
    print(f"| transport | round trip P50 us | P90 us |  ({n} round trips of {size} bytes, blocking reads)")
    print("|---|---|---|")
    for name, times in rows:
        q = statistics.quantiles(times, n=10)
        print(f"| {name} | {statistics.median(times) * 1e6:.1f} | {q[8] * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
