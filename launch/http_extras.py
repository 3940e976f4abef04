"""The HTTP endpoints beyond OpenAI's that vLLM users rely on: `/metrics` (Prometheus), `/version`, and
`/tokenize` / `/detokenize`. Added to the app that `launch.http_api` builds, sharing its client and key check."""

from __future__ import annotations

import importlib.metadata
import uuid
from collections.abc import Callable

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response

from ipc.messages import DetokenizeRequest, TokenizeRequest
from launch import prometheus
from launch.async_client import AsyncClient
from launch.client import ServerError
from launch.openai_protocol import DetokenizeBody, TokenizeBody

STATUS_TIMEOUT_S = 2.0


def add_extra_routes(app: FastAPI, client: AsyncClient, model_name: str, key_checker: Callable,
                     check_model: Callable[[str | None, str], None]) -> None:
    from launch.http_api import ApiError  # the error type and handlers live with the app

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text (unauthenticated, as vLLM's); 503 while the inference server does not answer."""
        try:
            facts = await client.status(timeout_s=STATUS_TIMEOUT_S)
        except ServerError as e:
            return JSONResponse({"status": "unavailable", "message": str(e)}, status_code=503)
        return Response(prometheus.render(facts["metrics"], model_name), media_type=prometheus.CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        return {"version": package_version()}

    # vLLM's token endpoints (outside /v1, as there), behind the same key as /v1.
    @app.post("/tokenize", dependencies=[Depends(key_checker)])
    async def tokenize(body: TokenizeBody) -> dict:
        check_model(body.model, model_name)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt, messages", param="prompt")
        messages = [m.native() for m in body.messages] if body.messages is not None else None
        try:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            reply = await client.ask(TokenizeRequest(uuid.uuid4().hex, body.prompt, messages,
                                                     body.add_generation_prompt, client.api_key, tools))
        except ServerError as e:
            raise ApiError.from_server(e) from None
        return {"count": len(reply.token_ids), "max_model_len": reply.max_context, "tokens": reply.token_ids}

    @app.post("/detokenize", dependencies=[Depends(key_checker)])
    async def detokenize(body: DetokenizeBody) -> dict:
        check_model(body.model, model_name)
        try:
            reply = await client.ask(DetokenizeRequest(uuid.uuid4().hex, body.tokens, client.api_key))
        except ServerError as e:
            raise ApiError.from_server(e) from None
        return {"prompt": reply.text}


def package_version() -> str:
    try:
        return importlib.metadata.version("hybridrt")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing it
        return "unknown"
