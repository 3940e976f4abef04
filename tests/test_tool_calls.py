"""Tool calls on the chat API (`launch/tool_calls.py`): each format's parser on replies with and without calls, the
streamed reply against the whole one for every way of cutting it into deltas, and the forms tool_choice holds a
reply to. The served path is in test_http_api.py."""

from __future__ import annotations

import json
import random

import pytest

from launch.tool_calls import ToolPlan, ToolReply, named_schema, required_schema

NAMES = frozenset({"get_weather", "add"})
WEATHER = {"city": "Paris"}
REPLIES = {  # (format, reply text) -> (content, [(name, arguments)]) of the whole reply
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'):
        ("Let me look.", [("get_weather", WEATHER), ("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}'):  # arguments as text, no closing tag
        (None, [("add", {"a": 3})]),
    ("hermes", "No tool needed: 42 < 43."): ("No tool needed: 42 < 43.", []),
    ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'):  # not one of the request's tools
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ("hermes", "<tool_call>{broken</tool_call>"): ("<tool_call>{broken</tool_call>", []),
    ("llama3_json", ' {"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", '
                    '"parameters": {"city": "Paris"}}'):
        (None, [("add", {"a": 1, "b": 2}), ("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'):
        (None, [("get_weather", WEATHER)]),
    ("llama3_json", '{"answer": 42}'): ('{"answer": 42}', []),
    ("llama3_json", "The set {1, 2} has two elements."): ("The set {1, 2} has two elements.", []),
    ("mistral", '[{"name": "add", "arguments": {"a": 5}}]'): (None, [("add", {"a": 5})]),
    ("mistral", "[1, 2] is a list."): ("[1, 2] is a list.", []),
}


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt, text", sorted(REPLIES), ids=[f"{f}-{i}" for i, (f, _) in enumerate(sorted(REPLIES))])
def test_a_whole_reply_and_every_cut_of_its_stream_give_the_same_calls(fmt: str, text: str) -> None:
    """parse() against the table; ToolReply over 30 random cuts of the text into deltas: the content it sends adds
    up to the reply's content (or the whole text when there are no calls), and the calls are the same, ids apart."""
    want_content, want_calls = REPLIES[(fmt, text)]
    plan = ToolPlan("auto", fmt, NAMES)
    content, calls = plan.parse(text)
    assert (content, calls_of(calls)) == (want_content, want_calls)
    rng = random.Random(3)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
        reply, sent, deltas = ToolReply(plan), "", []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            more, new = reply.feed(text[a:b])
            sent, deltas = sent + more, deltas + new
        more, new = reply.finish()
        sent, deltas = sent + more, deltas + new
        assert calls_of(reply.calls) == want_calls
        assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == \
            [(i, name, args) for i, (name, args) in enumerate(want_calls)]
        assert sent.strip() == (want_content or "") if want_calls else sent == text


def test_required_and_named_replies() -> None:
    """"required": a JSON array of {name, parameters}; a named function: the arguments themselves, streamed as
    argument deltas under one id (the first delta names the function)."""
    plan = ToolPlan("required", None, NAMES)
    content, calls = plan.parse('[{"name": "add", "parameters": {"a": 1}}, {"name": "get_weather", '
                                '"parameters": {"city": "Paris"}}]')
    assert content is None and calls_of(calls) == [("add", {"a": 1}), ("get_weather", WEATHER)]
    assert plan.parse('[{"name": "add", "parameters": {"a"') == ('[{"name": "add", "parameters": {"a"', [])  # cut
    named = ToolPlan("named", None, NAMES, "get_weather")
    reply = ToolReply(named)
    deltas = [d for piece in ('{"ci', 'ty": "Pa', 'ris"}') for d in reply.feed(piece)[1]]
    assert reply.finish() == ("", [])
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"] == reply.calls[0].id
    assert all("name" not in d["function"] and "id" not in d for d in deltas[1:])
    assert "".join(d["function"]["arguments"] for d in deltas) == reply.calls[0].arguments == '{"city": "Paris"}'
    assert not named.tool_reason and plan.tool_reason
    empty = ToolReply(named)
    assert empty.finish()[1][0]["function"] == {"name": "get_weather", "arguments": ""}
    with pytest.raises(ValueError, match="bad tool plan"):
        ToolPlan("auto", None, NAMES)


def test_the_forms_tool_choice_holds_a_reply_to() -> None:
    from jit_context.structured_output import StructuredOutput

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
             {"type": "function", "function": {"name": "now"}}]
    assert named_schema(tools[0]) == tools[0]["function"]["parameters"]
    assert named_schema(tools[1]) == {"type": "object"}
    many, one = required_schema(tools, parallel=True), required_schema(tools, parallel=False)
    assert many["minItems"] == 1 and "maxItems" not in many and one["maxItems"] == 1
    assert [c["properties"]["name"]["const"] for c in many["items"]["anyOf"]] == ["get_weather", "now"]
    for schema in (many, one, named_schema(tools[0])):  # llguidance reads each
        StructuredOutput(json=json.dumps(schema)).checked_grammar()


def test_ids_parallel_calls_and_degenerate_replies() -> None:
    """Mistral's format gets 9-character alphanumeric ids (its templates refuse others when a call comes back);
    parallel_tool_calls false keeps the first call; a reply of thousands of brackets is content, not an error."""
    text = '[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {"city": "Paris"}}]'
    _, calls = ToolPlan("auto", "mistral", NAMES).parse(text)
    assert len(calls) == 2 and all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    _, [first] = ToolPlan("auto", "mistral", NAMES, parallel=False).parse(text)
    assert first.name == "add"
    assert ToolPlan("named", "mistral", NAMES, "add").parse("{}")[1][0].id.isalnum()
    hermes = '<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "add", "arguments": {}}'
    assert len(ToolPlan("auto", "hermes", NAMES).parse(hermes)[1]) == 2
    assert len(ToolPlan("auto", "hermes", NAMES, parallel=False).parse(hermes)[1]) == 1
    reply = ToolReply(ToolPlan("auto", "hermes", NAMES, parallel=False))
    reply.feed(hermes)
    assert len(reply.finish()[1]) == 1 and len(reply.calls) == 1
    for fmt, degenerate in (("llama3_json", "{" * 5000), ("mistral", "[" * 5000),
                            ("hermes", "<tool_call>" + "[" * 5000)):
        assert ToolPlan("auto", fmt, NAMES).parse(degenerate) == (degenerate, [])


def test_required_moves_the_tools_defs_to_the_root() -> None:
    """Parameters with `$defs` (what openai.pydantic_function_tool writes for nested models): nested under the
    array, their `#/$defs/...` references must still resolve, so the definitions move to the root; one name defined
    two ways is refused."""
    from jit_context.structured_output import StructuredOutput

    place = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
        "$defs": {"Place": place}}}}
    other = {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/Place"}}, "$defs": {"Place": place}}}}
    schema = required_schema([tool, other], parallel=True)
    assert schema["$defs"] == {"Place": place}
    assert all("$defs" not in c["properties"]["parameters"] for c in schema["items"]["anyOf"])
    StructuredOutput(json=json.dumps(schema)).checked_grammar()
    assert "$defs" in tool["function"]["parameters"]  # (the request's own tools are left as they are)
    clash = {"type": "function", "function": {"name": "now", "parameters": {"$defs": {"Place": {"type": "string"}}}}}
    with pytest.raises(ValueError, match="Place"):
        required_schema([tool, clash], parallel=True)


def test_the_sdk_s_own_assistant_message_comes_back() -> None:
    """What `messages.append(reply.choices[0].message)` sends with the openai SDK's stream helper or parse():
    refusal, annotations, audio, function_call and parsed (null), a tool call's index and parsed_arguments."""
    from launch.openai_protocol import ChatCompletionRequest

    echoed = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "parsed": None,
              "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                              "function": {"name": "add", "arguments": '{"a": 1}', "parsed_arguments": {"a": 1}}}]}
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "1+1?"}, echoed,
                                                      {"role": "tool", "tool_call_id": "call_1", "content": "2"}])
    assert body.messages[1].native() == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}
    with pytest.raises(ValueError):
        ChatCompletionRequest(model="m", messages=[{**echoed, "function_call": {"name": "add", "arguments": "{}"}}])
    deep = {**echoed, "tool_calls": [{"id": "c", "type": "function",
                                      "function": {"name": "add", "arguments": "[" * 5000}}]}
    assert ChatCompletionRequest(model="m", messages=[deep]).messages[0].native()["tool_calls"][0]["function"][
        "arguments"] == "[" * 5000  # (not JSON: kept as text)


def test_serve_s_tool_call_parser_flag() -> None:
    from launch.cmd_serve import tool_call_format

    found = {"tool_call_format": "hermes"}
    assert tool_call_format("auto", found) == "hermes" and tool_call_format("auto", {}) is None
    assert tool_call_format("llama3_json", found) == "llama3_json" and tool_call_format("none", found) is None

