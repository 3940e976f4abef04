"""The HTTP API's two generation routes (POST /v1/chat/completions and /v1/completions) without FastAPI's routing
and dependency layers, for requests that are valid: an ASGI middleware that reads the body, checks the key, validates
the body with the route's pydantic model and calls the route's own handler. Anything else (another route or method,
a body that is not JSON or does not validate, a wrong key) goes on to the FastAPI app with the body it read, so
every error answer is FastAPI's, unchanged.

Why: on the way to the first token, FastAPI's router, its dependency solving and its body handling were most of the
app's own time (`bench.probes.http_split`: "app -> body read" + "body read -> asked" 0.6 ms of a streamed chat's
HTTP TTFT on the H200 host and on the CPU machine, against 0.09 ms for the whole path run warm in-process: the
Python that a request runs after an idle pause runs cold, so less of it is what pays).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("hybridrt.http")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class FastRoute:
    """One POST route served here: its body's model and its handler (the same function FastAPI routes to)."""
    model: type[BaseModel]
    handler: Callable[[Any, Request], Awaitable[Any]]


class FastPath:
    """ASGI middleware (`app.add_middleware(FastPath, routes=..., check_key=..., on_error=...)`). `check_key`: the
    API-key check of the routes' dependency (raises for a wrong key); `on_error`: the response for an exception the
    handler raised (the app's own exception handlers' answer)."""

    def __init__(self, app, routes: dict[str, FastRoute], check_key: Callable[[Request], Awaitable[None]],
                 on_error: Callable[[Exception], Response]) -> None:
        self.app, self.routes, self.check_key, self.on_error = app, routes, check_key, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST" or not _json_content(scope):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        replay = _replay([{"type": "http.request", "body": raw, "more_body": False}], receive)
        request = Request(scope, receive)  # past the body: its receive only watches for the client's disconnect
        try:
            await self.check_key(request)
            body = route.model.model_validate(json.loads(raw))
        except Exception:  # noqa: BLE001 - not JSON, invalid, a wrong key: FastAPI answers what is wrong, as always
            return await self.app(scope, replay, send)
        try:
            result = await route.handler(body, request)
        except Exception as e:  # noqa: BLE001 - answered as the app's exception handlers answer it
            result = self.on_error(e)
        response = result if isinstance(result, Response) else JSONResponse(result)
        await response(scope, receive, send)


def _json_content(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return b"json" in value.lower()
    return False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive`, after handing out `messages` first (what this middleware already read)."""
    async def replaying() -> Message:
        return messages.pop(0) if messages else await receive()
    return replaying
