"""OpenAI's Responses API in process (launch/responses_api.py): a request's conversion to the chat request that
answers it (input items, instructions, tools, text.format, the fields refused), and the stream of events built from
a reply's messages (text, Hermes tool calls read as the chat route reads them, a failure mid-way). The served route
through the openai SDK: tests/test_http_api.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from ipc.messages import Finished, TokenChunk
from launch.client import ServerError
from launch.openai_protocol import Unsupported
from launch.responses_api import ResponseBuilder, ResponsesRequest, response_events
from launch.tool_calls import PlainReply, ToolPlan, ToolReply

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def test_a_request_becomes_the_chat_that_answers_it() -> None:
    """Instructions first; an assistant message and the function calls given back after it one assistant message
    with tool_calls (arguments as the template renders them); outputs as tool messages; tools, a named tool choice,
    parallel_tool_calls, max_output_tokens and a JSON schema in text.format as the chat route's fields."""
    body = ResponsesRequest.model_validate({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 30, "temperature": 0.5,
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris and Rome?"}]},
                  {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
                  {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                   "arguments": '{"city": "Paris"}', "status": "completed"},
                  {"type": "function_call", "call_id": "call_2", "name": "get_weather",
                   "arguments": '{"city": "Rome"}'},
                  {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
                  {"type": "function_call_output", "call_id": "call_2", "output": "Rain"},
                  {"role": "developer", "content": "Answer now."}]})
    chat = body.chat_request()
    assert [m.native() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},
        {"role": "tool", "content": "Rain", "tool_call_id": "call_2"},
        {"role": "system", "content": "Answer now."}]
    assert chat.tool_mode() == "named" and chat.named_tool() == "get_weather" and chat.parallel_tool_calls is False
    assert chat.max_tokens == 30 and chat.temperature == 0.5 and chat.tools[0].function.parameters == WEATHER[
        "parameters"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    held = ResponsesRequest.model_validate({"model": "m", "input": "Hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": schema, "strict": True}}}).chat_request()
    assert held.structured() == {"json": schema} and held.messages[0].native() == {"role": "user", "content": "Hi"}
    assert ResponsesRequest(model="m", input="Hi", text={"format": {"type": "json_object"}}).chat_request() \
        .structured() == {"json_object": True}


@pytest.mark.parametrize("change, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"conversation": "conv_1"}, "conversation"),
    ({"max_output_tokens": 0}, "max_output_tokens"), ({"text": {"format": "json"}}, "text"),
    ({"text": {"format": {"type": "json_schema"}}}, "text"), ({"truncation": "auto"}, "truncation"),
    ({"reasoning": {"effort": "high"}}, "reasoning"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{**WEATHER, "name": "no spaces allowed"}]}, "tools"),  # the chat route's name check, named here
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"), ({"temperature": -1.0}, None),  # (-1: the JIT context's check)
])
def test_what_it_cannot_honour_is_refused_naming_the_field(change: dict, param: str | None) -> None:
    body = ResponsesRequest.model_validate({"model": "m", "input": "Hi", **change})
    if param is None:
        assert body.chat_request().temperature == -1.0
        return
    with pytest.raises(Unsupported) as refused:
        body.chat_request()
    assert refused.value.param == param, refused.value


async def _events(*messages):
    for msg in messages:
        if isinstance(msg, Exception):
            raise msg
        yield msg


def _stream(build: ResponseBuilder, reply, *messages) -> list[dict]:
    async def collect() -> list[str]:
        return [e async for e in response_events(_events(*messages), build, reply,
                                                 lambda e: ("executor_died", str(e), None))]

    events = []
    for text in asyncio.run(collect()):
        kind, data = text.strip().split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert kind == f"event: {events[-1]['type']}"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_a_stream_s_text_and_hermes_calls_become_items_in_order() -> None:
    """Text, then a Hermes <tool_call> in pieces (an app whose model writes that format, "auto"): the text streams as
    deltas of the message item, the call comes at the end as a function_call item (added, arguments, done), and the
    completed response holds both; a reply of nothing has its empty message."""
    request = ResponsesRequest(model="m", input="Weather?", tools=[WEATHER])
    build = ResponseBuilder(request, "m")
    plan = ToolPlan("auto", "hermes", frozenset({"get_weather"}))
    pieces = ["Let me ", "check.", "<tool_", 'call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
              "</tool_call>"]
    usage = {"prompt_tokens": 7, "completion_tokens": 12}
    events = _stream(build, ToolReply(plan), *[TokenChunk("r", p, [1]) for p in pieces],
                     Finished("r", "".join(pieces), [1] * 12, "stop", usage, {}))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "Let me check." and kinds[-1] == "response.completed"
    call_events = kinds[kinds.index("response.output_item.done") + 1:-1]
    assert call_events == ["response.output_item.added", "response.function_call_arguments.delta",
                           "response.function_call_arguments.done", "response.output_item.done"]
    final = events[-1]["response"]
    message, call = final["output"]
    assert message["content"][0]["text"] == "Let me check." and message["status"] == "completed"
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"].startswith("call_")
    assert json.loads(call["arguments"]) == {"city": "Oslo"} and final["usage"]["total_tokens"] == 19
    empty = _stream(ResponseBuilder(ResponsesRequest(model="m", input="x"), "m"), PlainReply(),
                    Finished("r", "", [2], "stop", usage, {}))
    assert [o["content"][0]["text"] for o in empty[-1]["response"]["output"]] == [""]
    # whitespace before a call is no message (the whole reply's parse strips it); a reply of whitespace alone is one
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    spaced = _stream(ResponseBuilder(request, "m"), ToolReply(plan), TokenChunk("r", "\n", [1]),
                     TokenChunk("r", call, [1]), Finished("r", "\n" + call, [1] * 9, "stop", usage, {}))
    assert [o["type"] for o in spaced[-1]["response"]["output"]] == ["function_call"]
    assert "response.output_text.delta" not in [e["type"] for e in spaced]
    blank = _stream(ResponseBuilder(request, "m"), ToolReply(plan), TokenChunk("r", " \n", [1]),
                    Finished("r", " \n", [1], "stop", usage, {}))
    assert [o["content"][0]["text"] for o in blank[-1]["response"]["output"]] == [" \n"]


def test_a_failure_mid_stream_ends_it_with_an_error_and_a_failed_response() -> None:
    build = ResponseBuilder(ResponsesRequest(model="m", input="x"), "m")
    events = _stream(build, PlainReply(), TokenChunk("r", "Hel", [1]),
                     ServerError("executor_died", "the graph executor process died"))
    assert [e["type"] for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert events[-2]["code"] == "executor_died" and events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "executor_died"
