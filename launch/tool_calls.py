"""OpenAI tool calls on the chat API: how a request's tool_choice holds the reply (a structured output for
"required" and a named function), and how a reply's text becomes tool calls, whole or streamed.

- "required": the reply is a JSON array of {"name", "parameters"} objects, one of the tools' each (vLLM's form);
- a named function: the reply is that function's arguments, a JSON object of its parameters' schema;
- "auto": the model writes what its chat template taught it (`jit_context.chat_template.tool_call_format`): Hermes'
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (after any content), Llama 3's JSON object(s) `{"name":
  ..., "parameters": ...}` as the whole reply (`;` between several), Mistral's `[TOOL_CALLS][{"name": ...,
  "arguments": ...}]`. A reply that does not parse, or names a function the request did not give, is content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass
from typing import Any

MODES = ("auto", "required", "named")
FORMATS = ("hermes", "llama3_json", "mistral")
# Where a tool call starts in a reply of each format: Hermes' anywhere, the others' at the reply's start (after
# whitespace; Llama's and Mistral's marker tokens are special, left out of the text, so their JSON's first
# character stands in for them).
_STARTS = {"hermes": ("<tool_call>",), "llama3_json": ("<|python_tag|>", "{"), "mistral": ("[TOOL_CALLS]", "[")}
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text

    def body(self) -> dict:
        """OpenAI's form of a message's tool call."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def delta(self, index: int) -> dict:
        """The stream delta that carries the whole call."""
        return {"index": index, **self.body()}


def call_id(fmt: str | None = None) -> str:
    """A new call's id: OpenAI's form, or, for Mistral's format, 9 letters and digits (its templates refuse any
    other id when the call comes back with its result, as vLLM's Mistral ids are)."""
    if fmt == "mistral":
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return f"call_{uuid.uuid4().hex[:24]}"


_ALNUM = string.ascii_letters + string.digits


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """`tool_choice: "required"`: a JSON array of calls, each one of the tools with its parameters (at most one call
    without parallel tool calls). The tools' `$defs` move to the array's root, where their `#/$defs/...` references
    point once the parameters are nested (vLLM's rule); ValueError for a name two tools define differently."""
    calls, defs = [], {}
    for t in tools:
        parameters = dict(_parameters(t))
        for name, definition in parameters.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise ValueError(f"tools define $defs {name!r} differently: give it one definition")
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                      "properties": {"name": {"const": t["function"]["name"]}, "parameters": parameters}})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **({"$defs": defs} if defs else {})}
    return schema if parallel else {**schema, "maxItems": 1}


def named_schema(tool: dict) -> dict:
    """A named tool choice: the function's arguments."""
    return _parameters(tool)


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object"}


def _arguments(value: Any) -> str | None:
    """A call's arguments as JSON text: an object dumped, an object's text kept; None for anything else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    try:
        return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None
    except (ValueError, RecursionError):
        return None


def _calls(objects: list[Any], names: set[str], key: str, fmt: str | None) -> list[ToolCall] | None:
    """Parsed call objects ({"name", key or "arguments"}) -> ToolCalls (ids for `fmt`); None unless every one is a
    given tool's."""
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        arguments = _arguments(obj.get(key, obj.get("arguments", {})))
        if arguments is None:
            return None
        calls.append(ToolCall(call_id(fmt), obj["name"], arguments))
    return calls or None


def _json_values(text: str) -> list[Any] | None:
    """The JSON values of `text`, one after another (`;` or whitespace between them); None if any does not parse."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):  # (a degenerate reply: thousands of brackets)
            return None
        values.append(value)


def parse(text: str, mode: str, fmt: str | None, names: set[str], named: str | None = None,
          parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """A whole reply -> (content, tool calls). `mode`: MODES; `fmt`: FORMATS (auto's; the ids' form for any mode);
    `named`: the named function; without `parallel` only the first call is kept (OpenAI's parallel_tool_calls)."""
    if mode == "named":
        return None, [ToolCall(call_id(fmt), named, text)]
    if mode == "required":
        values = _json_values(text)
        calls = _calls(values[0], names, "parameters", fmt) if values and isinstance(values[0], list) else None
        return (None, calls[:None if parallel else 1]) if calls else (text, [])
    start = _call_start(text, fmt)
    if start is None:
        return text, []
    rest = text[start:]
    if fmt == "hermes":
        objects = [_json_values(body) for body in _HERMES.findall(rest)]
        calls = _calls([v[0] for v in objects if v and len(v) == 1], names, "arguments", fmt) \
            if objects and all(v and len(v) == 1 for v in objects) else None
    else:
        marker = _STARTS[fmt][0]
        values = _json_values(rest[len(marker):] if rest.startswith(marker) else rest)
        if fmt == "mistral":
            values = values[0] if values and len(values) == 1 and isinstance(values[0], list) else None
        calls = _calls(values, names, "parameters" if fmt == "llama3_json" else "arguments", fmt) if values else None
    if not calls:
        return text, []
    return text[:start].strip() or None, calls[:None if parallel else 1]


def _call_start(text: str, fmt: str | None) -> int | None:
    """Where a tool call starts in text (its format's marker), or None."""
    if fmt == "hermes":
        at = text.find("<tool_call>")
        return at if at >= 0 else None
    stripped = text.lstrip()
    if fmt in _STARTS and stripped.startswith(_STARTS[fmt]):
        return len(text) - len(stripped)
    return None


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request's reply may call tools: `mode` (MODES), `fmt` (FORMATS: the model's, for "auto"), the
    tools' names, the named function (mode "named")."""

    mode: str
    fmt: str | None
    names: frozenset[str]
    named: str | None = None
    parallel: bool = True  # OpenAI's parallel_tool_calls: False keeps a reply's first call only

    def __post_init__(self) -> None:
        if self.mode not in MODES or (self.mode == "auto" and self.fmt not in FORMATS) \
                or (self.mode == "named") != (self.named is not None):
            raise ValueError(f"bad tool plan: mode {self.mode!r}, format {self.fmt!r}, named {self.named!r}")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply -> (content, tool calls)."""
        return parse(text, self.mode, self.fmt, set(self.names), self.named, self.parallel)

    @property
    def tool_reason(self) -> bool:
        """Whether a reply with calls ends with finish_reason "tool_calls" (OpenAI's: not for a named function)."""
        return self.mode != "named"


class ToolReply:
    """One streamed chat reply under tools: what of its text goes out as content at once, and its tool calls' stream
    deltas. A named function's arguments stream as they come; "required" replies, and "auto" replies from where a
    call may start (a suffix that could be the start of a marker is held back), are held until the end and parsed
    whole; a reply that turns out not to be calls goes out as content then."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.mode, self.fmt, self.named = plan.mode, plan.fmt, plan.named
        self.text = ""  # the reply so far
        self.sent = 0  # how much of it went out as content
        self.holding = plan.mode == "required"  # past the start of a call: the rest waits for the end
        self.named_id = call_id(plan.fmt) if plan.named else None
        self.calls: list[ToolCall] = []  # once finished

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """A text delta of the reply -> (content to send now, tool-call deltas to send now)."""
        first = not self.text
        self.text += delta
        if self.fmt == "hermes" and not self.holding and self.mode == "auto":
            # only the new text (and a marker's start held back before it) can hold the marker: a search of the
            # whole reply at every delta would cost the loop ~47 us a token by 32k tokens
            at = self.text.find("<tool_call>", self.sent)
            if at >= 0:
                self.holding = True
                content, self.sent = self.text[self.sent:at], at
                return content, []
            end = len(self.text) - _marker_prefix(self.text, "<tool_call>")
            content, self.sent = self.text[self.sent:end], max(self.sent, end)
            return content, []
        if self.mode == "named":
            head = {"id": self.named_id, "type": "function", "function": {"name": self.named, "arguments": delta}}
            return "", [{"index": 0, **head} if first else {"index": 0, "function": {"arguments": delta}}]
        if self.holding:
            return "", []
        end = len(self.text)
        start = _call_start(self.text, self.fmt)
        if start is not None:  # (before a Llama / Mistral call only whitespace: nothing to send)
            self.holding, end = True, self.sent
        elif not self.text.strip() or any(m.startswith(self.text.lstrip()) for m in _STARTS[self.fmt]):
            end = self.sent  # only whitespace, or the start of a marker, so far: undecided
        content, self.sent = self.text[self.sent:end], max(self.sent, end)
        return content, []

    def finish(self) -> tuple[str, list[dict]]:
        """The reply ended -> (content still to send, tool-call deltas still to send); `calls` then holds them all."""
        if self.mode == "named":
            self.calls = [ToolCall(self.named_id, self.named, self.text)]
            head = {"index": 0, "id": self.named_id, "type": "function",
                    "function": {"name": self.named, "arguments": ""}}
            return "", [] if self.text else [head]
        content, calls = self.plan.parse(self.text)
        self.calls = calls
        if not calls:
            rest, self.sent = self.text[self.sent:], len(self.text)
            return rest, []
        start = _call_start(self.text, self.fmt) if self.mode == "auto" else self.sent
        left = self.text[self.sent:start].rstrip() if start is not None and start > self.sent else ""
        return left, [call.delta(i) for i, call in enumerate(calls)]

    @property
    def tool_reason(self) -> bool:
        """Once finished: whether the reply ends with finish_reason "tool_calls" (it made calls, not a named one's)."""
        return bool(self.calls) and self.plan.tool_reason


class PlainReply:
    """ToolReply's interface for a reply without tools: its text goes out as content as it comes."""

    tool_reason = False

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        return delta, []

    def finish(self) -> tuple[str, list[dict]]:
        return "", []


def _marker_prefix(text: str, marker: str) -> int:
    """The length of text's longest suffix that is a proper prefix of marker (held back: it may become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
