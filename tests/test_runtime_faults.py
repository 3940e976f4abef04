"""Faults of the two-process runtime, on real `hybridrt serve` processes: a child killed with SIGKILL, SIGTERM
on serve, a client that goes away mid-generation. After serve ends, no child process, shared-memory segment
or runtime directory may be left.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zmq

from ipc.codec import decode, encode
from ipc.liveness import process_alive
from ipc.messages import GenerateRequest, Started, TokenChunk
from ipc.runtime_dir import default_base
from launch.client import Client, ServerError
from tests.serve_process import ServeProcess, shm_segments

LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}  # minutes on CPU: always cut short here


@pytest.fixture
def server(default_model_dir):
    server = ServeProcess(http=False)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        server.proc.stdout.close()
        server.proc.stderr.close()


def pids(server: ServeProcess) -> tuple[int, int]:
    with Client(server.address) as client:
        facts = client.status()
    executor, jit = facts["executor"]["executor_pid"], facts["jit_context_pid"]
    assert {executor, jit} <= set(server.children())
    return executor, jit


def assert_nothing_left(server: ServeProcess, executor_pid: int, jit_pid: int) -> None:
    """serve has exited: its children are gone, and so are their segments and the runtime directory."""
    assert server.proc.poll() is not None
    deadline = time.monotonic() + 5
    while any(process_alive(p) for p in (executor_pid, jit_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(executor_pid) and not process_alive(jit_pid)
    # Other servers (other tests, other users) may own segments too: only this executor's count.
    assert not [s for s in shm_segments() if s.startswith(f"hybridrt-{executor_pid}-")]
    assert not list(default_base().glob(f"hybridrt-{server.proc.pid}-*"))


def test_executor_killed_mid_generation(server) -> None:
    executor, jit = pids(server)
    assert any(s.startswith(f"hybridrt-{executor}-") for s in shm_segments())  # the step buffers
    with Client(server.address, timeout_s=10) as client:
        stream = client.generate(prompt="Tell me a long story.", params=LONG)
        for _ in range(3):
            assert isinstance(next(stream), TokenChunk)
        os.kill(executor, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(ServerError) as err:
            for _ in stream:
                pass
        assert time.monotonic() - killed < 2.0
    assert err.value.code == "executor_died", err.value
    assert server.proc.wait(timeout=15) != 0
    stderr = server.proc.stderr.read()
    assert "error: graph_executor was killed by SIGKILL" in stderr, stderr
    assert_nothing_left(server, executor, jit)


def test_jit_context_killed_executor_exits_by_itself(server) -> None:
    executor, jit = pids(server)
    os.kill(server.proc.pid, signal.SIGSTOP)  # so that the supervisor can't be the one stopping the executor
    try:
        os.kill(jit, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(executor) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(executor), "the executor did not exit after its JIT context died"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert server.proc.wait(timeout=15) != 0
    stderr = server.proc.stderr.read()
    assert "jit_context was killed by SIGKILL" in stderr and "graph_executor exited" in stderr, stderr
    assert_nothing_left(server, executor, jit)


def assert_served_promptly(client: Client) -> None:
    start = time.monotonic()
    *_, final = client.generate(prompt="Hi", params={"max_tokens": 4, "temperature": 0.0})
    assert final.finish_reason == "length" and len(final.token_ids) == 4
    assert time.monotonic() - start < 10.0  # the abandoned request would hold the executor for minutes


def drain(stream, outcome: list) -> None:
    """Read a stream to its end; record the ServerError that ends it (or None) and when it came."""
    try:
        for _ in stream:
            pass
        outcome.append((None, time.monotonic()))
    except ServerError as e:
        outcome.append((e, time.monotonic()))


def test_clients_going_away_free_the_server_then_sigterm_answers_running_and_queued(server) -> None:
    """Over TCP to the real processes: a client that closes its stream (the library cancels) and one that
    vanishes without a word each free the executor at once (the logic: test_jit_server.py). Then stopping the
    server tells every client with a request running or queued, instead of leaving them to their own
    time-outs, and serve exits 0 leaving nothing behind."""
    executor, jit = pids(server)
    with Client(server.address, timeout_s=10) as client:
        stream = client.generate(prompt="Tell me a long story.", params=LONG)
        for _ in range(3):
            next(stream)
        stream.close()
        assert_served_promptly(client)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.address)
        sock.send(encode(GenerateRequest("vanishing", prompt="Tell me a long story.", params=LONG)))
        assert sock.poll(30_000) and isinstance(decode(sock.recv()), Started)  # it left the queue
        assert sock.poll(30_000) and isinstance(decode(sock.recv()), TokenChunk)
        sock.close()
        ctx.term()
        assert_served_promptly(client)

        running = client.generate(prompt="Tell me a long story.", params=LONG)
        assert isinstance(next(running), TokenChunk)
        outcomes: dict[str, list] = {"running": [], "queued": []}
        queued = threading.Thread(target=drain, args=(client.generate(prompt="Another one.", params=LONG),
                                                      outcomes["queued"]))
        queued.start()
        deadline = time.monotonic() + 10
        while client.status()["queued"] < 1:
            assert time.monotonic() < deadline, "the second request was never queued"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        drain(running, outcomes["running"])
        queued.join(timeout=15)
    for name, [(error, when)] in outcomes.items():
        assert isinstance(error, ServerError) and error.code == "shutting_down", (name, error)
        assert when - stopped < 2.0, name
    assert server.proc.wait(timeout=15) == 0, server.proc.stderr.read()
    assert_nothing_left(server, executor, jit)
