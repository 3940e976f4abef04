"""The native Python client: streaming `TokenChunk`s then one `Finished` per request, over ZeroMQ (a DEALER socket)
or, to a server on this machine, over its local stream (`ipc.local_stream`: an AF_UNIX socket, for the token gaps'
tail; found through the server's status before the first request, or from the first `status()` call).

    from launch.client import Client
    with Client("tcp://127.0.0.1:7461") as client:
        for chunk in client.generate(messages=[{"role": "user", "content": "Hi"}], params={"max_tokens": 32}):
            print(chunk.text, end="")

A server that dies mid-request (the JIT context killed, its host gone) is reported within a fraction of a second as
ServerError("server_died"), not after the time-out: each ZeroMQ socket's connection is watched with a zmq socket
monitor (a local stream ends when its server's process does), and a connection lost while a request waits for its
answer means the answer can never come (the server routes replies by connection, so even a restarted server could not
deliver it). Whatever the server sent before the connection dropped (e.g. an `executor_died` error) is still read
first.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from ipc.channel import connect_client
from ipc.codec import MAX_FRAME_BYTES, decode, encode
from ipc.errors import ChannelError, HybridrtError
from ipc.local_stream import LocalConnection, PeerGone
from ipc.messages import (
    CancelRequest,
    ChatOptions,
    DetokenizeReply,
    DetokenizeRequest,
    Error,
    Finished,
    GenerateRequest,
    Message,
    Started,
    Status,
    StatusReply,
    TokenChunk,
    TokenizeReply,
    TokenizeRequest,
)
from ipc.reply_spin import PROCESS_WAITS, ReplySpin
from jit_context.sampling_params import SamplingParams
from launch import API_KEY_ENV

LOST_DRAIN_MS = 100  # after the connection dropped, read what the server sent before it for this long

SERVER_DIED = "server_died"
FIND_LOCAL_MS = 5000  # the wait for the server's status before the first generate (then ZeroMQ, and ask again later)


class ServerError(HybridrtError):
    """The server answered with an error (bad request, executor died, ...), died with the request unanswered
    (`server_died`) or did not answer in time (`timeout`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class WatchedChannel:
    """A client DEALER channel plus a monitor of its connection: `recv` raises ServerError("server_died") once
    the connection to the server drops while an answer is awaited."""

    EVENTS = zmq.EVENT_DISCONNECTED

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.address = address
        self.channel = connect_client(ctx, address)
        self.monitor = self.channel.socket.get_monitor_socket(self.EVENTS)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.poller = zmq.Poller()
        self.poller.register(self.channel.socket, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.lost = False  # the connection dropped since this socket was made: no reply can still come

    def send(self, msg: Message, *, timeout_ms: int | None = None) -> None:
        self.channel.send(msg, timeout_ms=timeout_ms)

    def check(self) -> bool:
        """Read pending monitor events; True while the connection has not been lost."""
        while self.monitor.poll(0, zmq.POLLIN):
            self._event()
        return not self.lost

    def recv(self, timeout_ms: int, spin: ReplySpin | None = None) -> Message | None:
        """The next message; None after timeout_ms; ServerError("server_died") once the connection is lost and
        everything that came before that has been read. `spin`: first spin on non-blocking reads for up to its
        window (`ipc.reply_spin`), and tell it how long the wait took."""
        start = time.perf_counter()
        if spin is None:
            return self._recv_timed(timeout_ms, start, spin)
        with PROCESS_WAITS.waiting() as alone:  # spin only while no other wait of this process may need the GIL
            sock, until = self.channel.socket, start + spin.spin_s()
            while alone() and time.perf_counter() < until:
                if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # the I/O thread has queued a frame: read it
                    msg = self.channel.recv(timeout_ms=0)
                    spin.waited(time.perf_counter() - start)
                    return msg
            return self._recv_timed(timeout_ms, start, spin)

    def _recv_timed(self, timeout_ms: int, start: float, spin: ReplySpin | None) -> Message | None:
        """The sleeping part of `recv` (counted in `PROCESS_WAITS` by the caller where the client has a spin rule)."""
        msg = self._recv_blocking(timeout_ms - int((time.perf_counter() - start) * 1e3))
        if spin is not None and msg is not None:
            spin.waited(time.perf_counter() - start)
        return msg

    def _recv_blocking(self, timeout_ms: int) -> Message | None:
        deadline = time.monotonic() + max(0, timeout_ms) / 1e3
        while not self.lost:
            left_ms = max(0, int((deadline - time.monotonic()) * 1e3))
            ready = dict(self.poller.poll(left_ms))
            if self.channel.socket in ready:
                return self.channel.recv(timeout_ms=0)
            if self.monitor in ready:
                self._event()
            elif left_ms == 0:
                return None
        msg = self.channel.recv(timeout_ms=LOST_DRAIN_MS)
        if msg is None:
            raise ServerError(SERVER_DIED, f"the server at {self.address} went away (connection lost) before "
                                           "answering")
        return msg

    def _event(self) -> None:
        event = parse_monitor_message(self.monitor.recv_multipart())
        if event["event"] == zmq.EVENT_DISCONNECTED:
            self.lost = True

    def close(self) -> None:
        if self.channel.closed:
            return
        try:
            self.channel.socket.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.channel.close()

    def __enter__(self) -> WatchedChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalChannel:
    """A client's connection over the local stream (`ipc.local_stream`), with WatchedChannel's interface: the server
    closing the stream (or dying) is ServerError("server_died") once everything sent before it has been read."""

    def __init__(self, path: str, timeout_s: float, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.address = path
        self.max_frame_bytes = max_frame_bytes
        self.conn = LocalConnection(path, max_frame_bytes, timeout_s)

    @property
    def lost(self) -> bool:
        return self.conn.gone

    def send(self, msg: Message, *, timeout_ms: int | None = None) -> None:
        try:
            self.conn.send(encode(msg, max_frame_bytes=self.max_frame_bytes), timeout_ms)
        except PeerGone as e:
            raise ServerError(SERVER_DIED, f"the server at {self.address} went away: {e}") from None

    def check(self) -> bool:
        """True while the server has not closed the stream."""
        return self.conn.alive()

    def recv(self, timeout_ms: int, spin: ReplySpin | None = None) -> Message | None:
        """As WatchedChannel.recv: spin on non-blocking reads for up to the spin window, then sleep in select()."""
        start = time.perf_counter()
        try:
            if spin is None:
                data = self.conn.wait_frame(timeout_ms)
            else:
                with PROCESS_WAITS.waiting() as alone:  # as WatchedChannel: one spinning wait per process
                    data, until = None, start + spin.spin_s()
                    while data is None and alone() and time.perf_counter() < until:
                        data = self.conn.poll_frame()
                    if data is None:
                        data = self.conn.wait_frame(timeout_ms - int((time.perf_counter() - start) * 1e3))
        except PeerGone:
            raise ServerError(SERVER_DIED, f"the server at {self.address} went away (connection lost) before "
                                           "answering") from None
        if data is None:
            return None
        if spin is not None:
            spin.waited(time.perf_counter() - start)
        return decode(data, max_frame_bytes=self.max_frame_bytes)

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> LocalChannel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Connection = WatchedChannel | LocalChannel


class Client:
    """Requests reuse an idle socket of the calling thread, so a request pays no connection set-up; a request
    started while another is in flight on the same thread (two generators interleaved), or on another thread,
    gets a socket of its own. Replies to earlier, abandoned requests are skipped by request id."""

    def __init__(self, address: str, timeout_s: float = 60.0, api_key: str | None = None,
                 spin_ms: float | None = None, local: bool = True) -> None:
        """`api_key`: the server's --api-key (default: $HYBRIDRT_API_KEY), sent with every request. `spin_ms`: how
        long a request's wait for its next message spins before it sleeps, while the server answers that fast
        (`ipc.reply_spin`; None: as long as the server says, 0: always sleep). `local`: generate over the server's
        local stream where it has one this process can reach (`ipc.local_stream`: learnt from its status before the
        first request; a server on another machine, or one without it, is used over ZeroMQ); False: ZeroMQ only."""
        self.address = address
        self._local_path: str | None = None  # the server's local stream, once known to be reachable
        self._local_known = not local  # whether to look for it (once, before the first generate)
        self.spin = ReplySpin(None if spin_ms is None else spin_ms / 1e3)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context()
        self._idle = threading.local()  # .sock: this thread's idle socket, or None
        self._lock = threading.Lock()
        self._open: set[Connection] = set()  # every socket not yet closed, to close them all on close()
        # Connected now: the first request finds its socket made and the connection set up in the background
        # (~1-2 ms of socket, monitor and ZMTP handshake otherwise in the first request's TTFT).
        self._idle.sock = self._new_socket()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for sock in self._open:
                sock.close()
            self._open.clear()
        self._ctx.term()

    @property
    def local_path(self) -> str | None:
        """The local stream generate uses (None: ZeroMQ), once the first generate has looked for it."""
        return self._local_path

    def _find_local(self) -> None:
        """Ask the server (once) where its local stream is, and keep it if a connection there succeeds: the path is
        in the server's private runtime dir, so only the same user on the same machine reaches it."""
        sock, wait_ms = self._take_socket(), min(self.timeout_ms, FIND_LOCAL_MS)
        try:
            sock.send(Status(api_key=self.api_key), timeout_ms=wait_ms)
            reply = sock.recv(timeout_ms=wait_ms)
        except (ServerError, TimeoutError):
            reply = None
        self._give_back(sock, reusable=isinstance(reply, (StatusReply, Error)))
        if not isinstance(reply, StatusReply):
            return  # no answer (generate reports why), or an error such as `unauthorized`: ZeroMQ, as asked
        self._adopt_local(reply.facts)

    def _adopt_local(self, facts: dict) -> None:
        """Use the local stream a status reply names, if a connection there succeeds (once per client)."""
        self._local_known = True
        path = facts.get("local_stream")
        if isinstance(path, str) and os.path.exists(path):
            try:
                first = LocalChannel(path, self.timeout_ms / 1e3)
            except ChannelError:
                return
            self._local_path = path
            idle, self._idle.sock = getattr(self._idle, "sock", None), None
            if idle is not None:
                self._give_back(idle, reusable=False)  # the ZeroMQ socket: generate uses the local stream now
            self._give_back(self._register(first), reusable=True)

    def _take_socket(self) -> Connection:
        sock = getattr(self._idle, "sock", None)
        self._idle.sock = None
        if sock is not None and not sock.check():  # the server went away while it was idle
            self._give_back(sock, reusable=False)
            sock = None
        return sock if sock is not None else self._new_socket()

    def _new_socket(self) -> Connection:
        if self._local_path is not None:
            try:
                return self._register(LocalChannel(self._local_path, self.timeout_ms / 1e3))
            except ChannelError:  # the server has gone: report it as ZeroMQ would
                raise ServerError(SERVER_DIED, f"the server at {self.address} went away (its local stream "
                                               f"{self._local_path} refuses connections)") from None
        return self._register(WatchedChannel(self._ctx, self.address))

    def _register(self, sock: Connection) -> Connection:
        with self._lock:
            self._open.add(sock)
        return sock

    def _give_back(self, sock: Connection, reusable: bool) -> None:
        """Keep the socket as this thread's idle one, unless it may hold a late reply or one is kept already."""
        if reusable and not sock.lost and getattr(self._idle, "sock", None) is None:
            self._idle.sock = sock
            return
        sock.close()
        with self._lock:
            self._open.discard(sock)

    def status(self, timeout_s: float = 5.0) -> dict:
        with connect_client(self._ctx, self.address) as sock:
            sock.send(Status(api_key=self.api_key), timeout_ms=int(timeout_s * 1000))
            reply = sock.recv(timeout_ms=int(timeout_s * 1000))
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message)
        if not isinstance(reply, StatusReply):
            raise ServerError("no_answer", f"no status answer from {self.address} within {timeout_s} s (is `hybridrt "
                                           "serve` running there?)")
        if not self._local_known:  # what the first generate would ask: its TTFT then skips the round trip
            self._adopt_local(reply.facts)
        return reply.facts

    def tokenize(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 add_generation_prompt: bool = True) -> list[int]:
        """The token ids a generation would see for `prompt` (raw) or `messages` (chat template applied)."""
        try:
            request = TokenizeRequest(uuid.uuid4().hex, prompt, messages, add_generation_prompt, self.api_key)
            request.validate()
        except ValueError as e:
            raise ServerError("invalid_request", str(e)) from None
        return self._ask(request, TokenizeReply).token_ids

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included."""
        try:
            request = DetokenizeRequest(uuid.uuid4().hex, list(token_ids), self.api_key)
            request.validate()
        except ValueError as e:
            raise ServerError("invalid_request", str(e)) from None
        return self._ask(request, DetokenizeReply).text

    def _ask(self, request: Message, reply_type: type) -> Message:
        """One request, one reply (answered by the server at once, even while it generates)."""
        with WatchedChannel(self._ctx, self.address) as sock:
            sock.send(request, timeout_ms=self.timeout_ms)
            reply = sock.recv(timeout_ms=self.timeout_ms)
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message)
        if not isinstance(reply, reply_type):
            raise ServerError("timeout", f"no answer from {self.address} within {self.timeout_ms / 1e3} s")
        return reply

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 token_ids: list[int] | None = None, params: dict | SamplingParams | None = None,
                 chat: ChatOptions | None = None) -> Iterator[TokenChunk | Finished]:
        """Yield a TokenChunk per generated token, then the Finished message; raises ServerError. `chat`: how
        `messages` become the prompt (continue the last message, template kwargs)."""
        wire_params = params.to_dict() if isinstance(params, SamplingParams) else dict(params or {})
        request = GenerateRequest(uuid.uuid4().hex, prompt, messages, token_ids, wire_params, self.api_key, chat)
        request.validate()  # ValueError here, before anything is sent
        if not self._local_known:
            self._find_local()
        finished, reusable = False, True
        sock = self._take_socket()
        try:
            sock.send(request, timeout_ms=self.timeout_ms)
            while not finished:
                try:
                    msg = sock.recv(timeout_ms=self.timeout_ms, spin=self.spin)
                except ServerError:
                    finished = True  # nothing to cancel: the server is gone
                    raise
                if msg is None:
                    reusable = False  # a late reply may still come
                    raise ServerError("timeout", f"no answer from {self.address} within {self.timeout_ms / 1e3} s")
                if getattr(msg, "request_id", request.request_id) not in (request.request_id, None):
                    continue  # a late reply to an earlier request that was abandoned
                if isinstance(msg, Started):
                    self.spin.server_said(msg.spin_ms)
                    continue  # the server's check that we are still here
                if isinstance(msg, Error):
                    finished = True
                    raise ServerError(msg.code, msg.message)
                finished = isinstance(msg, Finished)
                yield msg
        finally:
            if not finished:  # the caller stopped early: free the server
                try:
                    sock.send(CancelRequest(request.request_id, self.api_key), timeout_ms=100)
                except (TimeoutError, HybridrtError, zmq.ZMQError):
                    reusable = False
            self._give_back(sock, reusable)
