"""OpenAI's Responses API (`POST /v1/responses`, the openai SDK's `client.responses.create`) over the same native
requests as the chat route: its request model, the conversion to a chat and sampling params, and the response
object and its stream of events (`response.created` ... `response.completed`), as vLLM serves them.

What it takes: `input` (a string, or messages: user / system / developer / assistant, their content a string or
input_text / output_text parts), `instructions` (a system message first), `max_output_tokens`, `temperature`,
`top_p`, `stream`, `text.format` (text, json_object, json_schema: structured output), `store` (nothing is stored:
the response says `store: false`), `metadata` and `user` (echoed). Refused with a 400 naming the field:
`previous_response_id` and `conversation` (nothing is stored to continue from), tools, reasoning effort,
log-probabilities, other input item types (images, files, function calls: use /v1/chat/completions for tools).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ipc.messages import Finished, FinishReason, TokenChunk
from launch.openai_protocol import Unsupported


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (a part given back carries logprobs, a cache breakpoint, ...)
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # (an output_text sent back: accepted and not shown to the template)


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # (an output item sent back carries its id and status)
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def native(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponsesRequest(BaseModel):
    """What hybridrt takes of a Responses request (unknown fields are ignored and warned about once, as on the other
    routes; known ones it cannot honour are refused in `check_supported`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    include: list[str] | None = None
    conversation: Any = None
    top_logprobs: int | None = None

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def check_supported(self) -> None:
        for name in ("previous_response_id", "conversation"):
            if getattr(self, name) is not None:
                raise Unsupported(name, f"{name} needs stored responses, and hybridrt stores none: send the "
                                        "conversation in `input`")
        if self.top_logprobs or "message.output_text.logprobs" in (self.include or ()):
            raise Unsupported("top_logprobs" if self.top_logprobs else "include",
                              "log-probabilities are not given on /v1/responses: use /v1/chat/completions")
        if self.tools:
            raise Unsupported("tools", "tools are not supported on /v1/responses: use /v1/chat/completions")
        if self.tool_choice not in (None, "none", "auto"):
            raise Unsupported("tool_choice", "tool_choice needs tools, which /v1/responses does not take")
        if self.reasoning and self.reasoning.get("effort") is not None:
            raise Unsupported("reasoning", "reasoning effort is not supported")
        if self.truncation not in (None, "disabled"):
            raise Unsupported("truncation", 'only truncation "disabled" is supported (a prompt past the context is '
                                            "a 400)")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise Unsupported("max_output_tokens", f"max_output_tokens must be >= 1, got {self.max_output_tokens}")
        self.structured()

    def structured(self) -> dict[str, Any] | None:
        """`text.format` as the native structured output (None for plain text)."""
        form = (self.text or {}).get("format")
        if form is not None and not isinstance(form, dict):
            raise Unsupported("text", "text.format must be an object")
        if form is None or form.get("type") == "text":
            return None
        if form.get("type") == "json_object":
            return {"json_object": True}
        if form.get("type") == "json_schema" and isinstance(form.get("schema"), dict):
            return {"json": form["schema"]}
        raise Unsupported("text", 'text.format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                                  '"json_schema", "name": ..., "schema": {...}}')

    def messages(self) -> list[dict[str, str]]:
        """The chat the template renders: the instructions as a system message, then the input."""
        given = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else \
            [m.native() for m in self.input]
        return ([{"role": "system", "content": self.instructions}] if self.instructions is not None else []) + given

    def sampling_params(self, max_context: int) -> dict[str, Any]:
        params = {"max_tokens": self.max_output_tokens or max_context,
                  "temperature": 1.0 if self.temperature is None else self.temperature, "top_p": self.top_p,
                  "structured": self.structured()}
        return {key: value for key, value in params.items() if value is not None}


@dataclass
class ResponseBuilder:
    """One response's object and its stream's events (same ids and `created_at` in all of them)."""

    request: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0

    def body(self, status: str, text: str | None = None, finished: Finished | None = None) -> dict:
        """The response object: in progress (no output yet), or its output message and usage once `finished`."""
        r = self.request
        incomplete = finished is not None and finished.finish_reason == FinishReason.LENGTH
        output = [] if text is None else [self.message(text, "incomplete" if incomplete else "completed")]
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
                "status": "incomplete" if incomplete else status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "temperature": 1.0 if r.temperature is None else r.temperature,
                "top_p": 1.0 if r.top_p is None else r.top_p, "tools": [], "tool_choice": r.tool_choice or "auto",
                "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": None,
                "reasoning": None, "store": False,
                "text": {"format": (r.text or {}).get("format") or {"type": "text"}}, "truncation": "disabled",
                "metadata": r.metadata or {}, "user": r.user, "output": output, "usage": None}
        if finished is not None:
            usage = finished.usage
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            body["usage"] = {"input_tokens": prompt,
                             "input_tokens_details": {"cached_tokens": finished.timings.get("cached_prompt_tokens", 0),
                                                      "cache_write_tokens": 0},
                             "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": prompt + completion}
        return body

    def message(self, text: str, status: str) -> dict:
        """The output message item: in progress (no content yet), completed, or incomplete (cut by
        max_output_tokens)."""
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [] if status == "in_progress" else [self.part(text)]}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": []}

    def event(self, kind: str, **fields: Any) -> str:
        """One server-sent event (`event:` line and data), numbered in order."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        # (ASCII: the response echoes what the client sent, where a lone surrogate would not encode as UTF-8)
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def response_events(events: AsyncIterator, build: ResponseBuilder,
                          describe: Callable[[Exception], tuple[str, str, str | None]]) -> AsyncGenerator[str, None]:
    """A streamed response's events in OpenAI's order: created, in_progress, the message item and its text part
    added, a text delta per chunk that carries text, the text, part and item done, then completed (its status
    "incomplete" for a reply cut by max_output_tokens). A failure after the headers ends it with an error event and
    response.failed: `describe(exc)` gives its (code, message, param)."""
    item = {"output_index": 0, "item_id": build.message_id}
    part = {**item, "content_index": 0}
    yield build.event("response.created", response=build.body("in_progress"))
    yield build.event("response.in_progress", response=build.body("in_progress"))
    yield build.event("response.output_item.added", output_index=0, item=build.message("", "in_progress"))
    yield build.event("response.content_part.added", **part, part=build.part(""))
    try:
        msg = await anext(events)
        while not isinstance(msg, Finished):
            if isinstance(msg, TokenChunk) and msg.text:
                yield build.event("response.output_text.delta", **part, delta=msg.text, logprobs=[])
            msg = await anext(events)
    except Exception as e:  # noqa: BLE001 - the headers are gone: the failure becomes an event
        code, message, param = describe(e)
        yield build.event("error", code=code, message=message, param=param)
        failed = build.body("failed")
        failed["error"] = {"code": code, "message": message}
        yield build.event("response.failed", response=failed)  # (a client waits for a final response event)
        return
    text = msg.text  # (the deltas' text: the reply's whole)
    done = build.body("completed", text, msg)
    yield build.event("response.output_text.done", **part, text=text, logprobs=[])
    yield build.event("response.content_part.done", **part, part=build.part(text))
    yield build.event("response.output_item.done", output_index=0, item=done["output"][0])
    # (completed also for a reply cut by max_output_tokens, the response's status saying so: the openai SDK's stream
    # helper takes its final response from this event only, as vLLM sends it)
    yield build.event("response.completed", response=done)
