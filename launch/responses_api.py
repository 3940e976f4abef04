"""OpenAI's Responses API (`POST /v1/responses`, the openai SDK's `client.responses.create`) over the chat route: the
request model and its conversion to a chat completion request (which then runs as any chat, its tools parsed the
same way), and the response object and its stream of events (`response.created` ... `response.completed`), as vLLM
serves them.

What it takes: `input` (a string, or items: messages (user / system / developer / assistant, their content a string
or input_text / output_text parts), function calls and their outputs given back), `instructions` (a system message
first), `max_output_tokens`, `temperature`, `top_p`, `stream`, `text.format` (text, json_object, json_schema:
structured output), function `tools` with `tool_choice` (auto, required, none, a named function) and
`parallel_tool_calls` (the reply's calls come as function_call output items), `store` (nothing is stored: the
response says `store: false`), `metadata` and `user` (echoed). Refused with a 400 naming the field:
`previous_response_id` and `conversation` (nothing is stored to continue from), tools other than functions,
reasoning effort, log-probabilities, other input item types (images, files).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ipc.messages import Finished, FinishReason, TokenChunk
from launch.openai_protocol import ChatCompletionRequest, Unsupported
from launch.tool_calls import PlainReply, ToolCall, ToolReply


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


class FunctionCallItem(BaseModel):
    """A call the model made, given back in `input` (an earlier response's function_call output item)."""

    model_config = ConfigDict(extra="ignore")  # (its id and status)
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """A call's result, given back in `input`."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]  # (text parts: joined)

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


# A chat request's field -> the Responses request's field that gave it (an error names what the client sent).
CHAT_FIELDS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text"}


class ResponsesRequest(BaseModel):
    """What hybridrt takes of a Responses request (unknown fields are ignored and warned about once, as on the other
    routes; known ones it cannot honour are refused in `check_supported`)."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutputItem] = Field(min_length=1)
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
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
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
        if self.reasoning and self.reasoning.get("effort") is not None:
            raise Unsupported("reasoning", "reasoning effort is not supported")
        if self.truncation not in (None, "disabled"):
            raise Unsupported("truncation", 'only truncation "disabled" is supported (a prompt past the context is '
                                            "a 400)")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise Unsupported("max_output_tokens", f"max_output_tokens must be >= 1, got {self.max_output_tokens}")

    def response_format(self) -> dict[str, Any] | None:
        """`text.format` as the chat route's response_format (None for plain text)."""
        form = (self.text or {}).get("format")
        if form is not None and not isinstance(form, dict):
            raise Unsupported("text", "text.format must be an object")
        if form is None or form.get("type") == "text":
            return None
        if form.get("type") == "json_object":
            return {"type": "json_object"}
        if form.get("type") == "json_schema" and isinstance(form.get("schema"), dict):
            return {"type": "json_schema", "json_schema": {k: v for k, v in form.items() if k != "type"}}
        raise Unsupported("text", 'text.format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                                  '"json_schema", "name": ..., "schema": {...}}')

    def messages(self) -> list[dict[str, Any]]:
        """The chat: the instructions as a system message, then the input's messages; function calls given back join
        the assistant message before them (or make one), their outputs become tool messages."""
        chat: list[dict[str, Any]] = [] if self.instructions is None else [
            {"role": "system", "content": self.instructions}]
        if isinstance(self.input, str):
            return [*chat, {"role": "user", "content": self.input}]
        for item in self.input:
            if isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if not (chat and chat[-1]["role"] == "assistant"):
                    chat.append({"role": "assistant", "content": None})
                chat[-1].setdefault("tool_calls", []).append(call)
            elif isinstance(item, FunctionCallOutputItem):
                chat.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
            else:
                chat.append(item.native())
        return chat

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completion request that answers this one; Unsupported naming this request's field."""
        self.check_supported()
        tools = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                 for t in self.tools or ()]
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        fields = {"model": self.model, "messages": self.messages(), "max_tokens": self.max_output_tokens,
                  "temperature": self.temperature, "top_p": self.top_p, "response_format": self.response_format(),
                  "tools": tools or None, "tool_choice": choice, "parallel_tool_calls": self.parallel_tool_calls}
        try:
            chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
            chat.check_supported()
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else "input"
            raise Unsupported(CHAT_FIELDS.get(field, field), f"{'.'.join(map(str, err['loc']))}: {err['msg']}") \
                from None
        except Unsupported as e:
            raise Unsupported(CHAT_FIELDS.get(e.param, e.param), str(e)) from None
        return chat


@dataclass
class ResponseBuilder:
    """One response's object and its stream's events (same ids and `created_at` in all of them)."""

    request: ResponsesRequest
    model: str
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0

    def body(self, status: str, finished: Finished | None = None, text: str | None = None,
             calls: list[ToolCall] = ()) -> dict:
        """The response object: in progress or failed (no output), or, once `finished`, its output (the message
        with `text`, unless the reply is calls alone, then a function_call item per call) and usage."""
        r = self.request
        incomplete = finished is not None and finished.finish_reason == FinishReason.LENGTH
        output = []
        if finished is not None:
            if text or not calls:
                output.append(self.message(text or "", "incomplete" if incomplete else "completed"))
            output += [self.function_call(call) for call in calls]
        body = {"id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
                "status": "incomplete" if incomplete else status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "temperature": 1.0 if r.temperature is None else r.temperature,
                "top_p": 1.0 if r.top_p is None else r.top_p,
                "tools": [t.model_dump(exclude_none=True) for t in r.tools or ()],
                "tool_choice": r.tool_choice.model_dump() if isinstance(r.tool_choice, NamedFunctionChoice)
                else r.tool_choice or "auto",
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

    @staticmethod
    def function_call(call: ToolCall, status: str = "completed") -> dict:
        """A call of the reply as an output item (its call_id is what the call's output names when given back)."""
        return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}", "call_id": call.id,
                "name": call.name, "arguments": call.arguments if status == "completed" else "", "status": status}

    def event(self, kind: str, **fields: Any) -> str:
        """One server-sent event (`event:` line and data), numbered in order."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        # (ASCII: the response echoes what the client sent, where a lone surrogate would not encode as UTF-8)
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def response_events(events: AsyncIterator, build: ResponseBuilder, reply: ToolReply | PlainReply,
                          describe: Callable[[Exception], tuple[str, str, str | None]]) -> AsyncGenerator[str, None]:
    """A streamed response's events in OpenAI's order: created, in_progress; the message item and its text part
    added at the reply's first text, a text delta per piece of text `reply` lets out, the text, part and item done;
    then a function_call item per call the reply made (added, its arguments' delta and done, done; `reply` reads
    the calls, as the chat route's stream does); then completed (its status "incomplete" for a reply cut by
    max_output_tokens). A reply with neither text nor calls still has its (empty) message. A failure after the
    headers ends it with an error event and response.failed: `describe(exc)` gives its (code, message, param)."""
    part = {"output_index": 0, "item_id": build.message_id, "content_index": 0}
    yield build.event("response.created", response=build.body("in_progress"))
    yield build.event("response.in_progress", response=build.body("in_progress"))
    texts: list[str] = []
    calls: dict[int, dict] = {}  # the tool-call deltas, merged per index
    blank = ""  # leading whitespace, held back: before a call it is no message (as the whole reply's parse strips it)

    def opening() -> list[str]:
        return [build.event("response.output_item.added", output_index=0, item=build.message("", "in_progress")),
                build.event("response.content_part.added", **part, part=build.part(""))]

    try:
        msg = await anext(events)
        while True:
            finished = isinstance(msg, Finished)
            content, deltas = reply.finish() if finished else reply.feed(msg.text) \
                if isinstance(msg, TokenChunk) and msg.text else ("", [])
            if content and not texts and not (blank + content).strip():
                blank, content = blank + content, ""
            elif content and not texts:
                blank, content = "", blank + content
            if content:
                if not texts:
                    for event in opening():
                        yield event
                texts.append(content)
                yield build.event("response.output_text.delta", **part, delta=content, logprobs=[])
            for delta in deltas:
                merged = calls.setdefault(delta["index"], {"id": "", "name": "", "arguments": ""})
                merged["id"] = delta.get("id") or merged["id"]
                function = delta.get("function", {})
                merged["name"] = function.get("name") or merged["name"]
                merged["arguments"] += function.get("arguments") or ""
            if finished:
                break
            msg = await anext(events)
    except Exception as e:  # noqa: BLE001 - the headers are gone: the failure becomes an event
        code, message, param = describe(e)
        yield build.event("error", code=code, message=message, param=param)
        failed = build.body("failed")
        failed["error"] = {"code": code, "message": message}
        yield build.event("response.failed", response=failed)  # (a client waits for a final response event)
        return
    made = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    if blank and not made:  # a reply of whitespace alone: it is the message
        for event in opening():
            yield event
        texts.append(blank)
        yield build.event("response.output_text.delta", **part, delta=blank, logprobs=[])
    text = "".join(texts)
    done = build.body("completed", msg, text, made)
    if text or not made:
        if not texts:
            for event in opening():
                yield event
        yield build.event("response.output_text.done", **part, text=text, logprobs=[])
        yield build.event("response.content_part.done", **part, part=build.part(text))
        yield build.event("response.output_item.done", output_index=0, item=done["output"][0])
    for index, call in enumerate(made, start=len(done["output"]) - len(made)):
        item = build.function_call(call)
        yield build.event("response.output_item.added", output_index=index,
                          item=build.function_call(call, "in_progress"))
        yield build.event("response.function_call_arguments.delta", output_index=index, item_id=item["id"],
                          delta=call.arguments)
        yield build.event("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                          arguments=call.arguments, name=call.name)
        yield build.event("response.output_item.done", output_index=index, item=item)
    # (completed also for a reply cut by max_output_tokens, the response's status saying so: the openai SDK's stream
    # helper takes its final response from this event only, as vLLM sends it)
    yield build.event("response.completed", response=done)
