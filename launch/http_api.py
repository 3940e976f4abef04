"""The OpenAI-compatible HTTP API of `hybridrt serve`: a FastAPI app that forwards each request to the JIT
context over the native protocol (`AsyncClient`, one DEALER socket per request).

Endpoints: GET /health (no key needed), GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
the last two streamed as server-sent events when `stream` is true. Errors carry OpenAI's body
{"error": {"message", "type", "param", "code"}}: 400 invalid or unsupported request, 401 missing or wrong
API key, 404 unknown model or route, 503 the JIT context or executor is gone, 500 anything else.

A streamed request is answered once the JIT context has accepted it (its Started message, before the prefill), so
a request the JIT context refuses is still a 400 rather than an error event in a 200 stream; a failure after that
(the executor gone, shutting down) is an error event, as OpenAI's streams end. A client that disconnects
mid-stream cancels its generation (the stream's generator is closed, and closing it sends CancelRequest).

Before uvicorn takes connections, `serve`'s app sends itself two short streamed chats in-process (`warm_up`): what runs
for the first time in this process (request validation, the streamed response, the native socket's connect) is then
paid at start-up, not in the first user's TTFT. The JIT context serves them as any request but neither logs nor
counts them (GenerateRequest.warm_up); only the app's own start-up knows the header that marks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ipc.messages import DetokenizeRequest, Finished, FinishReason, PromptLogprobsChunk, Started, TokenChunk
from launch.async_client import AsyncClient
from launch.client import ServerError
from launch.http_extras import add_extra_routes
from launch.http_fast_path import FastPath, FastRoute
from launch.openai_protocol import (
    ChatCompletionRequest,
    ChunkMaker,
    CompletionRequest,
    EchoedPrompt,
    Outcome,
    Unsupported,
    chat_body,
    completion_body,
    error_body,
    merged_usage,
    models_body,
    vllm_prompt_logprobs,
)
from launch.responses_api import ResponseBuilder, ResponsesRequest, response_events
from launch.tool_calls import PlainReply, ToolPlan, ToolReply

Events = AsyncGenerator[Started | TokenChunk | Finished, None]  # one request's messages, from AsyncClient.generate
log = logging.getLogger("hybridrt.http")
HEALTH_TIMEOUT_S = 2.0
UNAVAILABLE_CODES = frozenset({"executor_died", "executor_timeout", "server_died", "shutting_down", "unreachable",
                               "timeout"})
MAX_REPORTED_ERRORS = 4
ENDED_WITHOUT_RESULT = "the inference server ended the request without a result"  # before Finished or an error
WARM_UP_HEADER = "x-hybridrt-warm-up"  # its value: a per-app secret, so that no client can send uncounted requests
WARM_UP_REQUESTS = 2  # the second one still paid ~1-4 ms of first-time costs on the CPU machine
WARM_UP_TIMEOUT_S = 30.0
UNION_HINTS = {  # fields with several accepted forms: one clear line instead of an error per form
    "prompt": "must be a string, a list of token ids (ints >= 0), or a list holding one of those",
    "input": 'must be a string or a list of messages ({"role": "user", "system", "developer" or "assistant", '
             '"content": a string or input_text / output_text parts}; other item types are not supported)',
    "content": 'must be a string or a list of {"type": "text", "text": ...} parts (only text is supported)',
    "stop": "must be a string or a list of strings",
}


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message may quote what a client sent, and a lone
    surrogate (valid in a JSON string, not in UTF-8) would make the UTF-8 body unencodable (a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ApiError(Exception):
    """An error answer with OpenAI's body; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = error_body(self.message, self.type, self.param, self.code)
        return AsciiJSONResponse(body, status_code=self.status)

    @classmethod
    def from_server(cls, e: ServerError) -> ApiError:
        if e.code == "invalid_request":
            return cls(400, str(e), code=e.code)
        if e.code in UNAVAILABLE_CODES:
            return cls(503, f"the inference server is unavailable: {e}", "service_unavailable", code=e.code)
        return cls(500, f"inference failed: {e}", "server_error", code=e.code)


def create_app(client_address: str, model_name: str, api_key: str | None, max_context: int,
               weight_format: str | None = None, warm: bool = False, client_spin_ms: float | None = None,
               client_local: bool = True, tool_call_format: str | None = None) -> FastAPI:
    """The app for one served model; `client_address` is the JIT context's native (ZeroMQ) address.
    `tool_call_format`: how the model writes a tool call (the JIT context's status; launch.tool_calls.FORMATS), for
    `tool_choice: "auto"` (None: refused with tools). `warm`: send
    itself the start-up requests (`warm_up`) before serving (a JIT context must be there to answer them).
    `client_spin_ms`, `client_local`: its native client's spinning wait (`ipc.reply_spin`; None: the default) and
    whether it uses the JIT context's local stream (`ipc.local_stream`) where there is one (measured: -0.46-0.48 ms
    of HTTP TTFT on the H200, `bench.probes.http_split`)."""
    client = AsyncClient(client_address, api_key=api_key, spin_ms=client_spin_ms,  # the JIT context wants the key
                         local=client_local)
    created = int(time.time())
    warm_key = secrets.token_hex(16)

    @asynccontextmanager
    async def lifespan(app_: FastAPI) -> AsyncIterator[None]:
        headers = {WARM_UP_HEADER: warm_key} | ({"authorization": f"Bearer {api_key}"} if api_key else {})
        if warm:
            await warm_up(app_, model_name, headers)
        yield
        client.close()

    def warming(request: Request) -> bool:
        return secrets.compare_digest(request.headers.get(WARM_UP_HEADER, ""), warm_key)

    app = FastAPI(title="hybridrt", lifespan=lifespan)
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_key_checker(api_key))])

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await client.status(timeout_s=HEALTH_TIMEOUT_S)
        except ServerError as e:
            return JSONResponse({"status": "unavailable", "message": str(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @v1.get("/models")
    async def models() -> dict:
        return models_body(model_name, max_context, created, weight_format)

    @v1.get("/models/{model:path}")
    async def model(model: str) -> dict:
        """OpenAI's model retrieval (`client.models.retrieve`): the served model's entry, or 404."""
        _check_model(model, model_name)
        return models_body(model_name, max_context, created, weight_format)["data"][0]

    warned: set[str] = set()  # unknown request fields already warned about (once per name per server)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check(body, model_name)
        warn_unknown(body, warned)
        params = body.sampling_params(max_context if body.max_tokens is None else body.max_tokens)
        prompts = body.prompts()
        echoes = list(await asyncio.gather(*(_prompt_text(client, p) for p in prompts))) if body.echo else \
            [None] * len(prompts)
        if len(prompts) > 1:  # a batch of prompts: each one's n choices side by side, as n > 1
            request_id = f"cmpl-{uuid.uuid4().hex}"
            return await _respond_n(client, body, prompts, params, False, request, request_id, warming(request),
                                    echoes)
        return await _respond(client, body, prompts[0], params, chat=False, request=request, warm_up=warming(request),
                              echo=echoes[0])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        _check(body, model_name)
        warn_unknown(body, warned)
        max_tokens = body.requested_max_tokens()
        params = body.sampling_params(max_context if max_tokens is None else max_tokens)
        messages = [m.native() for m in body.messages]
        try:
            chat = body.chat_options()
        except Unsupported as e:
            raise ApiError(400, str(e), param=e.param, code="unsupported") from None
        tools = _tool_plan(body, tool_call_format)
        if tools is not None and tools.mode == "auto" and body.skip_special_tokens is None:
            # a model's tool-call markers may be special tokens (Llama's <|python_tag|>, Mistral's [TOOL_CALLS]):
            # the parser reads the text with them, as vLLM's parsers ask
            params["skip_special_tokens"] = False
        return await _respond(client, body, {"messages": messages, "chat": chat}, params, chat=True, request=request,
                              warm_up=warming(request), tools=tools)

    @v1.post("/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Any:
        """OpenAI's Responses API, answered as the chat it converts to (launch/responses_api.py)."""
        _check_model(body.model, model_name)
        warn_unknown(body, warned)
        try:
            chat = body.chat_request()
            options = chat.chat_options()
        except Unsupported as e:
            raise ApiError(400, str(e), param=e.param, code="unsupported") from None
        tools = _tool_plan(chat, tool_call_format)
        params = chat.sampling_params(max_context if chat.max_tokens is None else chat.max_tokens)
        if tools is not None and tools.mode == "auto":
            params["skip_special_tokens"] = False  # (as the chat route: a model's call marker may be one)
        prompt = {"messages": [m.native() for m in chat.messages], "chat": options}
        build = ResponseBuilder(body, body.model)
        if body.stream:  # answered once the JIT context has accepted it, as the chat route's stream
            events = client.generate(**prompt, params=params, request_id=build.id, started=True)
            await _next_or_error(events)
            reply = PlainReply() if tools is None else ToolReply(tools)
            return _ClosingStreamingResponse(response_events(events, build, reply, _response_error), events)
        events = client.generate(**prompt, params=params, request_id=build.id)
        item = await _unless_disconnected(request, _until_finished(events))
        content, calls = (item.text, []) if tools is None else tools.parse(item.text)
        # (ASCII-escaped: it echoes what the client sent)
        return AsciiJSONResponse(build.body("completed", item, content or "", calls or []))

    app.include_router(v1)
    # Valid generation requests skip FastAPI's routing and dependency layers (the same handlers; every error answer
    # stays FastAPI's): launch/http_fast_path.py
    app.add_middleware(FastPath, routes={"/v1/chat/completions": FastRoute(ChatCompletionRequest, chat_completions),
                                         "/v1/completions": FastRoute(CompletionRequest, completions)},
                       check_key=_key_checker(api_key), on_error=_error_response)

    add_extra_routes(app, client, model_name, _key_checker(api_key), _check_model)
    return app


def _tool_plan(body: ChatCompletionRequest, fmt: str | None) -> ToolPlan | None:
    """How the reply may call the request's tools (None: it may not); ApiError for "auto" where the model's chat
    template teaches no tool-call format hybridrt reads."""
    mode = body.tool_mode()
    if mode is None:
        return None
    if mode == "auto" and fmt is None:
        raise ApiError(400, 'tool_choice "auto" needs a chat template that teaches the model a tool-call format '
                            "hybridrt reads (Hermes' <tool_call>, Llama 3's JSON, Mistral's [TOOL_CALLS]); this "
                            'model\'s does not: give tool_choice "required" or a named function, or --chat-template',
                       param="tool_choice", code="unsupported")
    return ToolPlan(mode, fmt, frozenset(body.tool_names()), body.named_tool(), body.parallel_tool_calls is not False)


async def _prompt_text(client: AsyncClient, prompt: dict[str, Any]) -> str:
    """A completion's prompt as text (`echo`): the text given, or its token ids decoded (special tokens kept)."""
    if "prompt" in prompt:
        return prompt["prompt"]
    try:
        reply = await client.ask(DetokenizeRequest(uuid.uuid4().hex, prompt["token_ids"], client.api_key))
    except ServerError as e:
        raise ApiError.from_server(e) from None
    return reply.text


def _check_model(model: str | None, model_name: str) -> None:
    if model is not None and model != model_name:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{model_name}`.",
                       param="model", code="model_not_found")


def warn_unknown(body: CompletionRequest | ChatCompletionRequest | ResponsesRequest, warned: set[str]) -> None:
    """Log the request's unknown fields (ignored, as vLLM does) once per name: `warned` holds those logged."""
    new = [name for name in body.unknown_fields() if name not in warned]
    if new:
        warned.update(new)
        log.warning("ignoring unknown request field(s) %s (warned once per field)", ", ".join(new))


def _check(body: CompletionRequest | ChatCompletionRequest, model_name: str) -> None:
    _check_model(body.model, model_name)
    try:
        body.check_supported()
    except Unsupported as e:
        raise ApiError(400, str(e), param=e.param, code="unsupported") from None


async def warm_up(app: FastAPI, model_name: str, headers: dict[str, str]) -> None:
    """Send the app WARM_UP_REQUESTS short streamed chats in-process (plain ASGI calls, read to the end), or, for a
    model without a tokenizer or chat template (the chat is refused), completions of a few token ids; a failure is a
    one-line warning (the server still serves)."""
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    ids = {"prompt": [1, 2, 3]}  # any vocabulary has these
    for _ in range(WARM_UP_REQUESTS):
        status, error = await _call(app, "/v1/chat/completions", {"model": model_name, **chat}, headers)
        if status == 400:
            status, error = await _call(app, "/v1/completions", {"model": model_name, **ids}, headers)
        if status != 200:
            print(f"warning: the HTTP warm-up request failed ({error or status}); the first requests may be slower",
                  file=sys.stderr, flush=True)
            return


async def _call(app: FastAPI, path: str, fields: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
    """POST a short streamed request to `app` in-process and read its answer to the end: (status, error or "")."""
    body = json.dumps({**fields, "max_tokens": 2, "temperature": 0, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *((k.encode(), v.encode()) for k, v in headers.items())]}
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    done = asyncio.Event()
    status: list[int] = []

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await done.wait()  # nothing more to read; the response has ended
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    try:
        await asyncio.wait_for(app(scope, receive, send), WARM_UP_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - a warm-up never stops the server
        return 0, f"{type(e).__name__}: {e}"
    return (status[0] if status else 0), ""


async def _respond(client: AsyncClient, body: CompletionRequest | ChatCompletionRequest,
                   prompt: dict[str, Any], params: dict[str, Any], chat: bool, request: Request,
                   warm_up: bool = False, tools: ToolPlan | None = None, echo: str | None = None) -> Any:
    """`echo`: the prompt's text, which each completion's text starts with (completions' `echo`)."""
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.choices > 1:
        return await _respond_n(client, body, [prompt], params, chat, request, request_id, warm_up, [echo], tools)
    shape = _Shape.of(body)
    if body.stream:
        # Answer once the JIT context has accepted the request (Started, before its prefill): what it refuses is
        # still a 400, and the headers' write and the client's parse of them overlap the prefill instead of
        # following the first token (H200 host: HTTP - native TTFT 2.35-2.42 -> 1.71-1.99 ms).
        events = client.generate(**prompt, params=params, request_id=request_id, warm_up=warm_up, started=True)
        await _next_or_error(events)
        chunks = ChunkMaker(request_id, body.model, chat, body.include_usage)
        sse = _sse(events, chunks, echo, PlainReply() if tools is None else ToolReply(tools), shape)
        return _ClosingStreamingResponse(sse, events)
    events = client.generate(**prompt, params=params, request_id=request_id, warm_up=warm_up)
    logprobs = [] if params.get("logprobs") is not None else None
    scored = EchoedPrompt() if shape.collects else None
    item = await _unless_disconnected(request, _until_finished(events, logprobs, scored))
    make = chat_body if chat else completion_body
    return make(request_id, body.model, [_outcome(item, logprobs, echo, tools, scored, shape)], shape.usage(item.usage))


@dataclass(frozen=True)
class _Shape:
    """What a completion's answer holds besides its text: the echoed prompt's log-probabilities (echo with logprobs),
    and nothing generated (echo with max_tokens 0: the one token generated is dropped)."""

    scores_prompt: bool = False
    prompt_only: bool = False
    lists_prompt: bool = False  # vLLM's prompt_logprobs (never streamed)

    @staticmethod
    def of(body: CompletionRequest | ChatCompletionRequest) -> _Shape:
        if body.prompt_logprobs is None and not (isinstance(body, CompletionRequest) and body.echo):
            return _PLAIN
        if not isinstance(body, CompletionRequest):
            return _Shape(lists_prompt=True)
        return _Shape(body.scores_prompt, body.prompt_only, body.lists_prompt)

    @property
    def collects(self) -> bool:
        """Whether the prompt's log-probabilities are read from the stream."""
        return self.scores_prompt or self.lists_prompt

    def reason(self, native: str) -> str:
        """The answer's finish reason: with nothing generated asked (prompt_only), "length" for a request that ran
        (the token generated, and so its own reason, is dropped); else, and for an abort, the request's own."""
        if self.prompt_only and native in (FinishReason.STOP, FinishReason.LENGTH):
            return FinishReason.LENGTH
        return native

    def usage(self, usage: dict) -> dict:
        """The usage of the answer: no completion tokens where nothing generated is in it."""
        if not self.prompt_only or not usage:
            return usage
        prompt_tokens = usage.get("prompt_tokens", 0)
        return {**usage, "completion_tokens": 0, "total_tokens": prompt_tokens}


_PLAIN = _Shape()


async def _respond_n(client: AsyncClient, body: CompletionRequest | ChatCompletionRequest,
                     prompts: list[dict[str, Any]], params: dict[str, Any], chat: bool, request: Request,
                     request_id: str, warm_up: bool, echoes: list[str | None], tools: ToolPlan | None = None) -> Any:
    """`n` > 1, or a completion's batch of prompts: n native requests per prompt side by side (a batching server
    decodes them together; one slot queues them), choice p * n + i from prompt p's request i (its seed moved on by
    i), with that prompt's echo (`echoes[p]`). A failure of any is the request's error. `tools`: each choice's reply
    read for tool calls on its own."""
    n = body.choices
    started = body.stream
    sources = [(p, i) for p in range(len(prompts)) for i in range(n)]  # choice index -> (prompt, its choice)
    streams = [client.generate(**prompts[p], params=body.choice_params(params, i), request_id=f"{request_id}-{j}",
                               warm_up=warm_up, started=started) for j, (p, i) in enumerate(sources)]
    echo = [echoes[p] for p, _ in sources]  # per choice
    if started:
        # the first accepted (Started) before the headers: what it refuses (the others' params but the seed are its
        # own) is a 400; the others are sent when the body starts (a one-slot server queues them behind it). (In a
        # batch of prompts another prompt's own fault, e.g. past the context, comes as an error event then.)
        try:
            await _next_or_error(streams[0])
        except BaseException:
            for events in streams:
                await events.aclose()
            raise
        merged = _merged(streams)
        return _ClosingStreamingResponse(_sse_n(merged, ChunkMaker(request_id, body.model, chat, body.include_usage),
                                                len(streams), echo, tools, per_prompt=n), _AllStreams(streams))
    asked = params.get("logprobs") is not None
    logprobs = [[] if asked else None for _ in streams]
    shape = _Shape.of(body)
    scored = [EchoedPrompt() if shape.collects else None for _ in streams]

    async def all_finished() -> list[Finished]:
        tasks = [asyncio.ensure_future(_until_finished(events, lp, sp))
                 for events, lp, sp in zip(streams, logprobs, scored)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # one failed, or the client left: the others are cancelled (their requests too)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    finished = await _unless_disconnected(request, all_finished())
    make = chat_body if chat else completion_body
    outcomes = [_outcome(f, lp, e, tools, sp, shape) for f, lp, e, sp in zip(finished, logprobs, echo, scored)]
    usages = [shape.usage(f.usage) for f in finished]
    return make(request_id, body.model, outcomes, merged_usage([usages[p * n:(p + 1) * n]
                                                                for p in range(len(prompts))]))


def _outcome(item: Finished, logprobs: list | None, echo: str | None, tools: ToolPlan | None,
             prompt: EchoedPrompt | None = None, shape: _Shape = _PLAIN) -> Outcome:
    """A non-streamed choice: its text (after the echoed prompt, with its log-probabilities: `prompt`), or with tools
    its content and calls. `shape.prompt_only`: the echoed prompt alone (the token generated is dropped)."""
    listed = vllm_prompt_logprobs(prompt) if shape.lists_prompt and prompt is not None else None
    echoed = prompt if shape.scores_prompt else None
    if shape.prompt_only:
        return Outcome(echo or "", shape.reason(item.finish_reason), None, prompt=echoed, prompt_logprobs=listed)
    if tools is None:
        return Outcome((echo or "") + item.text, item.finish_reason, logprobs, prompt=echoed, prompt_logprobs=listed)
    content, calls = tools.parse(item.text)
    return Outcome(content or "", item.finish_reason, logprobs, calls or None, bool(calls) and tools.tool_reason,
                   prompt_logprobs=listed)


class _AllStreams:
    """n requests' streams closed as one (`_ClosingStreamingResponse`): each unfinished request is cancelled, also
    when the response's body never started."""

    def __init__(self, streams: list[Events]) -> None:
        self.streams = streams

    async def aclose(self) -> None:
        errors = []
        for events in self.streams:  # every one, whatever another's close raises
            try:
                await events.aclose()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the rest are closed
                errors.append(e)
        if errors:
            raise errors[0]


async def _merged(streams: list[Events]) -> AsyncGenerator[tuple[int, TokenChunk | Finished], None]:
    """(choice index, message) of n requests' streams as each arrives, each stream's in its order, until every one
    has its Finished; a stream that ends without one raises ApiError. Closing it closes every stream."""
    pending: dict[asyncio.Future, int] = {}
    try:
        pending = {asyncio.ensure_future(anext(events)): i for i, events in enumerate(streams)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    raise ApiError(500, ENDED_WITHOUT_RESULT, "server_error") from None
                if not isinstance(item, Started):  # (the other choices' acceptance: nothing to send)
                    yield i, item
                if not isinstance(item, Finished):
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        # the anext tasks in flight end first: a generator suspended in one cannot be closed ("already running")
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await _AllStreams(streams).aclose()  # sends CancelRequest to each unfinished request


async def _sse_n(merged: AsyncGenerator[tuple[int, TokenChunk | Finished], None], chunks: ChunkMaker,
                 n: int, echo: list[str | None], tools: ToolPlan | None = None,
                 per_prompt: int | None = None) -> AsyncGenerator[str, None]:
    """`_sse` for n choices: each choice's role (or echoed prompt: `echo[i]`), deltas and finish reason with its
    index, as they come; the usage of all of them at the end (if asked; choices [p * per_prompt, (p + 1) *
    per_prompt) share prompt p), then [DONE]. `tools`: each choice's text read through a ToolReply of its own, as
    `_sse` does for one."""
    per_prompt = per_prompt or n
    replies = [PlainReply() if tools is None else ToolReply(tools) for _ in range(n)]
    async with aclosing(merged):
        for i in range(n):
            if (opening := chunks.first(i)) is not None:
                yield _event(opening)
            if echo[i]:
                yield _event(chunks.text(echo[i], index=i))
        waiting: dict[int, list] = {}
        usages: dict[int, dict] = {}
        try:
            async for i, item in merged:
                if getattr(item, "logprobs", None):
                    waiting.setdefault(i, []).extend(item.logprobs)
                if isinstance(item, Finished):
                    usages[i] = item.usage
                    content, deltas = replies[i].finish()
                    if content:
                        yield _event(chunks.text(content, waiting.pop(i, None), index=i))
                    if deltas:
                        yield _event(chunks.tool_calls(deltas, index=i))
                    yield _event(chunks.final(item.finish_reason, waiting.pop(i, None), index=i,
                                              tool_reason=replies[i].tool_reason))
                elif item.text:
                    content, deltas = replies[i].feed(item.text)
                    if content:
                        yield _event(chunks.text(content, waiting.pop(i, None), index=i))
                    if deltas:
                        yield _event(chunks.tool_calls(deltas, index=i))
            groups = [[usages[i] for i in range(p, min(p + per_prompt, n)) if i in usages]
                      for p in range(0, n, per_prompt)]
            tail = _event(chunks.usage(merged_usage([g for g in groups if g]))) if chunks.include_usage else ""
        except ServerError as e:
            tail = _error_event(ApiError.from_server(e))
        except ApiError as err:
            tail = _error_event(err)
    yield tail + "data: [DONE]\n\n"


async def _until_finished(events: Events, logprobs: list | None = None, prompt: EchoedPrompt | None = None) -> Finished:
    """The request's Finished; `logprobs`: a list that collects its chunks' logprobs entries; `prompt`: what collects
    its prompt's (PromptLogprobsChunk)."""
    async with aclosing(events):  # closing sends CancelRequest if we stop early
        item = await _next_or_error(events)
        while not isinstance(item, Finished):
            if logprobs is not None and getattr(item, "logprobs", None):
                logprobs += item.logprobs
            elif prompt is not None and isinstance(item, PromptLogprobsChunk):
                prompt.add(item)
            item = await _next_or_error(events)
    return item


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """Run a non-streamed request, cancelling it (and so its generation) if the HTTP client hangs up.

    A task waits in the request's own `receive()` (past the body, it returns only once the client is gone: the
    server's `http.disconnect`), as Starlette's streaming responses watch for it. Polling `is_disconnected()`
    instead (a `receive()` under an already-cancelled scope) missed a hang-up twice in CI: a 3000-token completion
    kept running for 20 s after its client had closed the connection."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        if gone.exception() is not None:  # the server's receive failed: no hang-up seen, the request runs on
            return await task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ApiError(499, "the client closed the connection", code="client_closed")
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gone


async def _disconnect(request: Request) -> None:
    """Until the HTTP client has gone (any other message past the body is skipped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next_or_error(events: Events) -> Started | TokenChunk | Finished:
    try:
        return await anext(events)
    except ServerError as e:
        raise ApiError.from_server(e) from None
    except StopAsyncIteration:
        raise ApiError(500, ENDED_WITHOUT_RESULT, "server_error") from None


async def _sse(events: Events, chunks: ChunkMaker, echo: str | None,
               reply: ToolReply | PlainReply, shape: _Shape = _PLAIN) -> AsyncGenerator[str, None]:
    """Server-sent events in OpenAI's order: role (or the echoed prompt: `echo`), content deltas, finish reason,
    usage (if asked), [DONE]. The role leaves with the headers, during the prefill; events that are ready together
    then leave in one write (the finish reason, usage and [DONE]): each write is a send system call and a TCP segment
    on the client's way. `reply` reads the text: a PlainReply sends it as content; a ToolReply (a chat that may call
    tools) sends content deltas as they may go out, tool-call deltas as the calls are known, and the finish reason
    "tool_calls" where the model made the calls it chose. `shape`: the echoed prompt comes once its log-probabilities
    have (they come before any token); with nothing generated asked (prompt_only), the token generated is dropped."""
    async with aclosing(events):
        if (opening := chunks.first()) is not None:
            yield _event(opening)
        if echo and not shape.scores_prompt:
            yield _event(chunks.text(echo))
        held = ""
        waiting = None  # the logprobs of tokens whose text is held back: they ride the next chunk that goes out
        try:
            item = await anext(events)
            if shape.scores_prompt:
                prompt = EchoedPrompt()
                while isinstance(item, PromptLogprobsChunk):
                    prompt.add(item)
                    item = await anext(events)
                yield _event(chunks.echo(echo or "", prompt))
            while shape.prompt_only and not isinstance(item, Finished):
                item = await anext(events)
            if shape.prompt_only:  # (the generated token's end is not the answer's; an abort stays one)
                item = Finished(item.request_id, "", [], shape.reason(item.finish_reason), shape.usage(item.usage),
                                item.timings)
            while not isinstance(item, Finished):
                if getattr(item, "logprobs", None):  # a LogprobsChunk
                    waiting = (waiting or []) + item.logprobs
                if item.text:  # a token whose text is held back (partial UTF-8, possible stop) sends nothing
                    content, deltas = reply.feed(item.text)
                    if content:
                        yield _event(chunks.text(content, waiting))
                        waiting = None
                    if deltas:
                        yield _event(chunks.tool_calls(deltas))
                item = await anext(events)
            content, deltas = reply.finish()
            if content:
                held += _event(chunks.text(content, waiting))
                waiting = None
            if deltas:
                held += _event(chunks.tool_calls(deltas))
            held += _event(chunks.final(item.finish_reason, waiting, tool_reason=reply.tool_reason))
            if chunks.include_usage:
                held += _event(chunks.usage(item.usage))
        except ServerError as e:  # headers are gone: the error becomes an event, as OpenAI does
            held += _error_event(ApiError.from_server(e))
        except StopAsyncIteration:
            held += _event(error_body(ENDED_WITHOUT_RESULT, "server_error", None, None))
    yield held + "data: [DONE]\n\n"


def _response_error(e: Exception) -> tuple[str, str, str | None]:
    """A streamed response's failure after its headers (code, message, param), as the chat route's stream says it."""
    err = ApiError.from_server(e) if isinstance(e, ServerError) else \
        ApiError(500, ENDED_WITHOUT_RESULT if isinstance(e, StopAsyncIteration) else f"{type(e).__name__}: {e}",
                 "server_error")
    return err.code or err.type, err.message, err.param


def _error_event(err: ApiError) -> str:
    """A stream's error event (its headers are gone), OpenAI's error body."""
    return _event(error_body(err.message, err.type, err.param, err.code))


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Streams its body in the request's task while one plain asyncio task waits for the client's disconnect and
    cancels it; closes the body and the request's events however the response ends (a cancel may leave them
    suspended at a `yield`, or never started). Starlette's own way under uvicorn, which declares ASGI spec 2.3, is an
    anyio task group with a listener task: ~60 us a response on the CPU machine, ~4 us this way, on the way to the
    first token."""

    def __init__(self, body: AsyncGenerator[str, None], events: Events) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._body, self._events = body, events

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        state = {"hung_up": False, "done": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["done"]:  # the stream is still being sent: end it
                state["hung_up"] = True
                streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not state["hung_up"]:
                raise  # not ours (the server is stopping)
            streaming.uncancel()  # the client is gone: the response ends here
        finally:
            state["done"] = True  # no await since the stream ended: the watcher cannot have cancelled after it
            watcher.cancel()
            try:
                await self._body.aclose()
            finally:
                await self._events.aclose()  # sends CancelRequest if the request is unfinished


def _key_checker(api_key: str | None):
    """A dependency that accepts only `Authorization: Bearer <api_key>` (anything, without a key). The scheme is
    case-insensitive (RFC 7235); the key is compared in constant time. A coroutine: FastAPI runs a plain function
    dependency in its thread pool, two thread hops on every request's way in."""
    expected = api_key.encode() if api_key is not None else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""
        if not secrets.compare_digest(given, expected):
            raise ApiError(401, "missing or incorrect API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")

    return check


def _error_response(exc: Exception) -> JSONResponse:
    """The answer to an exception a handler raised: its own for an ApiError, else a logged 500."""
    if isinstance(exc, ApiError):
        return exc.response()
    log.exception("unexpected error in the HTTP API", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and "json" not in content_type.lower():
            message += (f" (the body is read as JSON only with the header `Content-Type: application/json`; this "
                        f"request sent {content_type!r})" if content_type else
                        " (send the body as JSON with the header `Content-Type: application/json`)")
        return ApiError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), type_).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's errors; the top-level field of the first one is the `param`."""
    parts: list[str] = []
    params: list[str] = []
    for err in exc.errors():
        if err["type"] == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}", None
        loc = [str(p) for p in err["loc"] if p != "body"]
        union = next((i for i, p in enumerate(loc) if p in UNION_HINTS), None)
        if union is not None and len(loc) > union + 1:  # pydantic reports one error per arm of the union
            part = f"{'.'.join(loc[: union + 1])}: {UNION_HINTS[loc[union]]}"
        elif err["type"] == "extra_forbidden":
            part = f"{'.'.join(loc)}: unknown field (not supported)"
        else:
            part = f"{'.'.join(loc) or 'body'}: {err['msg']}"
        if part not in parts:
            parts.append(part)
            params.append(loc[0] if loc else "body")
    return "; ".join(parts[:MAX_REPORTED_ERRORS]) or "invalid request body", (params[0] if params else None)
