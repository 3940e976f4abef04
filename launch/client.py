"""The native Python client: a DEALER socket, streaming `TokenChunk`s then one `Finished` per request.

    from launch.client import Client
    with Client("tcp://127.0.0.1:7461") as client:
        for chunk in client.generate(messages=[{"role": "user", "content": "Hi"}], params={"max_tokens": 32}):
            print(chunk.text, end="")
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import zmq

from ipc.channel import Channel, connect_client
from ipc.errors import HybridrtError
from ipc.messages import (
    CancelRequest,
    DetokenizeReply,
    DetokenizeRequest,
    Error,
    Finished,
    GenerateRequest,
    Message,
    Status,
    StatusReply,
    TokenChunk,
    TokenizeReply,
    TokenizeRequest,
)
from jit_context.sampling_params import SamplingParams


class ServerError(HybridrtError):
    """The server answered with an error (bad request, executor died, ...) or did not answer in time."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """Requests reuse an idle socket of the calling thread, so a request pays no connection set-up; a request
    started while another is in flight on the same thread (two generators interleaved), or on another thread,
    gets a socket of its own. Replies to earlier, abandoned requests are skipped by request id."""

    def __init__(self, address: str, timeout_s: float = 60.0) -> None:
        self.address = address
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = zmq.Context()
        self._idle = threading.local()  # .sock: this thread's idle socket, or None
        self._lock = threading.Lock()
        self._open: set[Channel] = set()  # every socket not yet closed, to close them all on close()

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

    def _take_socket(self) -> Channel:
        sock = getattr(self._idle, "sock", None)
        self._idle.sock = None
        if sock is None:
            sock = connect_client(self._ctx, self.address)
            with self._lock:
                self._open.add(sock)
        return sock

    def _give_back(self, sock: Channel, reusable: bool) -> None:
        """Keep the socket as this thread's idle one, unless it may hold a late reply or one is kept already."""
        if reusable and getattr(self._idle, "sock", None) is None:
            self._idle.sock = sock
            return
        sock.close()
        with self._lock:
            self._open.discard(sock)

    def status(self, timeout_s: float = 5.0) -> dict:
        with connect_client(self._ctx, self.address) as sock:
            sock.send(Status(), timeout_ms=int(timeout_s * 1000))
            reply = sock.recv(timeout_ms=int(timeout_s * 1000))
        if not isinstance(reply, StatusReply):
            raise ServerError("no_answer", f"no status answer from {self.address} within {timeout_s} s")
        return reply.facts

    def tokenize(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 add_generation_prompt: bool = True) -> list[int]:
        """The token ids a generation would see for `prompt` (raw) or `messages` (chat template applied)."""
        try:
            request = TokenizeRequest(uuid.uuid4().hex, prompt, messages, add_generation_prompt)
            request.validate()
        except ValueError as e:
            raise ServerError("invalid_request", str(e)) from None
        return self._ask(request, TokenizeReply).token_ids

    def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included."""
        try:
            request = DetokenizeRequest(uuid.uuid4().hex, list(token_ids))
            request.validate()
        except ValueError as e:
            raise ServerError("invalid_request", str(e)) from None
        return self._ask(request, DetokenizeReply).text

    def _ask(self, request: Message, reply_type: type) -> Message:
        """One request, one reply (answered by the server at once, even while it generates)."""
        with connect_client(self._ctx, self.address) as sock:
            sock.send(request, timeout_ms=self.timeout_ms)
            reply = sock.recv(timeout_ms=self.timeout_ms)
        if isinstance(reply, Error):
            raise ServerError(reply.code, reply.message)
        if not isinstance(reply, reply_type):
            raise ServerError("timeout", f"no answer from {self.address} within {self.timeout_ms / 1e3} s")
        return reply

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 token_ids: list[int] | None = None,
                 params: dict | SamplingParams | None = None) -> Iterator[TokenChunk | Finished]:
        """Yield a TokenChunk per generated token, then the Finished message; raises ServerError."""
        wire_params = params.to_dict() if isinstance(params, SamplingParams) else dict(params or {})
        request = GenerateRequest(uuid.uuid4().hex, prompt, messages, token_ids, wire_params)
        request.validate()  # ValueError here, before anything is sent
        finished, reusable = False, True
        sock = self._take_socket()
        try:
            sock.send(request, timeout_ms=self.timeout_ms)
            while not finished:
                msg = sock.recv(timeout_ms=self.timeout_ms)
                if msg is None:
                    reusable = False  # a late reply may still come
                    raise ServerError("timeout", f"no answer from {self.address} within {self.timeout_ms / 1e3} s")
                if getattr(msg, "request_id", request.request_id) not in (request.request_id, None):
                    continue  # a late reply to an earlier request that was abandoned
                if isinstance(msg, Error):
                    finished = True
                    raise ServerError(msg.code, msg.message)
                finished = isinstance(msg, Finished)
                yield msg
        finally:
            if not finished:  # the caller stopped early: free the server
                try:
                    sock.send(CancelRequest(request.request_id), timeout_ms=100)
                except (TimeoutError, HybridrtError, zmq.ZMQError):
                    reusable = False
            self._give_back(sock, reusable)
