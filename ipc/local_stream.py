"""The local stream: codec frames over an AF_UNIX stream socket, between the JIT context and clients on its machine.

Why not ZeroMQ for them (issue 12's client P99, H200 host, `bench.probes.socket_hop --cadence-ms 4`, 2000 messages
4 ms apart): a token stream's one-way latency over ZeroMQ ipc:// was P50 107 / P99 333 us with the reader spinning
and 169 / 646 sleeping (ZeroMQ moves every frame through an I/O thread on each side, and a sleeping I/O thread's
wake-up is the tail), over an AF_UNIX stream 8.2 / 15.5 us spinning. On a 7B step the JIT context's own send gaps
had P99 1.02x their P50 while its client's token gaps had 1.14x: the rest was that hop. Here the sender's thread
writes the socket and the reader's thread reads it; nothing else wakes.

A frame on the wire: its length (4 bytes, little-endian), then one codec frame (`ipc.codec`, msgpack). Both ends
use non-blocking sockets: the server never blocks on a client that stopped reading (what the kernel does not take
waits in that peer's outbox, up to OUTBOX_CAP_BYTES, then the peer is dropped), and a client waits with its own
time-outs (select) or spins on non-blocking reads. The socket lives in the launch's private 0700 runtime directory
(`ipc.runtime_dir`): only this user can connect, and the API key is checked per message as on ZeroMQ.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from pathlib import Path

from ipc.errors import ChannelError, PeerUnreachableError, ProtocolError

HEADER = struct.Struct("<I")
READ_BYTES = 1 << 16  # one non-blocking read takes up to this much
OUTBOX_CAP_BYTES = 64 << 20  # a client this far behind is not reading: dropped, as ZeroMQ's full queue would be
SEND_BUFFER_BYTES = 1 << 20  # room for a burst of token chunks before anything waits in an outbox


class PeerGone(ChannelError):
    """The other end closed its socket (or its process died)."""


class FrameBuffer:
    """Bytes read from a stream -> whole frames. A length above `cap_bytes` is a protocol error (the stream cannot
    be resynchronised after it: the caller closes the connection)."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        self._data += data

    def __len__(self) -> int:
        """Bytes held (whole frames and a part of one)."""
        return len(self._data)

    def pop(self) -> bytes | None:
        """The next whole frame, or None until more bytes come."""
        if len(self._data) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._data)
        if length > self.cap_bytes:
            raise ProtocolError("oversized", f"a frame of {length} bytes (limit {self.cap_bytes})")
        end = HEADER.size + length
        if len(self._data) < end:
            return None
        frame = bytes(self._data[HEADER.size:end])
        del self._data[:end]
        return frame


def frame(data: bytes) -> bytes:
    """`data` with its length in front, as it goes on the wire."""
    return HEADER.pack(len(data)) + data


def _read_some(sock: socket.socket, into: FrameBuffer) -> bool:
    """Read what the socket has without blocking; False if nothing was there. PeerGone on end of stream."""
    try:
        data = sock.recv(READ_BYTES)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as e:  # ECONNRESET and the like: the other end is gone
        raise PeerGone(f"the local stream broke: {e}") from None
    if not data:
        raise PeerGone("the other end closed the local stream")
    into.feed(data)
    return True


class LocalPeer:
    """The server's end of one client's connection: frames in as they arrive, frames out without blocking."""

    def __init__(self, sock: socket.socket, cap_bytes: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._sock = sock
        self._in = FrameBuffer(cap_bytes)
        self._out = bytearray()  # what the socket did not take yet

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def read(self) -> list[bytes]:
        """Every whole frame that has arrived (reads until the socket has nothing more). PeerGone at end of stream
        (frames before it are returned first, by the next call), ProtocolError for an oversized frame."""
        frames: list[bytes] = []
        while True:
            while (f := self._in.pop()) is not None:
                frames.append(f)
            try:
                if not _read_some(self._sock, self._in):
                    return frames
            except PeerGone:  # nothing was added since the pops above
                if frames:
                    return frames
                raise

    def write(self, data: bytes) -> None:
        """Send one frame now as far as the socket takes it; the rest waits for `flush`. PeerUnreachableError if
        the client is gone or has OUTBOX_CAP_BYTES unread."""
        self._out += frame(data)
        self.flush()
        if len(self._out) > OUTBOX_CAP_BYTES:
            raise PeerUnreachableError(f"local client is not reading ({len(self._out)} bytes waiting)")

    def flush(self) -> None:
        while self._out:
            try:
                sent = self._sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise PeerUnreachableError(f"local client is gone: {e}") from None
            del self._out[:sent]

    def flush_for(self, seconds: float) -> None:
        """Wait up to `seconds` for the outbox to leave (a process about to exit: its last replies)."""
        deadline = time.monotonic() + seconds
        while self._out and (left := deadline - time.monotonic()) > 0:
            select.select([], [self._sock], [], left)
            try:
                self.flush()
            except PeerUnreachableError:
                return

    def close(self) -> None:
        self._sock.close()


class LocalListener:
    """The server's listening socket at `path` (removed again by `close`)."""

    def __init__(self, path: str | os.PathLike, cap_bytes: int) -> None:
        self.path = Path(path)
        self.cap_bytes = cap_bytes
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(str(self.path))
            self._sock.listen(128)
        except OSError as e:
            self._sock.close()
            raise ChannelError(f"cannot listen on {self.path}: {e}") from None
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> list[LocalPeer]:
        """Every connection waiting to be accepted."""
        peers = []
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return peers
            peers.append(LocalPeer(sock, self.cap_bytes))

    def close(self) -> None:
        if self._sock.fileno() != -1:
            self._sock.close()
            self.path.unlink(missing_ok=True)


class LocalConnection:
    """A client's end: send a frame (waiting up to a time-out for room), read frames without blocking or wait for
    them. End of stream (the server closed or died) is PeerGone, after every frame sent before it was read."""

    def __init__(self, path: str | os.PathLike, cap_bytes: int, timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            raise ChannelError(f"cannot connect to the local stream {self.path}: {e}") from None
        self._sock.setblocking(False)
        self._in = FrameBuffer(cap_bytes)
        self.gone = False  # end of stream seen: only what is buffered can still be read

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def socket(self) -> socket.socket:
        """The non-blocking socket, for an event loop's own send (`loop.sock_sendall`) of `frame(data)`."""
        return self._sock

    @property
    def buffered(self) -> bool:
        """Bytes have arrived that no frame has been taken from yet."""
        return len(self._in) > 0

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def send(self, data: bytes, timeout_ms: int | None = None) -> None:
        """Send one frame whole; TimeoutError if the server takes none of it within timeout_ms, PeerGone if it is
        gone."""
        out = memoryview(frame(data))
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1e3
        while out:
            try:
                out = out[self._sock.send(out):]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self.gone = True
                raise PeerGone(f"the local stream broke: {e}") from None
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"the server took no message within {timeout_ms} ms")
            select.select([], [self._sock], [], left)

    def alive(self) -> bool:
        """Read what has arrived (keeping it) and say whether the stream is still open."""
        try:
            while not self.gone and _read_some(self._sock, self._in):
                pass
        except PeerGone:
            self.gone = True
        return not self.gone

    def poll_frame(self) -> bytes | None:
        """The next frame if one has arrived (one non-blocking read at most); None if not yet. PeerGone once the
        stream ended and nothing is left."""
        if (f := self._in.pop()) is not None:
            return f
        if not self.gone:
            try:
                if _read_some(self._sock, self._in):
                    return self._in.pop()
                return None
            except PeerGone:
                self.gone = True
        if (f := self._in.pop()) is not None:
            return f
        raise PeerGone(f"the server closed the local stream {self.path}")

    def wait_frame(self, timeout_ms: int) -> bytes | None:
        """The next frame, sleeping in select() for up to timeout_ms; None after it. PeerGone as in poll_frame."""
        deadline = time.monotonic() + max(0, timeout_ms) / 1e3
        while (f := self.poll_frame()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            select.select([self._sock], [], [], left)
        return f

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LocalConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
