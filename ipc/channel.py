"""Owns the typed ZeroMQ channels: messages in, messages out, bytes never seen by callers.

Two shapes:
- control (graph executor <-> JIT context): a PAIR socket each side. There is exactly one peer, traffic is
  strictly ordered both ways, and PAIR adds no routing frames; it also accepts no second peer while one is
  connected, so a stray process can't join the step loop.
- client-facing (JIT context serves many clients): a ROUTER on the server, a DEALER per client, so replies
  are routed by identity and tokens can stream back without a request/reply lock-step.

Every socket gets LINGER 0 (close never blocks on unsent frames) and a MAXMSGSIZE, above which zmq drops a
frame and disconnects its sender before Python sees it. On the control channel that is the frame limit. The
client-facing server takes frames up to 16x the limit, so that an oversized request (a prompt too long for a
frame, a bug in a client) gets an `oversized` error reply from `decode`; only frames beyond that are dropped
unanswered (they are held in memory whole before anyone can look at them).
The zmq Context belongs to the caller, who closes every channel before terminating it. A channel refuses to
send a frame over the limit (`ProtocolError("oversized")`), so well-behaved peers never trip MAXMSGSIZE.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from ipc.codec import MAX_FRAME_BYTES, decode, encode
from ipc.errors import ChannelError, PeerUnreachableError, ProtocolError
from ipc.messages import Message


class _SocketChannel:
    """One zmq socket and its frame limit; closes the socket, never the context."""

    def __init__(self, socket: zmq.Socket, max_frame_bytes: int, trusted: bool = False):
        self._socket = socket
        self.max_frame_bytes = max_frame_bytes
        self.trusted = trusted  # the peer is our other process: structural decode only (codec.decode)

    @property
    def socket(self) -> zmq.Socket:
        """For registering in a zmq.Poller alongside other sockets; don't send or receive on it directly."""
        return self._socket

    @property
    def closed(self) -> bool:
        return self._socket.closed

    def poll(self, timeout_ms: int = 0) -> bool:
        """True when a frame is waiting to be received."""
        self._check_open()
        return bool(self._socket.poll(timeout_ms, zmq.POLLIN))

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket (idempotent). Pending frames are discarded (LINGER 0) unless `linger_ms` lets them
        leave for that long: a process that exits right after its last replies (errors to its clients) must."""
        self._socket.close(linger=linger_ms)

    def _recv_frames(self, timeout_ms: int | None, spin_us: int = 0) -> list[bytes] | None:
        self._check_open()
        if spin_us and self._spin_until_readable(spin_us):
            return self._socket.recv_multipart()
        if timeout_ms is not None and not self._socket.poll(timeout_ms, zmq.POLLIN):
            return None
        return self._socket.recv_multipart()

    def _spin_until_readable(self, spin_us: int) -> bool:
        """Poll without sleeping for up to spin_us: saves the thread wake-up (tens to hundreds of us on a VM)
        when a reply is due shortly. Costs a busy core while it spins; callers use it only on the GPU path."""
        deadline = time.perf_counter_ns() + spin_us * 1000
        while time.perf_counter_ns() < deadline:
            if self._socket.poll(0, zmq.POLLIN):
                return True
        return False

    def _wait_writable(self, timeout_ms: int | None) -> None:
        if timeout_ms is not None and not self._socket.poll(timeout_ms, zmq.POLLOUT):
            raise TimeoutError(f"no peer took the message within {timeout_ms} ms")

    def _check_open(self) -> None:
        if self._socket.closed:
            raise ChannelError("channel is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Channel(_SocketChannel):
    """A point-to-point channel (control PAIR, or a client's DEALER): send and receive whole messages."""

    def send(self, msg: Message, *, timeout_ms: int | None = None) -> None:
        """Send `msg`; with `timeout_ms`, TimeoutError if no peer can take it in time (else it blocks)."""
        self._check_open()
        data = encode(msg, max_frame_bytes=self.max_frame_bytes)
        self._wait_writable(timeout_ms)
        self._socket.send(data)

    def send_while(self, msg: Message, alive: Callable[[], bool], poll_ms: int = 50) -> bool:
        """Send, waiting only while `alive()` holds: a PAIR send blocks for as long as its peer is gone.
        False if the peer was found dead before the message could go."""
        while True:
            try:
                self.send(msg, timeout_ms=poll_ms)
                return True
            except TimeoutError:
                if not alive():
                    return False

    def recv(self, timeout_ms: int | None = None, *, spin_us: int = 0) -> Message | None:
        """The next message, or None after `timeout_ms`; a bad frame is consumed and raises ProtocolError.
        `spin_us`: first busy-poll that long (no sleep), then wait normally."""
        frames = self._recv_frames(timeout_ms, spin_us)
        if frames is None:
            return None
        if len(frames) != 1:
            raise ProtocolError("malformed", f"expected 1 frame, got {len(frames)}")
        return decode(frames[0], max_frame_bytes=self.max_frame_bytes, trusted=self.trusted)


class ServerChannel(_SocketChannel):
    """The client-facing ROUTER: every received frame comes with its sender's identity, bad ones too."""

    def endpoint(self) -> str:
        """The address it is bound at, as clients connect to it (a tcp port 0 resolved to the port taken)."""
        self._check_open()
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv_from(self, timeout_ms: int | None = None) -> tuple[bytes, Message | ProtocolError] | None:
        """(identity, message or the ProtocolError to answer), or None after `timeout_ms`. Never raises
        for what a client sent, so one bad client can't stop the serving loop."""
        frames = self._recv_frames(timeout_ms)
        if frames is None:
            return None
        identity, payload = frames[0], frames[1:]
        if len(payload) != 1:
            return identity, ProtocolError(
                "malformed", f"expected 1 frame after identity, got {len(payload)}"
            )
        try:
            return identity, decode(payload[0], max_frame_bytes=self.max_frame_bytes)
        except ProtocolError as exc:
            return identity, exc

    def send_to(self, identity: bytes, msg: Message) -> None:
        """Route `msg` to one client without blocking; PeerUnreachableError if it is gone or not reading
        (the caller should then abort that client's request rather than stream into the void)."""
        self._check_open()
        data = encode(msg, max_frame_bytes=self.max_frame_bytes)
        try:
            self._socket.send_multipart([identity, data], flags=zmq.NOBLOCK)
        except zmq.Again:
            raise PeerUnreachableError(f"client {identity.hex()} is not reading (send queue full)") from None
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            raise PeerUnreachableError(f"client {identity.hex()} is not connected") from None


ANSWERED_OVERSIZE_FACTOR = 16  # the server reads frames up to this many times its limit, to answer them


def answered_cap_bytes(max_frame_bytes: int) -> int:
    """The largest frame a client-facing server reads whole, to answer it `oversized` (ROUTER and local stream)."""
    return max_frame_bytes * ANSWERED_OVERSIZE_FACTOR


def _open(ctx: zmq.Context, socket_type: int, address: str, bind: bool, max_frame_bytes: int,
          recv_cap_bytes: int | None = None) -> zmq.Socket:
    if not isinstance(ctx, zmq.Context):
        raise TypeError(f"ctx must be a zmq.Context, got {type(ctx).__name__}")
    if not 0 < max_frame_bytes <= 1 << 30:
        raise ValueError(f"max_frame_bytes must be in 1..2**30, got {max_frame_bytes}")
    socket = ctx.socket(socket_type)
    try:
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, recv_cap_bytes or max_frame_bytes)
        if socket_type == zmq.ROUTER:
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise instead of vanishing
        if not bind:
            # A peer that binds later (a server still starting: the launcher's ready poll) is reached ~10 ms after it
            # binds, not up to ZeroMQ's default 100 ms; the interval doubles up to 1 s while it stays away.
            socket.setsockopt(zmq.RECONNECT_IVL, 10)
            socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        (socket.bind if bind else socket.connect)(address)
    except zmq.ZMQError as exc:
        socket.close(linger=0)
        raise ChannelError(f"cannot {'bind' if bind else 'connect'} {address}: {exc}") from None
    return socket


def connect_socket(ctx: zmq.Context, socket_type: int, address: str, *,
                   max_frame_bytes: int = MAX_FRAME_BYTES) -> zmq.Socket:
    """A connecting socket with every channel's options and no `Channel` around it, for a caller that reads its
    frames itself (the asyncio client: a `zmq.asyncio.Context` gives an asyncio socket)."""
    return _open(ctx, socket_type, address, False, max_frame_bytes)


def bind_control(ctx: zmq.Context, address: str, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> Channel:
    """The control channel's binding side (PAIR); its peer is the JIT context (trusted after the handshake)."""
    return Channel(_open(ctx, zmq.PAIR, address, True, max_frame_bytes), max_frame_bytes, trusted=True)


def connect_control(ctx: zmq.Context, address: str, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> Channel:
    """The control channel's connecting side (PAIR); its peer is the executor (trusted after the handshake)."""
    return Channel(_open(ctx, zmq.PAIR, address, False, max_frame_bytes), max_frame_bytes, trusted=True)


def bind_server(ctx: zmq.Context, address: str, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> ServerChannel:
    """The client-facing server (ROUTER)."""
    cap = answered_cap_bytes(max_frame_bytes)
    return ServerChannel(_open(ctx, zmq.ROUTER, address, True, max_frame_bytes, cap), max_frame_bytes)


def connect_client(ctx: zmq.Context, address: str, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> Channel:
    """A client of the server (DEALER); replies to its requests arrive on it in order."""
    return Channel(_open(ctx, zmq.DEALER, address, False, max_frame_bytes), max_frame_bytes)
