"""The JIT context's client-facing endpoints as one: the ZeroMQ ROUTER (any client, local or remote) and, where the
launch gave it a path, the local stream listener (`ipc.local_stream`: clients on this machine, for their latency).

The serving loop sees one `recv_from` / `send_to` / `poll` / `close`, as it saw the ROUTER's (`ServerChannel`): each
message comes with an opaque identity bytes, and replies go back to it. An identity says which endpoint its client
came in by (its first byte: ROUTER_TAG or LOCAL_TAG), so a ROUTER identity a client chose can never name a local
client. Frames are decoded as the ROUTER's are (`codec.decode`, untrusted, frames up to the limit; larger ones up to
`channel.answered_cap_bytes` get an `oversized` answer, beyond that the connection is closed).
"""

from __future__ import annotations

import os
import time
from collections import deque
from itertools import count

import zmq

from ipc.channel import ServerChannel, answered_cap_bytes, bind_server
from ipc.codec import MAX_FRAME_BYTES, decode, encode
from ipc.errors import HybridrtError, PeerUnreachableError, ProtocolError
from ipc.local_stream import LocalListener, LocalPeer, PeerGone
from ipc.messages import Message

ROUTER_TAG = b"z"
LOCAL_TAG = b"l"

Received = tuple[bytes, Message | ProtocolError]


class ClientPorts:
    """`router`: the ROUTER (owned from here on); `local`: a listener on this machine, or None."""

    def __init__(self, router: ServerChannel, local: LocalListener | None = None) -> None:
        self.router = router
        self.local = local
        self.max_frame_bytes = router.max_frame_bytes
        self._peers: dict[bytes, LocalPeer] = {}
        self._ids = count()
        self._ready: deque[tuple[bytes, Message | ProtocolError, float]] = deque()  # decoded, not yet handed out
        # perf_counter when the wait that read the message last handed out returned: its way in splits there into
        # the client's send and this process's wake-up, and this process's own read, decode and checks
        self.polled_at = 0.0
        self._poller = zmq.Poller()
        self._poller.register(router.socket, zmq.POLLIN)
        if local is not None:
            self._poller.register(local, zmq.POLLIN)

    @property
    def local_path(self) -> str | None:
        """Where clients on this machine connect (a status fact), or None."""
        return str(self.local.path) if self.local is not None else None

    @property
    def closed(self) -> bool:
        return self.router.closed

    def recv_from(self, timeout_ms: int | None = None) -> Received | None:
        """(identity, message or the ProtocolError to answer), or None after timeout_ms (None: wait). Never raises
        for what a client sent."""
        if self._ready:
            return self._hand_out()
        if self.local is None:
            if not self.router.socket.poll(-1 if timeout_ms is None else timeout_ms, zmq.POLLIN):
                return None
            self.polled_at = time.perf_counter()
            got = self.router.recv_from(0)
            return None if got is None else (ROUTER_TAG + got[0], got[1])
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1e3
        while True:
            left_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1e3))
            events = dict(self._poller.poll(left_ms))
            polled = time.perf_counter()
            if not events:
                return None
            if events.pop(self.router.socket, 0) & zmq.POLLIN:
                got = self.router.recv_from(0)
                if got is not None:
                    self._serve_local(events, polled)  # nobody waits longer for the ROUTER's message than for theirs
                    self.polled_at = polled
                    return ROUTER_TAG + got[0], got[1]
            self._serve_local(events, polled)
            if self._ready:
                return self._hand_out()
            if deadline is not None and time.monotonic() >= deadline:
                return None
            # woken with nothing whole yet (part of a frame, a connection accepted or closed): wait on

    def _hand_out(self) -> Received:
        identity, msg, self.polled_at = self._ready.popleft()
        return identity, msg

    def poll(self, timeout_ms: int = 0) -> bool:
        """True when a message may be waiting (recv_from(0) then tells)."""
        return bool(self._ready) or bool(self._poller.poll(timeout_ms))

    def send_to(self, identity: bytes, msg: Message) -> None:
        """Route `msg` to one client without blocking; PeerUnreachableError if it is gone or not reading,
        ProtocolError("oversized") for a message over the frame limit."""
        tag, rest = identity[:1], identity[1:]
        if tag == ROUTER_TAG:
            return self.router.send_to(rest, msg)
        peer = self._peers.get(identity) if tag == LOCAL_TAG else None
        if peer is None:
            raise PeerUnreachableError(f"client {identity.hex()} is not connected")
        data = encode(msg, max_frame_bytes=self.max_frame_bytes)
        try:
            peer.write(data)
        except PeerUnreachableError:
            self._drop(identity)
            raise
        if peer.wants_write:  # the rest leaves as the client reads: the next polls watch for room
            self._poller.modify(peer, zmq.POLLIN | zmq.POLLOUT)

    def close(self, linger_ms: int = 0) -> None:
        """Close every endpoint; `linger_ms`: first let queued replies leave for up to that long."""
        self.router.close(linger_ms=linger_ms)
        for identity, peer in list(self._peers.items()):
            if linger_ms:
                peer.flush_for(linger_ms / 1e3)
            self._drop(identity)
        if self.local is not None:
            self.local.close()

    def _serve_local(self, events: dict, polled: float) -> None:
        """Accept new connections, read the ones with data, flush the ones with room (per poll events, which the
        wait that ended at `polled` returned)."""
        if events.pop(self.local.fileno(), 0) & zmq.POLLIN:
            for peer in self.local.accept():
                identity = LOCAL_TAG + next(self._ids).to_bytes(8, "big")
                self._peers[identity] = peer
                self._poller.register(peer, zmq.POLLIN)
        by_fd = {peer.fileno(): (identity, peer) for identity, peer in self._peers.items()}
        for fd, flags in events.items():
            if fd not in by_fd:
                continue
            identity, peer = by_fd[fd]
            if flags & zmq.POLLOUT:
                try:
                    peer.flush()
                except PeerUnreachableError:
                    self._drop(identity)
                    continue
            if flags & (zmq.POLLIN | zmq.POLLERR):
                self._read(identity, peer, polled)
        for identity, peer in self._peers.items():
            self._poller.modify(peer, zmq.POLLIN | (zmq.POLLOUT if peer.wants_write else 0))

    def _read(self, identity: bytes, peer: LocalPeer, polled: float) -> None:
        try:
            frames = peer.read()
        except (PeerGone, ProtocolError):  # gone, or a frame beyond what is answered: the stream cannot go on
            self._drop(identity)
            return
        for data in frames:
            try:
                self._ready.append((identity, decode(data, max_frame_bytes=self.max_frame_bytes), polled))
            except ProtocolError as e:
                self._ready.append((identity, e, polled))

    def _drop(self, identity: bytes) -> None:
        peer = self._peers.pop(identity, None)
        if peer is not None:
            self._poller.unregister(peer)
            peer.close()


def open_client_ports(ctx: zmq.Context, listen: str, local_path: str | os.PathLike | None, *,
                      max_frame_bytes: int = MAX_FRAME_BYTES) -> ClientPorts:
    """The ROUTER bound at `listen` and, where a path is given, the local stream's listener there."""
    router = bind_server(ctx, listen, max_frame_bytes=max_frame_bytes)
    try:
        local = LocalListener(local_path, answered_cap_bytes(max_frame_bytes)) if local_path else None
    except HybridrtError:
        router.close()
        raise
    return ClientPorts(router, local)
