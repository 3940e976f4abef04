"""What one message hop between two processes costs on this host, by transport (issue 12: the client channel).

A server process echoes each message back; the client times round trips of a small message (a control message's
size) and prints the median and P90 per transport: ZeroMQ DEALER/ROUTER over ipc:// and tcp:// (what the native
client and the JIT context use; the client also once spinning on NOBLOCK reads instead of sleeping in a poll), and
plain AF_UNIX and TCP (TCP_NODELAY) stream sockets with blocking reads. Half a round trip is one hop.

    python -m bench.probes.socket_hop [--round-trips 3000] [--bytes 40]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time

import zmq

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


def stream_round_trips(family: int, address, count: int, size: int) -> list[float]:
    server = mp.Process(target=_stream_echo, args=(family, address, count + WARM_UP, size))
    server.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection(address) if family == socket.AF_INET else socket.socket(family)
            if family != socket.AF_INET:
                conn.connect(address)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--round-trips", type=int, default=3000, help="timed round trips per transport (default 3000)")
    ap.add_argument("--bytes", type=int, default=40, help="message size (default 40, a step command's size)")
    args = ap.parse_args(argv)
    n, size = args.round_trips, args.bytes
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("ZeroMQ ipc://", zmq_round_trips(f"ipc://{tmp}/z.sock", n, size, spin=False)),
            ("ZeroMQ tcp://", zmq_round_trips(f"tcp://127.0.0.1:{_free_port()}", n, size, spin=False)),
            ("ZeroMQ ipc://, client spinning", zmq_round_trips(f"ipc://{tmp}/z2.sock", n, size, spin=True)),
            ("AF_UNIX stream", stream_round_trips(socket.AF_UNIX, os.path.join(tmp, "u.sock"), n, size)),
            ("TCP stream, TCP_NODELAY", stream_round_trips(socket.AF_INET, ("127.0.0.1", _free_port()), n, size)),
        ]
    print(f"| transport | round trip P50 us | P90 us |  ({n} round trips of {size} bytes, blocking reads)")
    print("|---|---|---|")
    for name, times in rows:
        q = statistics.quantiles(times, n=10)
        print(f"| {name} | {statistics.median(times) * 1e6:.1f} | {q[8] * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
