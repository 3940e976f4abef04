"""launch/http_fast_path.py: valid requests to its routes reach the handler without FastAPI's routing (no `route` in
the scope), everything else is FastAPI's answer, unchanged; in-process ASGI calls on a small FastAPI app."""

from __future__ import annotations

import asyncio
import json

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from launch.http_api import create_app
from launch.http_fast_path import FastPath, FastRoute


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int
    stream: bool = False


class Refused(Exception):
    pass


def make_app(seen: list[str]) -> FastAPI:
    async def check_key(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer k":
            raise Refused

    async def handler(body: Body, request: Request):
        if body.n < 0:
            raise Refused
        seen.append("fast" if "route" not in request.scope else "fastapi")
        return {"n": body.n * 2, "warm": request.headers.get("x-warm")}

    def on_error(exc: Exception) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=418)

    app = FastAPI()

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return on_error(exc)

    app.post("/double", dependencies=[Depends(check_key)])(handler)
    app.add_middleware(FastPath, routes={"/double": FastRoute(Body, handler)}, check_key=check_key, on_error=on_error)
    return app


def call(app, body: bytes, headers: dict[str, str], chunks: int = 1, method: str = "POST",
         path: str = "/double") -> tuple[int, dict]:
    """One request through the ASGI app, its body in `chunks` messages: (status, JSON body)."""
    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    pending = [{"type": "http.request", "body": p, "more_body": i < chunks - 1} for i, p in enumerate(parts)]
    sent: list[dict] = []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


JSON = {"content-type": "application/json", "authorization": "Bearer k"}


def test_a_valid_request_skips_fastapis_routing_in_one_or_several_body_messages() -> None:
    seen: list[str] = []
    app = make_app(seen)
    assert call(app, b'{"n": 21}', JSON | {"x-warm": "yes"}) == (200, {"n": 42, "warm": "yes"})
    assert call(app, b'{"n": 5, "stream": false}', JSON, chunks=3) == (200, {"n": 10, "warm": None})
    assert seen == ["fast", "fast"]


def test_everything_else_is_fastapis_answer() -> None:
    seen: list[str] = []
    app = make_app(seen)
    status, body = call(app, b'{"n": "x"}', JSON)  # invalid: FastAPI's 422 with its own detail
    assert status == 422 and body["detail"][0]["loc"] == ["body", "n"]
    status, body = call(app, b'{"n": 1, "extra": 2}', JSON, chunks=2)
    assert status == 422 and body["detail"][0]["type"] == "extra_forbidden"
    assert call(app, b'{"n": ', JSON)[0] == 422  # not JSON
    assert call(app, b'{"n": 1}', {"content-type": "application/json"}) == (418, {"error": "Refused"})  # no key
    assert call(app, b'{"n": 1}', {"authorization": "Bearer k"})[0] == 422  # no JSON content type
    assert call(app, b'{"n": 1}', JSON, method="PUT")[0] == 405
    assert call(app, b'{"n": 1}', JSON, path="/other")[0] == 404
    assert seen == []


def test_a_handlers_exception_is_answered_by_on_error() -> None:
    seen: list[str] = []
    assert call(make_app(seen), b'{"n": -1}', JSON) == (418, {"error": "Refused"})


def test_the_http_api_serves_both_generation_routes_through_it() -> None:
    app = create_app("tcp://127.0.0.1:9", "m", api_key=None, max_context=64)  # no connection until a request
    fast = [m for m in app.user_middleware if m.cls is FastPath]
    assert len(fast) == 1 and set(fast[0].kwargs["routes"]) == {"/v1/chat/completions", "/v1/completions"}
    routes = [r for inc in app.routes for r in (inc.original_router.routes if hasattr(inc, "original_router")
                                                 else [inc])]  # an included APIRouter's routes, by their full paths
    posted = {r.path: r.endpoint for r in routes if "POST" in (getattr(r, "methods", None) or ())}
    for path, route in fast[0].kwargs["routes"].items():
        assert posted[path] is route.handler  # the same handler FastAPI routes to
