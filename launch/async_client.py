"""The asyncio native client (for the HTTP API): one DEALER socket per request at a time, like
`launch.client.Client`; a request that ended cleanly leaves its socket (connected, watched) for the next one, so
that a request pays no connect, handshake or monitor set-up (~0.1-0.3 ms of the launcher's time each).

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
connection drops, watched with a zmq socket monitor as in `launch.client`) is ServerError("server_died")
within a fraction of a second, after whatever it sent before has been read.
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
from ipc.codec import decode, encode
from ipc.errors import ProtocolError
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
        self.sock = _dealer(ctx, address)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.poller = zmq.asyncio.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)

    def clean(self) -> bool:
        """Nothing left to read and no disconnect seen: safe for another request."""
        return not (self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN or self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def close(self) -> None:
        _close_monitor(self.sock, self.monitor)
        self.sock.close()


class AsyncClient:
    def __init__(self, address: str, probe_after_s: float = 10.0, probe_timeout_s: float = 5.0,
                 api_key: str | None = None, spin_ms: float | None = None) -> None:
        """`api_key`: the server's --api-key (default: $HYBRIDRT_API_KEY), sent with every request. `spin_ms`: as
        `launch.client.Client`'s."""
        if probe_after_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("probe_after_s and probe_timeout_s must be > 0")
        self.address = address
        self.spin = ReplySpin(None if spin_ms is None else spin_ms / 1e3)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.probe_after_s = probe_after_s
        self.probe_timeout_s = probe_timeout_s
        self._ctx = zmq.asyncio.Context()
        self._idle: list[_Watched] = []  # sockets of requests that ended cleanly

    def close(self) -> None:
        """Close every socket still open (LINGER 0) and the context; idempotent."""
        if not self._ctx.closed:
            self._idle.clear()
            self._ctx.destroy(linger=0)

    def _take(self) -> _Watched:
        while self._idle:
            watched = self._idle.pop()
            if watched.clean():
                return watched
            watched.close()
        return _Watched(self._ctx, self.address)

    def _give_back(self, watched: _Watched) -> None:
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
            raise ServerError("unreachable", f"no status answer from {self.address} within {timeout_s} s")
        return reply.facts

    async def ask(self, request: Message, timeout_s: float = 30.0) -> Message:
        """One request, one reply (tokenize, detokenize); an `Error` reply becomes ServerError."""
        try:
            request.validate()
            frame = encode(request)
        except (ValueError, ProtocolError) as e:
            raise ServerError("invalid_request", str(e)) from None
        sock = _dealer(self._ctx, self.address)
        try:
            await sock.send(frame)
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
            frame = encode(request)
        except (ValueError, ProtocolError) as e:
            raise ServerError("invalid_request", str(e)) from None
        watched = self._take()
        sock = watched.sock
        finished, reusable = False, False
        try:
            await sock.send(frame)
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
                _send_cancel(sock, request.request_id, self.api_key)
            if reusable:
                self._give_back(watched)
            else:
                watched.close()

    async def _next(self, watched: _Watched) -> Message:
        """The request's next message, probing the server's liveness while none comes; ServerError
        ("server_died") once the connection dropped and what came before it has been read. While the server answers
        fast the wait first spins (`ipc.reply_spin`), yielding to the event loop's other tasks between reads."""
        start = time.perf_counter()
        if (window := self.spin.spin_s()) > 0:
            sock, until = watched.sock, start + window
            while time.perf_counter() < until:
                if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    msg = _decoded(await sock.recv(zmq.NOBLOCK))
                    self.spin.waited(time.perf_counter() - start)
                    return msg
                await asyncio.sleep(0)
        msg = await self._wait(watched)
        self.spin.waited(time.perf_counter() - start)
        return msg

    async def _wait(self, watched: _Watched) -> Message:
        sock, monitor = watched.sock, watched.monitor
        while True:
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # here (a streamed token often is already): read it
                return _decoded(await sock.recv(zmq.NOBLOCK))
            ready = dict(await watched.poller.poll(int(self.probe_after_s * 1000)))
            if sock in ready:
                continue
            if monitor in ready:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    msg = await _recv(sock, LOST_DRAIN_MS / 1e3)
                    if msg is not None:
                        return msg
                    raise ServerError(SERVER_DIED, f"the server at {self.address} went away (connection lost) "
                                                   "before answering")
                continue
            await self.status(self.probe_timeout_s)  # raises ServerError("unreachable") if it is gone


async def _recv(sock: zmq.asyncio.Socket, timeout_s: float) -> Message | None:
    """The next message, or None after timeout_s; a frame that isn't a valid message is ServerError."""
    if not await sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        return None
    return _decoded(await sock.recv())


def _decoded(frame: bytes) -> Message:
    try:
        return decode(frame)
    except ProtocolError as e:
        raise ServerError("protocol", f"bad frame from the server: {e}") from None


def _close_monitor(sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)


def _send_cancel(sock: zmq.asyncio.Socket, request_id: str, api_key: str | None) -> None:
    """Synchronous, non-blocking send on the same socket: safe in a cancelled task or a closing generator."""
    try:
        zmq.Socket.shadow(sock.underlying).send(encode(CancelRequest(request_id, api_key)), zmq.NOBLOCK)
        sock.setsockopt(zmq.LINGER, CANCEL_LINGER_MS)
    except zmq.ZMQError:
        pass  # the server also aborts a request whose client socket has gone away
