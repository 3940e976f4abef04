"""Faults of the two-process runtime, on real `hybridrt serve` processes: a child killed with SIGKILL (a dead JIT
context is reported to its native clients within 2 s), a client that goes away mid-generation (SIGTERM on serve:
test_http_api.py). After serve ends, no child process, shared-memory segment or runtime directory may be left.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq

from ipc.codec import decode, encode
from ipc.liveness import process_alive
from ipc.messages import GenerateRequest, Started, TokenChunk
from launch.client import Client, ServerError
from tests.serve_process import ServeProcess, assert_nothing_left, shm_segments

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


@pytest.mark.parametrize("local", [True, False], ids=["local-stream", "zeromq"])
def test_jit_context_killed_mid_request(server, local) -> None:
    """The JIT context SIGKILLed while it streams a reply: its native client is told `server_died` within 2 s (over
    the local stream: the stream ends; over ZeroMQ: the socket monitor sees the connection drop), and the executor
    exits by itself (serve is held stopped meanwhile, so that it can't be the one stopping it); then serve names
    both, exits non-zero and leaves nothing behind."""
    executor, jit = pids(server)
    with Client(server.address, timeout_s=10, local=local) as client:
        stream = client.generate(prompt="Tell me a long story.", params=LONG)
        for _ in range(3):
            assert isinstance(next(stream), TokenChunk)
        assert (client.local_path is not None) == local
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            os.kill(jit, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ServerError) as err:
                for _ in stream:
                    assert time.monotonic() - killed < 2.0, "the request was still streaming"
            told = time.monotonic() - killed
            assert err.value.code == "server_died", err.value
            assert told < 2.0, told
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
    print(f"\nSIGKILL of the JIT context mid-request: the client was told in {told * 1e3:.0f} ms")


def assert_served_promptly(client: Client) -> None:
    start = time.monotonic()
    *_, final = client.generate(prompt="Hi", params={"max_tokens": 4, "temperature": 0.0})
    assert final.finish_reason == "length" and len(final.token_ids) == 4
    assert time.monotonic() - start < 10.0  # the abandoned request would hold the executor for minutes


def test_clients_going_away_free_the_server(shared_server) -> None:
    """Over TCP to the real processes (the session's plain server, which this leaves serving): a client that
    closes its stream (the library cancels) and one that vanishes without a word each free the executor at once
    (the logic: test_jit_server.py). SIGTERM with requests running and queued: test_http_api.py."""
    server = shared_server
    pids(server)
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
