"""The local stream (`ipc.local_stream`) and the JIT context's client endpoints (`ipc.client_ports`) in-process, over
real AF_UNIX sockets and a real ROUTER: framing across arbitrary read boundaries, a client that stops reading, routing
by endpoint, the end of a stream on either side. The served path over real processes is in test_runtime.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq

from ipc import local_stream
from ipc import messages as m
from ipc.channel import connect_client
from ipc.client_ports import LOCAL_TAG, ROUTER_TAG, ClientPorts, open_client_ports
from ipc.codec import decode, encode
from ipc.errors import ChannelError, PeerUnreachableError, ProtocolError
from ipc.local_stream import FrameBuffer, LocalConnection, LocalListener, PeerGone, frame
from ipc.runtime_dir import RuntimeDir


@pytest.fixture
def rundir():
    with RuntimeDir() as d:
        yield d


@pytest.fixture
def ports(rundir):
    ctx = zmq.Context()
    p = open_client_ports(ctx, rundir.ipc_address("client"), rundir.socket_path("local"))
    p.ctx = ctx
    yield p
    p.close()
    ctx.destroy(linger=0)


def test_frames_come_whole_whatever_the_read_boundaries():
    frames = [b"", b"a", bytes(range(256)) * 40, b"xyz"]
    wire = b"".join(frame(f) for f in frames)
    for step in (1, 3, 7, 4096, len(wire)):
        buf, got = FrameBuffer(1 << 20), []
        for i in range(0, len(wire), step):
            buf.feed(wire[i:i + step])
            while (f := buf.pop()) is not None:
                got.append(f)
        assert got == frames, step
    buf = FrameBuffer(10)
    buf.feed(frame(b"x" * 11))
    with pytest.raises(ProtocolError, match="oversized"):
        buf.pop()


def test_ports_route_each_reply_by_the_endpoint_its_client_came_in_by(ports, rundir):
    local = LocalConnection(ports.local_path, 1 << 20)
    dealer = connect_client(ports.ctx, rundir.ipc_address("client"))
    try:
        local.send(encode(m.Status(api_key="L")))
        dealer.send(m.Status(api_key="Z"))
        got = {}
        while len(got) < 2:
            identity, msg = ports.recv_from(2000)
            got[msg.api_key] = identity
        assert got["L"][:1] == LOCAL_TAG and got["Z"][:1] == ROUTER_TAG
        ports.send_to(got["L"], m.Error("x", "to local"))
        ports.send_to(got["Z"], m.Error("x", "to zeromq"))
        assert decode(local.wait_frame(2000)).message == "to local"
        assert dealer.recv(2000).message == "to zeromq"
        with pytest.raises(PeerUnreachableError):  # a tag nobody has, or a local id never given out
            ports.send_to(b"q" + got["L"][1:], m.Error("x", "nobody"))
        with pytest.raises(PeerUnreachableError):
            ports.send_to(LOCAL_TAG + b"\xff" * 8, m.Error("x", "nobody"))
        with pytest.raises(ProtocolError, match="oversized"):
            ports.send_to(got["L"], m.Error("x", "y" * (2 << 20)))
        bad = encode(m.Status()) + b"x"  # trailing bytes: answered as the ROUTER answers them
        local.send(bad)
        identity, err = ports.recv_from(2000)
        assert identity == got["L"] and isinstance(err, ProtocolError) and err.code == "malformed"
        assert ports.recv_from(0) is None and not ports.poll(0)
    finally:
        local.close()
        dealer.close()


def test_each_message_carries_the_moment_its_wait_returned(ports, rundir):
    """`ClientPorts.polled_at`: when the wait that read the message just handed out returned (a request's way in
    splits there). Two frames read by one wait share it, however late the second is handed out."""
    local = LocalConnection(ports.local_path, 1 << 20)
    dealer = connect_client(ports.ctx, rundir.ipc_address("client"))
    try:
        assert ports.recv_from(100) is None  # the connection accepted, nothing whole yet
        sent = time.perf_counter()
        local.send(encode(m.Status(api_key="a")))
        local.send(encode(m.Status(api_key="b")))
        time.sleep(0.05)  # both frames are in before the wait
        _, first = ports.recv_from(2000)
        stamp = ports.polled_at
        assert sent < stamp < time.perf_counter()
        time.sleep(0.01)
        _, second = ports.recv_from(2000)
        assert (first.api_key, second.api_key) == ("a", "b") and ports.polled_at == stamp
        sent = time.perf_counter()
        dealer.send(m.Status(api_key="z"))
        _, msg = ports.recv_from(2000)
        assert msg.api_key == "z" and sent < ports.polled_at < time.perf_counter()
    finally:
        local.close()
        dealer.close()


def test_a_client_that_stops_reading_is_dropped_and_one_that_leaves_is_unreachable(ports, monkeypatch):
    monkeypatch.setattr(local_stream, "OUTBOX_CAP_BYTES", 1 << 20)
    idle = LocalConnection(ports.local_path, 1 << 20)  # never reads
    idle.send(encode(m.Status()))
    identity, _ = ports.recv_from(2000)
    chunk = m.TokenChunk("r", "x" * 1000, [1])
    with pytest.raises(PeerUnreachableError, match="not reading"):
        for _ in range(100_000):  # the kernel's buffers fill, then the outbox passes the cap
            ports.send_to(identity, chunk)
    with pytest.raises(PeerUnreachableError):  # dropped: the connection is closed on our side
        ports.send_to(identity, chunk)
    with pytest.raises(PeerGone):
        while True:
            idle.wait_frame(2000)
    idle.close()
    leaving = LocalConnection(ports.local_path, 1 << 20)
    leaving.send(encode(m.Status()))
    identity, _ = ports.recv_from(2000)
    leaving.close()
    assert ports.recv_from(200) is None  # the end of its stream: dropped quietly
    with pytest.raises(PeerUnreachableError):
        ports.send_to(identity, chunk)


def test_a_burst_the_socket_cannot_take_at_once_arrives_whole_and_in_order(ports):
    """Replies beyond the socket's buffer wait in the peer's outbox and leave as the client reads (the server's
    poll flushes them); the client sees every frame, in order."""
    conn = LocalConnection(ports.local_path, 1 << 20)
    conn.send(encode(m.Status()))
    identity, _ = ports.recv_from(2000)
    count = 3000
    for i in range(count):
        ports.send_to(identity, m.TokenChunk("r", "y" * 2000, [i]))
    got: list[int] = []
    stop = threading.Event()
    server = threading.Thread(target=lambda: [ports.recv_from(10) for _ in iter(stop.is_set, True)])
    server.start()  # the server's loop keeps polling, which flushes the outbox as room appears
    try:
        while len(got) < count:
            got.append(decode(conn.wait_frame(5000)).token_ids[0])
    finally:
        stop.set()
        server.join(5)
        conn.close()
    assert got == list(range(count))


def test_a_client_sees_the_servers_last_replies_then_server_died(ports):
    conn = LocalConnection(ports.local_path, 1 << 20)
    conn.send(encode(m.Status()))
    identity, _ = ports.recv_from(2000)
    ports.send_to(identity, m.Error("executor_died", "last words"))
    ports.close(linger_ms=500)
    assert decode(conn.wait_frame(2000)).message == "last words"
    with pytest.raises(PeerGone):
        conn.wait_frame(2000)
    assert not conn.alive()
    with pytest.raises(PeerGone):
        conn.send(encode(m.Status()), timeout_ms=1000)
    conn.close()


def test_listener_errors_are_one_line_and_close_removes_the_socket(rundir):
    path = rundir.socket_path("local")
    listener = LocalListener(path, 1 << 20)
    with pytest.raises(ChannelError, match="cannot listen"):
        LocalListener(path, 1 << 20)  # taken
    listener.close()
    assert not path.exists()
    with pytest.raises(ChannelError, match="cannot connect"):
        LocalConnection(path, 1 << 20)
    with pytest.raises(ChannelError, match="cannot listen"):  # a folder that does not exist
        LocalListener(rundir.path / "missing" / "x.sock", 1 << 20)


def test_a_send_the_server_does_not_take_times_out(rundir):
    """A server that never reads: the client's send of a frame bigger than the socket buffers gives up at its
    time-out instead of blocking."""
    listener = LocalListener(rundir.socket_path("local"), 1 << 30)
    conn = LocalConnection(listener.path, 1 << 20)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.send(b"z" * (64 << 20), timeout_ms=200)
        assert 0.15 < time.monotonic() - start < 5
    finally:
        conn.close()
        listener.close()


class EndingServer:
    """ClientPorts playing a server that dies mid-request: answers Status (with its local stream), then a
    GenerateRequest with Started and one TokenChunk, and closes every connection."""

    def __init__(self, ports: ClientPorts) -> None:
        self.ports = ports
        self.statuses = 0  # Status requests answered
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            identity, msg = self.ports.recv_from(5000)
            if isinstance(msg, m.Status):
                self.statuses += 1
                self.ports.send_to(identity, m.StatusReply({"local_stream": self.ports.local_path}))
                continue
            self.ports.send_to(identity, m.Started(msg.request_id, 0.0, 0.0))
            self.ports.send_to(identity, m.TokenChunk(msg.request_id, "x", [7]))
            self.ports.close(linger_ms=500)
            return


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_status_call_finds_the_local_stream_for_the_first_generate(ports, rundir, asynchronous):
    """A client asked for status first (as the bench does before timing, or a user checking the server) uses the
    stream that reply names from its first generate on, with no second Status round trip inside that TTFT."""
    from launch.async_client import AsyncClient
    from launch.client import Client

    server = EndingServer(ports)
    address = rundir.ipc_address("client")
    if asynchronous:
        async def run() -> tuple[str | None, list]:
            client, seen = AsyncClient(address, local=True), []
            try:
                await client.status()
                path = client.local_path
                with pytest.raises(Exception):
                    async for msg in client.generate(prompt="hi"):
                        seen.append(msg.token_ids)
            finally:
                client.close()
            return path, seen

        path, got = asyncio.run(run())
    else:
        got = []
        with Client(address, timeout_s=5) as client:
            client.status()
            path = client.local_path
            with pytest.raises(Exception):
                for msg in client.generate(prompt="hi"):
                    got.append(msg.token_ids)
    assert path == ports.local_path and got == [[7]] and server.statuses == 1


def test_both_clients_read_what_came_then_server_died_when_the_local_stream_ends(ports, rundir):
    from launch.async_client import AsyncClient
    from launch.client import Client, ServerError

    address = rundir.ipc_address("client")
    EndingServer(ports)
    got = []
    with Client(address, timeout_s=5) as client, pytest.raises(ServerError) as err:
        for msg in client.generate(prompt="hi"):
            got.append(msg.token_ids)
    assert client.local_path == ports.local_path and got == [[7]] and err.value.code == "server_died"

    async def run_async() -> tuple[list, str, str | None]:
        client, seen = AsyncClient(address, local=True), []
        try:
            async for msg in client.generate(prompt="hi"):
                seen.append(msg.token_ids)
        except ServerError as e:
            return seen, e.code, client.local_path
        finally:
            client.close()
        return seen, "no error", client.local_path

    ctx = zmq.Context()
    second = open_client_ports(ctx, rundir.ipc_address("client2"), rundir.socket_path("local2"))
    EndingServer(second)
    address = rundir.ipc_address("client2")
    try:
        seen, code, path = asyncio.run(run_async())
    finally:
        ctx.destroy(linger=0)
    assert (seen, code, path) == ([[7]], "server_died", second.local_path)
