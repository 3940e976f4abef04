"""ZeroMQ channels over ipc:// in a private runtime directory, and the runtime directory itself."""

import os
import stat

import msgpack
import pytest
import zmq

from ipc import messages as m
from ipc.channel import bind_control, bind_server, connect_client, connect_control
from ipc.codec import decode, encode
from ipc.errors import ChannelError, PeerUnreachableError, ProtocolError
from ipc.runtime_dir import RuntimeDir

TIMEOUT_MS = 2000


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)  # a failed test may leave a socket open; term() would then hang


@pytest.fixture
def rundir():
    with RuntimeDir() as d:
        yield d


# -- runtime directory -----------------------------------------------------------------------------------


def test_runtime_dir_is_private_unique_and_removed():
    with RuntimeDir() as a, RuntimeDir() as b:
        assert a.path != b.path
        assert a.ipc_address("control") != b.ipc_address("control")
        assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o700
        assert a.path.name.startswith(f"hybridrt-{os.getpid()}-")
        assert a.ipc_address("control") == f"ipc://{a.path}/control.sock"
        pipes = a.subdir("mps")
        assert pipes.is_dir() and stat.S_IMODE(os.stat(pipes).st_mode) == 0o700
        (pipes / "file").write_text("x")
    assert not a.path.exists() and not b.path.exists()
    a.close()  # idempotent
    with pytest.raises(ValueError):
        a.ipc_address("control")


def test_runtime_dir_prefers_writable_xdg_runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with RuntimeDir() as d:
        assert d.path.parent == tmp_path
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    with RuntimeDir() as d:
        assert d.path.parent != tmp_path / "missing"


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 65, "sp ace"])
def test_runtime_dir_rejects_bad_names(rundir, name):
    with pytest.raises(ValueError):
        rundir.ipc_address(name)


def test_runtime_dir_rejects_socket_paths_too_long(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with RuntimeDir(base=deep) as d, pytest.raises(ValueError, match="longer than"):
        d.ipc_address("control")


# -- control channel (PAIR) ------------------------------------------------------------------------------


def test_control_pair_round_trip(ctx, rundir):
    address = rundir.ipc_address("control")
    spec = m.TensorSpec("logits", "float32", (1, 8), "shm", "seg")
    with bind_control(ctx, address) as executor, connect_control(ctx, address) as jit:
        jit.send(m.Handshake(m.PROTOCOL_VERSION, "jit_context", os.getpid()), timeout_ms=TIMEOUT_MS)
        assert executor.recv(TIMEOUT_MS) == m.Handshake(m.PROTOCOL_VERSION, "jit_context", os.getpid())
        ready = m.Ready(m.PROTOCOL_VERSION, "tiny", 8, 16, "float32", "cpu", m.StepBufferSpecs(spec, spec, spec, spec, spec, spec), [0])
        executor.send(ready)
        assert jit.recv(TIMEOUT_MS) == ready
        for step in range(3):  # messages stay in order both ways
            jit.send(m.Decode("r", step, step))
        for step in range(3):
            assert executor.recv(TIMEOUT_MS) == m.Decode("r", step, step)
            executor.send(m.StepDone("r", step))
        assert [jit.recv(TIMEOUT_MS).step for _ in range(3)] == [0, 1, 2]
    assert executor.closed and jit.closed


def test_recv_times_out_with_none(ctx, rundir):
    with bind_control(ctx, rundir.ipc_address("control")) as channel:
        assert channel.recv(timeout_ms=10) is None
        assert channel.poll() is False


def test_send_without_peer_times_out(ctx, rundir):
    with bind_control(ctx, rundir.ipc_address("control")) as channel, pytest.raises(TimeoutError):
        channel.send(m.Status(), timeout_ms=10)


def test_oversized_send_is_refused_locally(ctx, rundir):
    with bind_control(ctx, rundir.ipc_address("control"), max_frame_bytes=256) as channel:
        with pytest.raises(ProtocolError) as info:
            channel.send(m.TokenChunk("r", "x" * 300, []))
        assert info.value.code == "oversized"


def test_bad_frame_on_control_raises_then_channel_keeps_working(ctx, rundir):
    address = rundir.ipc_address("control")
    with bind_control(ctx, address) as executor, connect_control(ctx, address) as jit:
        jit.socket.send(b"\xc1garbage")
        with pytest.raises(ProtocolError, match="malformed"):
            executor.recv(TIMEOUT_MS)
        jit.send(m.Reset("r"))
        assert executor.recv(TIMEOUT_MS) == m.Reset("r")


def test_closed_channel_and_bad_address(ctx, rundir):
    channel = bind_control(ctx, rundir.ipc_address("control"))
    channel.close()
    channel.close()
    with pytest.raises(ChannelError):
        channel.recv(timeout_ms=0)
    with pytest.raises(ChannelError):
        bind_control(ctx, "nonsense://address")


def test_no_shared_default_addresses(ctx):
    with RuntimeDir() as a, RuntimeDir() as b:  # two instances bind the "same" name side by side
        first = bind_control(ctx, a.ipc_address("control"))
        second = bind_control(ctx, b.ipc_address("control"))
        first.close()
        second.close()


# -- client-facing ROUTER / DEALER -----------------------------------------------------------------------


def answer_one(server):
    """One turn of a serving loop: a bad frame gets an Error, a request gets a Finished."""
    got = server.recv_from(TIMEOUT_MS)
    if got is None:
        return None
    identity, msg = got
    if isinstance(msg, ProtocolError):
        server.send_to(identity, m.Error(msg.code, msg.detail))
        return msg
    server.send_to(identity, m.Finished(msg.request_id, "ok", [1], "stop"))
    return msg


def test_server_answers_bad_frames_and_keeps_serving(ctx, rundir):
    address = rundir.ipc_address("client")
    with bind_server(ctx, address) as server, connect_client(ctx, address) as client:
        bad = {
            "malformed": [os.urandom(64) + b"\xc1", b"\xc1", msgpack.packb([20])],
            "unknown_type": [msgpack.packb([999, {}])],
            "bad_fields": [msgpack.packb([20, {"request_id": "r", "prompt": 3}])],
        }
        for code, frames in bad.items():
            for data in frames:
                client.socket.send(data)
                assert isinstance(answer_one(server), ProtocolError)
                reply = client.recv(TIMEOUT_MS)
                assert isinstance(reply, m.Error) and reply.code == code
        client.socket.send_multipart([b"two", b"frames"])
        assert answer_one(server).code == "malformed"
        assert client.recv(TIMEOUT_MS).code == "malformed"
        client.send(m.GenerateRequest("ok-1", prompt="hi"))
        assert answer_one(server) == m.GenerateRequest("ok-1", prompt="hi")
        assert client.recv(TIMEOUT_MS) == m.Finished("ok-1", "ok", [1], "stop")


def test_server_answers_oversized_frames_drops_huge_ones_and_keeps_serving(ctx, rundir):
    address = rundir.ipc_address("client")
    limit = 4096
    with bind_server(ctx, address, max_frame_bytes=limit) as server:
        # A raw client bypasses the channel's own size check.
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(address)
        # Over the limit: read, refused by decode, answered.
        raw.send(encode(m.GenerateRequest("big", prompt="x" * (2 * limit)), max_frame_bytes=1 << 20))
        identity, error = server.recv_from(timeout_ms=TIMEOUT_MS)
        assert isinstance(error, ProtocolError) and error.code == "oversized"
        server.send_to(identity, m.Error(error.code, error.detail))
        assert raw.poll(TIMEOUT_MS) and decode(raw.recv()).code == "oversized"
        # Beyond what the server reads at all: zmq drops the frame and disconnects the sender.
        raw.send(encode(m.GenerateRequest("huge", prompt="x" * (17 * limit)), max_frame_bytes=1 << 20))
        assert server.recv_from(timeout_ms=300) is None
        raw.close()
        with connect_client(ctx, address, max_frame_bytes=limit) as client:
            client.send(m.GenerateRequest("after", prompt="hi"))
            assert answer_one(server).request_id == "after"
            assert client.recv(TIMEOUT_MS).request_id == "after"


def test_replies_are_routed_to_the_right_client(ctx, rundir):
    address = rundir.ipc_address("client")
    with (
        bind_server(ctx, address) as server,
        connect_client(ctx, address) as a,
        connect_client(ctx, address) as b,
    ):
        a.send(m.GenerateRequest("from-a", prompt="a"))
        b.send(m.GenerateRequest("from-b", prompt="b"))
        for _ in range(2):
            answer_one(server)
        assert a.recv(TIMEOUT_MS).request_id == "from-a"
        assert b.recv(TIMEOUT_MS).request_id == "from-b"
        assert a.recv(timeout_ms=50) is None


def test_send_to_unknown_client_raises(ctx, rundir):
    with bind_server(ctx, rundir.ipc_address("client")) as server, pytest.raises(PeerUnreachableError):
        server.send_to(b"\x00nobody", m.Ok())


def test_send_while_gives_up_once_the_peer_is_dead(ctx, rundir):
    """A PAIR send blocks while no peer is connected; send_while must return instead of hanging."""
    address = rundir.ipc_address("lonely")
    with bind_control(ctx, address) as lonely:
        checks = []
        assert lonely.send_while(m.Reset("x"), lambda: checks.append(1) or len(checks) < 3, poll_ms=20) is False
        assert len(checks) == 3
        with connect_control(ctx, address) as peer:
            assert lonely.send_while(m.Reset("y"), lambda: True, poll_ms=20) is True
            assert peer.recv(timeout_ms=2000) == m.Reset("y")
