"""The asyncio native client (for the HTTP API): one connection per request at a time, like `launch.client.Client`: a
DEALER socket, or, with `local=True` and a server on this machine, its local stream (`ipc.local_stream`, an AF_UNIX
socket: found through the server's status before the first request). A request that ended cleanly leaves its
connection (and a DEALER's monitor) for the next one, so that a request pays no connect, handshake or monitor set-up
(~0.1-0.3 ms of the launcher's time each).

    client = AsyncClient("tcp://127.0.0.1:7461")
    async for msg in client.generate(prompt="Hi", params={"max_tokens": 8}):
        ...  # TokenChunk per generated token, then one Finished
    client.close()

A consumer that stops early (breaks out, is cancelled because its HTTP client went away, or closes the
generator) makes the generator send `CancelRequest`, so the JIT context frees the executor for the next
request. That send never awaits: under a cancelled task every await would be cancelled again.

No total deadline: a request may wait in the server's FCFS queue behind long generations. Instead, after
`probe_after_s` without a message the client asks the server for its status on a second socket, and gives up
with ServerError("unreachable") only when that goes unanswered. A server that dies mid-request (its
connection drops, watched with a zmq socket monitor as in `launch.client`, or its local stream ends) is
ServerError("server_died") within a fraction of a second, after whatever it sent before has been read.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ipc.channel import connect_socket
from ipc.codec import MAX_FRAME_BYTES, decode, encode
from ipc.errors import ChannelError, ProtocolError
from ipc.local_stream import LocalConnection, PeerGone, frame
from ipc.messages import (
    CancelRequest,
    ChatOptions,
    Error,
    Finished,
    GenerateRequest,
    Message,
    Started,
    Status,
    StatusReply,
    TokenChunk,
)
from ipc.reply_spin import ReplySpin
from launch.client import API_KEY_ENV, LOST_DRAIN_MS, SERVER_DIED, ServerError

CANCEL_LINGER_MS = 200  # let the CancelRequest leave before the socket's pending frames are dropped
IDLE_SOCKETS = 8  # connected sockets kept for reuse (as many requests at once reuse them; more open new ones)


def _dealer(ctx: zmq.asyncio.Context, address: str) -> zmq.asyncio.Socket:
    return connect_socket(ctx, zmq.DEALER, address)  # ipc.channel's options (linger, frame cap, reconnect)


class _Watched:
    """A connected DEALER socket and its disconnect monitor."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.address = address
        self.sock = _dealer(ctx, address)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def poll_frame(self) -> bytes | None:
        """A frame that has arrived, without waiting; None if none has."""
        if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return await self.sock.recv(zmq.NOBLOCK)
        return None

    async def wait_frame(self, timeout_s: float) -> bytes | None:
        """The next frame, or None after timeout_s; ServerError("server_died") once the connection dropped and what
        came before it has been read."""
        while True:
            if (data := await self.poll_frame()) is not None:  # here (a streamed token often is already)
                return data
            ready = dict(await self.poller.poll(int(timeout_s * 1000)))
            if self.sock in ready:
                continue
            if self.monitor not in ready:
                return None
            event = parse_monitor_message(await self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                if await self.sock.poll(LOST_DRAIN_MS, zmq.POLLIN):
                    return await self.sock.recv()
                raise ServerError(SERVER_DIED, f"the server at {self.address} went away (connection lost) "
                                               "before answering")

    def cancel(self, request_id: str, api_key: str | None) -> None:
        """Synchronous, non-blocking send of CancelRequest: safe in a cancelled task or a closing generator."""
        try:
            zmq.Socket.shadow(self.sock.underlying).send(encode(CancelRequest(request_id, api_key)), zmq.NOBLOCK)
            self.sock.setsockopt(zmq.LINGER, CANCEL_LINGER_MS)
        except zmq.ZMQError:
            pass  # the server also aborts a request whose client socket has gone away

    def clean(self) -> bool:
        """Nothing left to read and no disconnect seen: safe for another request."""
        return not (self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN or self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def close(self) -> None:
        _close_monitor(self.sock, self.monitor)
        self.sock.close()


class _Local:
    """A connection over the server's local stream; its end (the server closed it or died) is server_died once
    everything before it has been read."""

    def __init__(self, path: str) -> None:
        self.address = path
        self.conn = LocalConnection(path, MAX_FRAME_BYTES)

    async def send(self, data: bytes) -> None:
        try:
            await asyncio.get_running_loop().sock_sendall(self.conn.socket, frame(data))
        except OSError as e:
            raise ServerError(SERVER_DIED, f"the server at {self.address} went away: {e}") from None

    async def poll_frame(self) -> bytes | None:
        try:
            return self.conn.poll_frame()
        except PeerGone:
            raise ServerError(SERVER_DIED, f"the server at {self.address} went away (connection lost) before "
                                           "answering") from None

    async def wait_frame(self, timeout_s: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (data := await self.poll_frame()) is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            readable = loop.create_future()
            loop.add_reader(self.conn.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, left)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(self.conn.fileno())
        return data

    def cancel(self, request_id: str, api_key: str | None) -> None:
        """As _Watched.cancel; the connection is closed after it (never reused), so even a frame the socket took only
        part of ends cleanly for the server: the stream ends, and the request with it."""
        try:
            self.conn.socket.send(frame(encode(CancelRequest(request_id, api_key))))
        except OSError:
            pass  # full or gone: the server aborts a request whose stream has ended

    def clean(self) -> bool:
        return self.conn.alive() and not self.conn.buffered

    def close(self) -> None:
        self.conn.close()


Connection = _Watched | _Local


class AsyncClient:
    def __init__(self, address: str, probe_after_s: float = 10.0, probe_timeout_s: float = 5.0,
                 api_key: str | None = None, spin_ms: float | None = None, local: bool = True) -> None:
        """`api_key`: the server's --api-key (default: $HYBRIDRT_API_KEY), sent with every request. `spin_ms`,
        `local`: as `launch.client.Client`'s (`local=False` keeps ZeroMQ). The HTTP app's TTFT on the H200 was
        0.46-0.48 ms lower over the local stream than over ZeroMQ with each of three loop variants, the two apps
        alternating on one serve (`bench.probes.http_split`, bench/NOTES.md, nineteenth session)."""
        if probe_after_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("probe_after_s and probe_timeout_s must be > 0")
        self.address = address
        self.spin = ReplySpin(None if spin_ms is None else spin_ms / 1e3)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.probe_after_s = probe_after_s
        self.probe_timeout_s = probe_timeout_s
        self._ctx = zmq.asyncio.Context()
        self._idle: list[Connection] = []  # connections of requests that ended cleanly
        self._local_path: str | None = None  # the server's local stream, once known to be reachable
        self._local_known = not local  # whether to look for it (once, before the first generate)

    @property
    def local_path(self) -> str | None:
        """The local stream generate uses (None: ZeroMQ), once the first generate has looked for it."""
        return self._local_path

    def close(self) -> None:
        """Close every connection still open (LINGER 0) and the context; idempotent."""
        if not self._ctx.closed:
            for conn in self._idle:
                if isinstance(conn, _Local):
                    conn.close()
            self._idle.clear()
            self._ctx.destroy(linger=0)

    async def _find_local(self) -> None:
        """As `Client._find_local`: the server's status says where its local stream is; keep it if it connects."""
        try:
            await self.status(self.probe_timeout_s)  # adopts the local stream it names
        except ServerError as e:
            if e.code != "unreachable":
                self._local_known = True  # an answer (e.g. unauthorized): ZeroMQ, as the request will show

    def _adopt_local(self, facts: dict) -> None:
        """Use the local stream a status reply names, if a connection there succeeds (once per client)."""
        self._local_known = True
        path = facts.get("local_stream")
        if isinstance(path, str) and os.path.exists(path):
            try:
                first = _Local(path)
            except ChannelError:
                return
            self._local_path = path
            for conn in self._idle:
                conn.close()
            self._idle[:] = [first]  # the first generate's connection (as `Client._find_local` keeps its own)

    def _take(self) -> Connection:
        while self._idle:
            watched = self._idle.pop()
            if watched.clean():
                return watched
            watched.close()
        if self._local_path is not None:
            try:
                return _Local(self._local_path)
            except ChannelError:
                raise ServerError(SERVER_DIED, f"the server at {self.address} went away (its local stream "
                                               f"{self._local_path} refuses connections)") from None
        return _Watched(self._ctx, self.address)

    def _give_back(self, watched: Connection) -> None:
        if len(self._idle) < IDLE_SOCKETS and not self._ctx.closed and watched.clean():
            self._idle.append(watched)
        else:
            watched.close()

    async def status(self, timeout_s: float = 5.0) -> dict:
        """The server's facts; ServerError("unreachable") if it does not answer within timeout_s."""
        sock = _dealer(self._ctx, self.address)
        try:
            await sock.send(encode(Status(api_key=self.api_key)))
            reply = await _recv(sock, timeout_s)
        finally:
            sock.close()
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message)
        if not isinstance(reply, StatusReply):
            raise ServerError("unreachable", f"no status answer from {self.address} within {timeout_s} s (is "
                                             "`hybridrt serve` running there?)")
        if not self._local_known:  # what the first generate would ask: its TTFT then skips the round trip
            self._adopt_local(reply.facts)
        return reply.facts

    async def ask(self, request: Message, timeout_s: float = 30.0) -> Message:
        """One request, one reply (tokenize, detokenize); an `Error` reply becomes ServerError."""
        try:
            request.validate()
            wire = encode(request)
        except (ValueError, ProtocolError) as e:
            raise ServerError("invalid_request", str(e)) from None
        sock = _dealer(self._ctx, self.address)
        try:
            await sock.send(wire)
            reply = await _recv(sock, timeout_s)
        finally:
            sock.close()
        if reply is None:
            raise ServerError("unreachable", f"no answer from {self.address} within {timeout_s} s")
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message)
        return reply

    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       token_ids: list[int] | None = None, params: dict | None = None,
                       request_id: str | None = None, chat: ChatOptions | None = None,
                       warm_up: bool = False,
                       started: bool = False) -> AsyncGenerator[Started | TokenChunk | Finished, None]:
        """Yield a TokenChunk per generated token, then the Finished message; raises ServerError. `warm_up`: the
        server neither logs nor counts the request (GenerateRequest.warm_up). `started`: first yield the server's
        Started, sent once the request passed its checks and leaves the queue for the executor (before its prefill):
        whatever the server refuses (a bad prompt, bad parameters) comes before it as ServerError.

        A request that can't even be encoded (bad types, over the frame limit) is
        ServerError("invalid_request").
        """
        try:
            request = GenerateRequest(request_id or uuid.uuid4().hex, prompt, messages, token_ids,
                                      dict(params or {}), self.api_key, chat, warm_up)
            request.validate()
            wire = encode(request)
        except (ValueError, ProtocolError) as e:
            raise ServerError("invalid_request", str(e)) from None
        if not self._local_known:
            await self._find_local()
        watched = self._take()
        finished, reusable = False, False
        try:
            await watched.send(wire)
            while not finished:
                try:
                    msg = await self._next(watched)
                except ServerError as e:
                    finished = e.code == SERVER_DIED  # nobody left to cancel at
                    raise
                if isinstance(msg, Error):
                    finished = True
                    raise ServerError(msg.code, msg.message)
                if isinstance(msg, Started):
                    self.spin.server_said(msg.spin_ms)
                    if started:
                        yield msg
                    continue  # the server's check that we are still here
                if not isinstance(msg, (TokenChunk, Finished)):
                    finished = True
                    raise ServerError("protocol", f"unexpected {type(msg).__name__} from the server")
                finished = isinstance(msg, Finished)
                reusable = finished
                yield msg
        finally:
            if not finished:
                watched.cancel(request.request_id, self.api_key)
            if reusable:
                self._give_back(watched)
            else:
                watched.close()

    async def _next(self, watched: Connection) -> Message:
        """The request's next message, probing the server's liveness while none comes; ServerError
        ("server_died") once the connection dropped and what came before it has been read. While the server answers
        fast the wait first spins (`ipc.reply_spin`), yielding to the event loop's other tasks between reads."""
        start = time.perf_counter()
        data = None
        if (window := self.spin.spin_s()) > 0:
            until = start + window
            while data is None and time.perf_counter() < until:
                if (data := await watched.poll_frame()) is None:
                    await asyncio.sleep(0)
        while data is None:
            if (data := await watched.wait_frame(self.probe_after_s)) is None:
                await self.status(self.probe_timeout_s)  # raises ServerError("unreachable") if it is gone
        self.spin.waited(time.perf_counter() - start)
        return _decoded(data)


async def _recv(sock: zmq.asyncio.Socket, timeout_s: float) -> Message | None:
    """The next message, or None after timeout_s; a frame that isn't a valid message is ServerError."""
    if not await sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        return None
    return _decoded(await sock.recv())


def _decoded(data: bytes) -> Message:
    try:
        return decode(data)
    except ProtocolError as e:
        raise ServerError("protocol", f"bad frame from the server: {e}") from None


def _close_monitor(sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
