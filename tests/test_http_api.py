"""The OpenAI-compatible HTTP API of a real `hybridrt serve` (default model, CPU), driven by the official
`openai` client and by raw HTTP for what that client won't send."""

from __future__ import annotations

import asyncio
import json
import re
import time
from contextlib import aclosing

import httpx
import openai
import pytest

from ipc.messages import Finished
from launch.async_client import AsyncClient
from launch.client import Client, ServerError
from launch.http_api import create_app
from tests.serve_process import ServeProcess, assert_nothing_left, free_port

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's plain server (conftest), shared with test_runtime.py and test_fuzz.py."""
    return shared_server


@pytest.fixture(scope="module")
def keyed_server(default_model_dir):
    """A server with --api-key: test_api_key checks the key on it, then test_sigterm_tells_open_requests_at_once
    (last in this file) ends it. One slot: that test needs a request queued behind a running one (with the CPU's
    default of two slots the second request would run at once; a batching server's shutdown is test_batching's)."""
    serve = ServeProcess("--api-key", "secret", "--max-num-seqs", "1")
    try:
        serve.wait_ready()
        yield serve
    finally:
        serve.stop()
        serve.proc.stdout.close()
        serve.proc.stderr.close()


@pytest.fixture(scope="module")
def model(server) -> str:
    with Client(server.address) as client:
        return client.status()["model"]


def openai_client(serve: ServeProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.http}/v1", api_key=key, max_retries=0, timeout=60)


def native_finished(address: str, **request) -> Finished:
    with Client(address) as client:
        *_, finished = client.generate(**request)
    return finished


def wait_idle(address: str, timeout_s: float = 20.0) -> None:
    """Until the server runs no request: a cancelled one of 3000 tokens (~60 s of decoding on the CPU machine) must
    stop well before timeout_s. (10 s once ran out on a loaded CI machine, cause not seen: the message now says what
    was still running.)"""
    deadline = time.monotonic() + timeout_s
    with Client(address) as client:
        while (status := client.status())["active"] is not None:
            assert time.monotonic() < deadline, f"the generation went on after its client left: {status}"
            time.sleep(0.05)


def test_health_and_models(server, model) -> None:
    health = httpx.get(f"{server.http}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    models = openai_client(server).models.list()
    assert [m.id for m in models.data] == [model]
    assert openai_client(server).models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        openai_client(server).models.retrieve("other")


def test_health_is_503_without_a_jit_context() -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(f"tcp://127.0.0.1:{free_port()}", "m", None, 128)) as client:
        reply = client.get("/health")
    assert reply.status_code == 503 and reply.json()["status"] == "unavailable"


def test_completion_equals_native_client(server, model) -> None:
    api = openai_client(server)
    completion = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    native = native_finished(server.address, prompt=PROMPT, params={"max_tokens": 8, "temperature": 0.0})
    choice = completion.choices[0]
    assert choice.text == native.text and choice.text.strip()
    assert choice.finish_reason == "length" and completion.object == "text_completion"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8

    streamed = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == native.text
    assert chunks[-1].choices[0].finish_reason == "length"

    by_ids = api.completions.create(model=model, prompt=native.token_ids, max_tokens=4, temperature=0)
    params = {"max_tokens": 4, "temperature": 0.0}
    again = native_finished(server.address, token_ids=native.token_ids, params=params)
    assert by_ids.choices[0].text == again.text


def test_chat_completion_streamed_and_not(server, model) -> None:
    api = openai_client(server)
    answer = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop" and answer.usage.completion_tokens > 0

    # The same question in text parts, which the API flattens to the same string.
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                         max_completion_tokens=24, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_penalties_and_logit_bias_reach_the_sampler_as_the_native_client_s(server, model) -> None:
    """OpenAI's presence_penalty, frequency_penalty and logit_bias: the same text as the native client's request
    with the same params; a bias of 100 makes one token every greedy choice."""
    api = openai_client(server)
    extra = {"presence_penalty": 1.5, "frequency_penalty": 1.0, "logit_bias": {"28": -3.0, "30": 2.5}}
    completion = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, **extra)
    native = native_finished(server.address, prompt=PROMPT, params={"max_tokens": 12, "temperature": 0.0, **extra})
    plain = native_finished(server.address, prompt=PROMPT, params={"max_tokens": 12, "temperature": 0.0})
    assert completion.choices[0].text == native.text and native.token_ids != plain.token_ids
    forced = native_finished(server.address, prompt=PROMPT, params={"max_tokens": 4, "temperature": 0.0,
                                                                    "logit_bias": {"30": 100}})
    assert forced.token_ids == [30] * 4
    special = api.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0,
                                     logit_bias={"1": 100}, extra_body={"skip_special_tokens": False})
    assert special.choices[0].text == "<|im_start|><|im_start|>"  # (vLLM's param; skipped by default)
    chat = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=3, temperature=0,
                                       logit_bias={"30": 100})
    assert chat.usage.completion_tokens == 3 and chat.choices[0].message.content == forced.text[:len(
        chat.choices[0].message.content)]


def test_n_choices_are_n_native_requests_side_by_side(server, model) -> None:
    """`n`: choice i is what the native client gets for the same request with the seed moved on by i; streamed, each
    choice's deltas carry its index and add up to the same text; the prompt's tokens count once in the usage."""
    api = openai_client(server)
    done = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=1.0, seed=11, n=3)
    assert [c.index for c in done.choices] == [0, 1, 2]
    natives = [native_finished(server.address, messages=QUESTION,
                               params={"max_tokens": 6, "temperature": 1.0, "seed": 11 + i}) for i in range(3)]
    assert [c.message.content for c in done.choices] == [f.text for f in natives]
    assert len({c.message.content for c in done.choices}) > 1  # seeds that differ draw differently
    assert done.usage.prompt_tokens == natives[0].usage["prompt_tokens"]
    assert done.usage.completion_tokens == sum(f.usage["completion_tokens"] for f in natives)
    streamed = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, temperature=1.0, seed=11,
                                           n=3, stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = {}, {}, None
    for chunk in streamed:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(3)] == [c.message.content for c in done.choices]
    assert [reasons[i] for i in range(3)] == [c.finish_reason for c in done.choices] and usage == done.usage
    greedy = api.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, n=2, logprobs=1)
    assert greedy.choices[0].text == greedy.choices[1].text and greedy.choices[1].logprobs.tokens
    wait_idle(server.address)  # nothing of these left running


def test_a_batch_of_prompts_gives_each_prompt_s_choices_in_order(server, model) -> None:
    """A completions request with several prompts (texts, or token-id lists: lm-evaluation-harness's batches): choice
    p * n + i is prompt p's choice i, each what it gets alone (echoed with its own prompt), streamed and not; the
    usage counts each prompt once; with echo and logprobs each choice lists its own prompt's tokens."""
    api = openai_client(server)
    prompts = ["The capital of France is", "Two plus two is", "Once upon a time"]
    alone = [api.completions.create(model=model, prompt=p, max_tokens=3, temperature=0).choices[0].text
             for p in prompts]
    both = api.completions.create(model=model, prompt=prompts, max_tokens=3, temperature=0, n=2, echo=True)
    assert [c.index for c in both.choices] == list(range(6))
    assert [c.text for c in both.choices] == [p + a for p, a in zip(prompts, alone) for _ in range(2)]
    with Client(server.address) as client:
        ids = [client.tokenize(prompt=p) for p in prompts]
    assert both.usage.prompt_tokens == sum(len(i) for i in ids) and both.usage.completion_tokens == 18
    texts: dict[int, str] = {}
    for chunk in api.completions.create(model=model, prompt=ids, max_tokens=3, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
        usage = chunk.usage or None
    assert [texts[i] for i in range(3)] == alone and usage.prompt_tokens == both.usage.prompt_tokens
    scored = api.completions.create(model=model, prompt=ids[:2], max_tokens=1, temperature=0, echo=True, logprobs=1)
    for choice, prompt_ids in zip(scored.choices, ids[:2], strict=True):
        assert len(choice.logprobs.tokens) == len(prompt_ids) + 1 and choice.logprobs.token_logprobs[0] is None
    wait_idle(server.address)


BAD_REQUESTS = [  # (endpoint, change to a good body, status, error param)
    ("completions", {"temperature": -1}, 400, None),
    ("completions", {"top_p": 2}, 400, None),
    ("completions", {"stream_options": {"frobnicate": True}}, 400, "stream_options"),  # top level: ignored
    ("completions", {"prompt": ""}, 400, None),
    ("completions", {"n": 17}, 400, "n"),
    ("chat/completions", {"n": 0}, 400, "n"),
    ("chat/completions", {"n": 2, "temperature": -1}, 400, None),  # each of the n refused by the JIT context
    ("chat/completions", {"n": 2, "temperature": -1, "stream": True}, 400, None),
    ("completions", {"max_tokens": 0}, 400, "max_tokens"),  # 0 is for echo
    ("completions", {"echo": True, "logprobs": 1, "stream": True, "n": 2}, 400, "n"),
    ("completions", {"prompt": [[1, 2], [3]], "echo": True, "logprobs": 1, "stream": True}, 400, "prompt"),
    ("completions", {"presence_penalty": 2.5}, 400, None),  # the JIT context's range check
    ("completions", {"logit_bias": {"99999999": 5}}, 400, None),  # past the vocabulary
    ("chat/completions", {"logit_bias": {"the": 5}}, 400, None),  # not a token id
    ("completions", {"prompt": ["a"] * 33, "n": 2}, 400, "prompt"),  # 66 completions: over 64
    ("completions", {"prompt": ["a", ""], "stream": True}, 400, "prompt"),  # each prompt checked before the stream
    ("completions", {"model": "gpt-5"}, 404, "model"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages"),
    ("chat/completions", {"temperature": -1, "stream": True}, 400, None),
    # refused by the JIT context (longer than the context): a streamed request is answered after its checks
    ("chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}], "stream": True}, 400, None),
    ("chat/completions", {"response_format": {"type": "xml"}}, 400, "response_format"),
    ("chat/completions", {"response_format": {"type": "json_object", "schema": {}}}, 400, "response_format"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format"),
    ("completions", {"guided_regex": "a+", "guided_choice": ["b"]}, 400, "guided_choice"),
    # the JIT context's own checks: llguidance's reading of the schema, the regex
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "bogus"}}}}, 400, None),
    ("completions", {"structured_outputs": {"regex": "(unclosed"}}, 400, None),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}],
                          "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("chat/completions", {"tool_choice": "required"}, 400, "tool_choice"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
                          "response_format": {"type": "json_object"}}, 400, "tool_choice"),
    # "auto" (the default with tools): the default model's template teaches no tool-call format
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
]
NEUTRAL_CHAT_FIELDS = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                       "parallel_tool_calls": True, "store": False, "metadata": {"k": "v"}, "n": 1,
                       "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "user": "u"}


def test_bad_requests_are_openai_errors(server, model) -> None:
    bodies = {"completions": {"model": model, "max_tokens": 2, "prompt": "Hi"},
              "chat/completions": {"model": model, "max_tokens": 2, "messages": QUESTION}}
    for path, change, status, param in BAD_REQUESTS:
        reply = httpx.post(f"{server.http}/v1/{path}", json={**bodies[path], **change}, timeout=60)
        assert reply.status_code == status, (change, reply.text)
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], change
        assert error["type"] == "invalid_request_error" and error["param"] == param, (change, error)
    for path, body in bodies.items():  # the server still answers
        good = httpx.post(f"{server.http}/v1/{path}", json=body, timeout=60)
        assert good.status_code == 200, good.text
    # What SDKs send by default passes.
    chat = httpx.post(f"{server.http}/v1/chat/completions", json={**bodies["chat/completions"], **NEUTRAL_CHAT_FIELDS},
                      timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"], chat.text


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}}}


def test_structured_output_in_every_form_the_api_takes(server, model) -> None:
    """response_format json_schema and json_object, vLLM's guided_choice (streamed) and structured_outputs' regex on
    the completions route: each reply is a whole match that ends by EOS; the schema's equals the native client's
    request with the same `structured` params."""
    api = openai_client(server)
    ask = [{"role": "user", "content": "Give a person's name and age as JSON."}]
    chat = api.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    person = json.loads(chat.choices[0].message.content)
    assert chat.choices[0].finish_reason == "stop" and set(person) == {"name", "age"}, person
    assert isinstance(person["age"], int) and isinstance(person["name"], str)
    native = native_finished(server.address, messages=ask,
                             params={"max_tokens": 60, "temperature": 0.0, "structured": {"json": PERSON}})
    assert native.text == chat.choices[0].message.content
    anything = api.chat.completions.create(model=model, messages=ask, max_tokens=6, temperature=0.7, seed=1,
                                           response_format={"type": "json_object"})
    assert anything.choices[0].message.content.startswith("{")  # (6 tokens: the object's start)
    picked = api.completions.create(model=model, prompt="Is the sky blue? Answer:", max_tokens=5, temperature=0,
                                    extra_body={"guided_choice": ["yes", "no", "maybe"]}, stream=True)
    chunks = [c.choices[0] for c in picked if c.choices]
    assert "".join(c.text for c in chunks) in ("yes", "no", "maybe") and chunks[-1].finish_reason == "stop"
    date = api.completions.create(model=model, prompt="The date today is", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": r" \d{4}-\d{2}-\d{2}"}})
    assert re.fullmatch(r" \d{4}-\d{2}-\d{2}", date.choices[0].text), date.choices[0].text


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "required": ["a", "b"], "additionalProperties": False,
             "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_choice_required_and_named_hold_the_reply_to_the_tools(server, model) -> None:
    """The default model's template teaches no tool-call format: a named function and "required" still give tool
    calls (the reply held to their JSON form), streamed and not; "auto" is a 400 naming tool_choice; a tool's
    result goes back as a tool message."""
    api = openai_client(server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = api.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, tool_choice=named, max_tokens=30,
                                        temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # (OpenAI's reason for a named one)
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    stream = api.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, tool_choice=named, max_tokens=30,
                                         temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    pieces = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert pieces[0].function.name == "get_weather" and pieces[0].id.startswith("call_")
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments
    required = api.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=40, temperature=0)
    assert required.choices[0].finish_reason == "tool_calls"
    [made] = required.choices[0].message.tool_calls
    assert made.function.name in ("get_weather", "add") and isinstance(json.loads(made.function.arguments), dict)
    with pytest.raises(openai.BadRequestError, match="tool-call format") as error:
        api.chat.completions.create(model=model, messages=WEATHER, tools=TOOLS, max_tokens=5)
    assert error.value.body["param"] == "tool_choice"
    with Client(server.address) as client:
        assert client.status()["tool_call_format"] is None  # (what serve's --tool-call-parser auto takes)
    # (content null, as the SDK sends it back: rendered "", as vLLM does, which this template needs)
    follow = [*WEATHER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    # (this template shows a tool message as a turn of role "tool"; tool_choice "none" leaves the reply free)
    answer = api.chat.completions.create(model=model, messages=follow, tools=TOOLS, tool_choice="none",
                                         max_tokens=12, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


def test_tool_choice_auto_parses_the_model_s_format(server, model) -> None:
    """An app that reads Hermes' <tool_call> format (as for a Qwen2.5 model) over the shared server: a reply held to
    a tool call's text by a regex (the default model would not write one itself) comes back as its tool call,
    finish_reason "tool_calls", streamed and not; a reply without one is content."""
    from starlette.testclient import TestClient

    call_text = r'<tool_call>\{"name": "add", "arguments": \{"a": [0-9]\}\}</tool_call>'
    body = {"model": model, "messages": WEATHER, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
            "structured_outputs": {"regex": call_text}}
    with TestClient(create_app(server.address, model, None, 4096, tool_call_format="hermes")) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
        [call] = whole["message"]["tool_calls"]
        assert call["function"]["name"] == "add" and call["type"] == "function"
        assert set(json.loads(call["function"]["arguments"])) == {"a"}
        lines = client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        streamed = [t for d in deltas for t in d.get("tool_calls", ())]
        assert [t["function"] for t in streamed] == [call["function"]] and not any(d.get("content") for d in deltas)
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
        # n choices: each read for its calls on its own, streamed and not
        two = client.post("/v1/chat/completions", json={**body, "n": 2}).json()["choices"]
        assert [c["index"] for c in two] == [0, 1] and all(
            c["finish_reason"] == "tool_calls" and c["message"]["tool_calls"][0]["function"] == call["function"]
            and c["message"]["content"] is None for c in two)
        lines = client.post("/v1/chat/completions", json={**body, "n": 2, "stream": True}).text.split("\n\n")
        per_choice: dict[int, list] = {0: [], 1: []}
        for event in (json.loads(line[6:]) for line in lines if line.startswith("data: {")):
            for c in event["choices"]:
                per_choice[c["index"]].append(c)
        for chunks in per_choice.values():
            assert [t["function"] for c in chunks for t in c["delta"].get("tool_calls", ())] == [call["function"]]
            assert chunks[-1]["finish_reason"] == "tool_calls" and not any(c["delta"].get("content") for c in chunks)
        plain = client.post("/v1/chat/completions", json={**body, "structured_outputs": {"regex": "Sunny, 18 C."}})
        message = plain.json()["choices"][0]
        assert message["message"] == {"role": "assistant", "content": "Sunny, 18 C."}
        assert message["finish_reason"] == "stop"
        # "auto" reads the text with special tokens (a marker may be one); skip_special_tokens given wins
        forced = {**body, "structured_outputs": None, "logit_bias": {"1": 100}, "max_tokens": 2}
        marked = client.post("/v1/chat/completions", json=forced).json()["choices"][0]["message"]
        assert marked["content"] == "<|im_start|><|im_start|>"
        skipped = client.post("/v1/chat/completions", json={**forced, "skip_special_tokens": True}).json()
        assert skipped["choices"][0]["message"]["content"] == ""


def test_echo_puts_the_prompt_before_each_completion(server, model) -> None:
    """Completions' echo: the text starts with the prompt (a text prompt as given, token ids decoded), streamed and
    not, for each of n choices; the rest is the completion without echo."""
    api = openai_client(server)
    plain = api.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0)
    echoed = api.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    stream = api.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True)
    texts = [c.choices[0].text for c in stream if c.choices]
    assert texts[0] == PROMPT and "".join(texts) == echoed.choices[0].text
    with Client(server.address) as client:
        ids = client.tokenize(prompt=PROMPT)
    by_ids = api.completions.create(model=model, prompt=ids, max_tokens=3, temperature=0, echo=True, n=2, seed=1)
    assert [c.text for c in by_ids.choices] == [echoed.choices[0].text] * 2


def test_tokenize_and_detokenize_endpoints(server, model) -> None:
    """vLLM's shapes: /tokenize -> count, max_model_len, tokens; /detokenize -> prompt."""
    with Client(server.address) as client:
        expected = client.tokenize(messages=QUESTION)
        max_context = client.status()["max_context"]
    got = httpx.post(f"{server.http}/tokenize", json={"model": model, "messages": QUESTION}, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json() == {"count": len(expected), "max_model_len": max_context, "tokens": expected}
    # tools reach the template (this one shows none of them: the same count; test_tool_calls has one that does)
    with_tools = httpx.post(f"{server.http}/tokenize", json={"model": model, "messages": QUESTION, "tools": TOOLS},
                            timeout=60)
    assert with_tools.status_code == 200 and with_tools.json()["tokens"] == expected, with_tools.text
    text = httpx.post(f"{server.http}/detokenize", json={"tokens": expected}, timeout=60)
    assert text.status_code == 200 and "What is the capital of France?" in text.json()["prompt"], text.text
    for path, body, status in (("tokenize", {}, 400), ("tokenize", {"prompt": "a", "messages": QUESTION}, 400),
                               ("tokenize", {"model": "other", "prompt": "a"}, 404),
                               ("detokenize", {"tokens": [10**6]}, 400), ("detokenize", {"tokens": [-1]}, 400)):
        reply = httpx.post(f"{server.http}/{path}", json=body, timeout=60)
        assert reply.status_code == status and reply.json()["error"]["message"], (path, body, reply.text)


def test_metrics_count_requests_and_tokens(server, model) -> None:
    def samples() -> dict[str, float]:
        reply = httpx.get(f"{server.http}/metrics", timeout=60)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain"), reply.text
        return {k: float(v) for k, v in re.findall(r"^(hybridrt:\S+) (\S+)$", reply.text, re.MULTILINE)}

    label = f'{{model_name="{model}"}}'
    before = samples()
    api = openai_client(server)
    for _ in range(3):
        api.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    after = samples()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta[f"hybridrt:generation_tokens_total{label}"] == 12
    assert delta[f'hybridrt:request_success_total{{model_name="{model}",finished_reason="length"}}'] == 3
    assert delta[f"hybridrt:time_to_first_token_seconds_count{label}"] == 3
    assert delta[f"hybridrt:time_per_output_token_seconds_count{label}"] == 9
    assert after[f"hybridrt:num_requests_running{label}"] == 0
    assert httpx.get(f"{server.http}/version").json()["version"]


@pytest.mark.parametrize("n", [1, 2])
def test_client_disconnect_cancels_generation(server, model, n) -> None:
    """A streamed request's generation ends when its client hangs up; with n > 1 every choice's."""
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True,
            "stream": True, "n": n}
    with httpx.stream("POST", f"{server.http}/v1/completions", json=body, timeout=60) as reply:
        events = (line for line in reply.iter_lines() if line)
        assert all(next(events).startswith("data: {") for _ in range(3))  # tokens are flowing: now hang up
    wait_idle(server.address)
    if n > 1:  # and a non-streamed one whose client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.http}/v1/completions", json={**body, "stream": False},
                       timeout=httpx.Timeout(60, read=2.0))
        wait_idle(server.address)


def test_client_disconnect_cancels_non_streamed_generation(server, model) -> None:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection mid-generation
        httpx.post(f"{server.http}/v1/completions", json=body, timeout=httpx.Timeout(60, read=2.0))
    wait_idle(server.address)
    reply = httpx.post(f"{server.http}/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4


def test_async_client_cancels_when_closed_early(server) -> None:
    async def scenario() -> str:
        client = AsyncClient(server.address)
        try:
            params = {"max_tokens": 3000, "ignore_eos": True}
            async with aclosing(client.generate(prompt="Once upon a time", params=params)) as events:
                async for _ in events:
                    break  # stop after one token; closing the generator sends CancelRequest
            wait_idle(server.address)
            try:
                await anext(client.generate(prompt="Hi", params={"temperature": -1}))
            except ServerError as e:
                return e.code
            return "no error"
        finally:
            client.close()

    assert asyncio.run(scenario()) == "invalid_request"


def test_async_client_reuses_the_socket_of_a_finished_request(server) -> None:
    """A request that ended with Finished leaves its connected socket for the next (no connect per request); one
    cancelled midway, or ended by an error, does not (its stream may still hold frames)."""
    async def scenario() -> list:
        client = AsyncClient(server.address)
        seen = []
        try:
            params = {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
            for _ in range(2):
                texts = [m.text async for m in client.generate(prompt="Once upon a time", params=params)]
                seen.append((len(texts), [id(w) for w in client._idle]))
            async with aclosing(client.generate(prompt="Once upon a time",
                                                params={"max_tokens": 3000, "ignore_eos": True})) as events:
                async for _ in events:
                    break
            seen.append(len(client._idle))
            wait_idle(server.address)
            with pytest.raises(ServerError):
                await anext(client.generate(prompt="Hi", params={"temperature": -1}))
            seen.append(len(client._idle))
            texts = [m.text async for m in client.generate(prompt="Once upon a time", params=params)]
            seen.append((len(texts), len(client._idle)))
        finally:
            client.close()
        return seen

    first, second, after_cancel, after_error, last = asyncio.run(scenario())
    assert first[0] == second[0] == 4 and len(first[1]) == 1 and first[1] == second[1]  # 3 tokens + Finished
    assert after_cancel == 0 and after_error == 0 and last == (4, 1)


@pytest.mark.parametrize("local", [True, False], ids=["local-stream", "zeromq"])
def test_async_client_streams_over_the_local_stream_or_zeromq_alike(server, local) -> None:
    """The asyncio client finds the server's local stream (as the native client does) when told to; the tokens are
    the same either way, and a cancelled request's connection is not reused on either."""
    async def scenario() -> tuple[list, str | None, int]:
        client = AsyncClient(server.address, local=local)
        try:
            params = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
            ids = [m.token_ids async for m in client.generate(prompt="Once upon a time", params=params)]
            async with aclosing(client.generate(prompt="Once upon a time",
                                                params={"max_tokens": 3000, "ignore_eos": True})) as events:
                async for _ in events:
                    break
            return ids, client.local_path, len(client._idle)
        finally:
            client.close()

    ids, path, idle = asyncio.run(scenario())
    wait_idle(server.address)
    assert (path is not None) == local and idle == 0
    with Client(server.address, local=False) as native:
        *_, final = native.generate(prompt="Once upon a time", params={"max_tokens": 6, "temperature": 0.0,
                                                                        "ignore_eos": True})
    assert [t for chunk in ids[:-1] for t in chunk] == final.token_ids


def test_api_key(keyed_server) -> None:
    serve = keyed_server
    with pytest.raises(openai.AuthenticationError):
        openai_client(serve, "wrong").models.list()
    bare = httpx.get(f"{serve.http}/v1/models")
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{serve.http}/health").status_code == 200
    assert httpx.post(f"{serve.http}/tokenize", json={"prompt": "a"}).status_code == 401
    api = openai_client(serve, "secret")
    model = api.models.list().data[0].id
    assert api.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
    # The scheme is case-insensitive (RFC 7235); the key is not.
    assert httpx.get(f"{serve.http}/v1/models", headers={"authorization": "bearer secret"}).status_code == 200
    assert httpx.get(f"{serve.http}/v1/models", headers={"authorization": "Bearer SECRET"}).status_code == 401
    # The native socket wants the same key in every request: without it nothing is served or revealed.
    with Client(serve.address, api_key="wrong") as client:
        for call in (client.status, lambda: client.tokenize("a"), lambda: list(client.generate("a"))):
            with pytest.raises(ServerError) as info:
                call()
            assert info.value.code == "unauthorized"
    with Client(serve.address, api_key="secret") as client:
        assert client.tokenize("a") and client.status()["ready"]
        *_, final = client.generate("Hi", params={"max_tokens": 2, "temperature": 0})
        assert len(final.token_ids) == 2


def test_sigterm_tells_open_requests_at_once(keyed_server) -> None:
    """SIGTERM on serve with an HTTP stream running and a native request queued behind it: stopping must not wait
    for their generations (uvicorn's graceful shutdown would wait for the open stream, for minutes on the CPU).
    The stream ends at once with a shutting_down error event, the queued client is told `shutting_down` instead of
    being left to its own time-out, and serve exits 0 leaving nothing behind. It ends the module's keyed server
    (the key plays no part in stopping)."""
    import signal
    import threading

    serve = keyed_server
    outcome: list = []

    def queued(client: Client) -> None:
        try:
            list(client.generate(prompt="Another one.", params={"max_tokens": 2000, "ignore_eos": True}))
            outcome.append((None, time.monotonic()))
        except ServerError as e:
            outcome.append((e, time.monotonic()))

    with Client(serve.address, api_key="secret", timeout_s=10) as client:
        facts = client.status()
        executor, jit = facts["executor"]["executor_pid"], facts["jit_context_pid"]
        api = openai_client(serve, "secret")
        model = api.models.list().data[0].id
        stream = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=2000, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
        for _, _chunk in zip(range(3), stream):
            pass
        waiter = threading.Thread(target=queued, args=(client,))
        waiter.start()
        deadline = time.monotonic() + 10
        while client.status()["queued"] < 1:
            assert time.monotonic() < deadline, "the native request was never queued"
            time.sleep(0.02)
        serve.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        with pytest.raises(openai.APIError, match="shutting down"):
            for _chunk in stream:
                pass
        assert time.monotonic() - stopped < 3.0
        waiter.join(timeout=15)
    [(error, when)] = outcome
    assert isinstance(error, ServerError) and error.code == "shutting_down", error
    assert when - stopped < 2.0
    assert serve.proc.wait(timeout=10) == 0, serve.proc.stderr.read()
    assert_nothing_left(serve, executor, jit)


def test_unknown_fields_are_ignored_and_warned_once_developer_is_system(server, model, caplog) -> None:
    """As vLLM: a field the API does not know is accepted (the server logs it once); a known one it cannot honour
    keeps its 400. The `developer` role is the system role."""
    import logging

    from launch.http_api import warn_unknown
    from launch.openai_protocol import ChatCompletionRequest

    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."}]
    body = {"model": model, "max_tokens": 4, "temperature": 0, "messages": messages}
    plain = httpx.post(f"{server.http}/v1/chat/completions", json=body, timeout=60)
    extra = httpx.post(f"{server.http}/v1/chat/completions", json={**body, "some_new_sdk_field": {"x": 1}},
                       timeout=60)
    developer = httpx.post(f"{server.http}/v1/chat/completions", timeout=60,
                           json={**body, "messages": [{**messages[0], "role": "developer"}, messages[1]]})
    assert plain.status_code == extra.status_code == developer.status_code == 200, (extra.text, developer.text)
    text = plain.json()["choices"][0]["message"]["content"]
    assert extra.json()["choices"][0]["message"]["content"] == text
    assert developer.json()["choices"][0]["message"]["content"] == text
    refused = httpx.post(f"{server.http}/v1/chat/completions", json={**body, "tools": [{"type": "function"}]},
                         timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"

    warned: set[str] = set()
    request = ChatCompletionRequest(**body, some_new_sdk_field=1, other=2)
    with caplog.at_level(logging.WARNING, logger="hybridrt.http"):
        warn_unknown(request, warned)
        warn_unknown(request, warned)
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring unknown request field(s) other, some_new_sdk_field (warned once per field)"]


def test_a_body_without_the_json_content_type_gets_a_hint() -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(f"tcp://127.0.0.1:{free_port()}", "m", None, 128)) as client:
        reply = client.post("/v1/completions", content=b'{"model": "m", "prompt": "hi"}',
                            headers={"content-type": "text/plain"})
    assert reply.status_code == 400
    assert "`Content-Type: application/json`; this request sent 'text/plain'" in reply.json()["error"]["message"]


def test_vllm_chat_template_extras_and_min_tokens(server, model) -> None:
    """continue_final_message (the reply continues the assistant's last message), chat_template_kwargs, and
    min_tokens (no EOS and no stop string before it), as vLLM takes them; bad combinations are 400s."""
    from ipc.messages import ChatOptions

    url = f"{server.http}/v1/chat/completions"
    started = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    body = {"model": model, "max_tokens": 3, "temperature": 0, "messages": started,
            "add_generation_prompt": False, "continue_final_message": True}
    got = httpx.post(url, json=body, timeout=60)
    assert got.status_code == 200, got.text
    native = native_finished(server.address, messages=started, params={"max_tokens": 3, "temperature": 0.0},
                             chat=ChatOptions(add_generation_prompt=False, continue_final_message=True))
    assert got.json()["choices"][0]["message"]["content"] == native.text and "Paris" in native.text
    with Client(server.address) as client:
        closed = client.tokenize(messages=started, add_generation_prompt=False)  # the message closed by the template
    assert got.json()["usage"]["prompt_tokens"] < len(closed)  # left open: no end-of-turn tokens after it

    plain = {"model": model, "max_tokens": 4, "temperature": 0, "messages": QUESTION}
    kwargs = httpx.post(url, json={**plain, "chat_template_kwargs": {"enable_thinking": False}}, timeout=60)
    assert kwargs.status_code == 200, kwargs.text  # this template has no such variable: same reply
    assert kwargs.json()["choices"][0]["message"] == httpx.post(url, json=plain, timeout=60).json()["choices"][0][
        "message"]
    for extra, param in (({"continue_final_message": True}, "continue_final_message"),  # needs the flag off
                         ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs")):
        bad = httpx.post(url, json={**plain, **extra}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    last_user = httpx.post(url, json={**plain, "add_generation_prompt": False, "continue_final_message": True},
                           timeout=60)
    assert last_user.status_code == 400 and "assistant" in last_user.json()["error"]["message"], last_user.text

    # min_tokens: a one-word answer ends at once; with min_tokens the end-of-turn token is held off.
    word = {"model": model, "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "system", "content": "Answer in one word."}, *QUESTION]}
    short = httpx.post(url, json=word, timeout=60).json()
    ended = short["usage"]["completion_tokens"]
    assert short["choices"][0]["finish_reason"] == "stop" and ended < 20, short
    held = httpx.post(url, json={**word, "min_tokens": ended + 3}, timeout=60).json()
    assert held["usage"]["completion_tokens"] >= ended + 3, held
    completions = f"{server.http}/v1/completions"
    stopped = httpx.post(completions, timeout=60, json={"model": model, "prompt": PROMPT, "max_tokens": 6,
                                                        "temperature": 0, "stop": [" "]}).json()
    assert stopped["choices"][0]["text"] == "", stopped  # " Paris" holds the stop string: nothing before it
    kept = httpx.post(completions, timeout=60, json={"model": model, "prompt": PROMPT, "max_tokens": 6,
                                                     "temperature": 0, "stop": [" "], "min_tokens": 2}).json()
    assert kept["choices"][0]["text"].startswith(" Paris") and kept["usage"]["completion_tokens"] >= 2, kept
    too_many = httpx.post(completions, timeout=60, json={"model": model, "prompt": PROMPT, "max_tokens": 2,
                                                         "min_tokens": 3})
    assert too_many.status_code == 400 and "min_tokens" in too_many.json()["error"]["message"], too_many.text


def test_http_connections_send_without_nagle_delays() -> None:
    """The HTTP socket serve hands to uvicorn makes asyncio set TCP_NODELAY on each connection: without it every
    small write after the first (a body after its headers, each SSE event) waited for the client's delayed ACK,
    ~40 ms per non-streamed response."""
    import socket

    from launch.cmd_serve import bind_http_socket

    async def scenario() -> int:
        sock = bind_http_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        async def accepted(reader, writer) -> None:
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            result = await asyncio.wait_for(seen, 10)
            writer.close()
        return result

    assert asyncio.run(scenario()) == 1


def test_the_first_streamed_response_imports_nothing():
    """serve imports the HTTP stack while its children load (`import_http_server`): a module that starlette or uvicorn
    would import at the first streamed response (anyio's asyncio backend, 30-50 ms on the CPU machine) would land in
    the first chat's TTFT. A fresh interpreter serves one streamed response and lists what that imported."""
    import subprocess
    import sys

    code = """
import http.client, sys, threading, time
from launch.cmd_serve import import_http_server
import_http_server()
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route
from tests.serve_process import free_port

async def chunks():
    yield b"data: 1\\n\\n"

app = Starlette(routes=[Route("/s", lambda request: StreamingResponse(chunks(), media_type="text/event-stream"))])
port = free_port()
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
thread = threading.Thread(target=server.run)
thread.start()
while not server.started:
    time.sleep(0.01)
"127.0.0.1".encode("idna")  # what the client's own connect imports (encodings.idna, stringprep, unicodedata)
before = set(sys.modules)
conn = http.client.HTTPConnection("127.0.0.1", port)
conn.request("GET", "/s")
assert conn.getresponse().read() == b"data: 1\\n\\n"
print(sorted(set(sys.modules) - before))
server.should_exit = True
thread.join()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_merged_choices_close_every_stream_on_a_failure_or_a_hang_up() -> None:
    """`n` > 1 streamed: a choice that fails mid-stream ends the response with the error event and [DONE], and every
    choice's stream is closed (its request cancelled), also when the client hangs up while a choice's next message is
    awaited (a generator suspended there could not be closed: "already running")."""
    from ipc.messages import Started, TokenChunk
    from launch.http_api import _merged, _sse_n
    from launch.openai_protocol import ChunkMaker

    closed: list[int] = []

    async def stream(i: int, fail_after: int | None, slow: bool):
        try:
            yield Started(f"r{i}", 0.0, 0.0)
            for k in range(4):
                if fail_after is not None and k == fail_after:
                    raise ServerError("executor_died", "the graph executor process died")
                await asyncio.sleep(0.05 if slow else 0.001)
                yield TokenChunk(f"r{i}", f"t{k}", [k])
            yield Finished(f"r{i}", "t0t1t2t3", [0, 1, 2, 3], "length", {"prompt_tokens": 3, "completion_tokens": 4})
        finally:
            closed.append(i)

    async def failing() -> str:
        streams = [stream(0, None, True), stream(1, 2, False)]
        body = _sse_n(_merged(streams), ChunkMaker("id", "m", chat=True, include_usage=True), 2, [None, None])
        return "".join([part async for part in body])

    out = asyncio.run(failing())
    assert '"code":"executor_died"' in out and out.endswith("data: [DONE]\n\n"), out
    assert sorted(closed) == [0, 1]

    async def hang_up() -> None:
        streams = [stream(0, None, True), stream(1, None, True)]
        body = _sse_n(_merged(streams), ChunkMaker("id", "m", chat=False, include_usage=False), 2, [None, None])
        await anext(body)  # a first chunk out, the next ones awaited: then the client is gone
        await body.aclose()

    closed.clear()
    asyncio.run(hang_up())
    assert sorted(closed) == [0, 1]


def test_the_responses_api_answers_as_the_chat_route(server, model) -> None:
    """OpenAI's Responses API through the openai SDK: `instructions` + `input` give the chat route's reply to a system
    and a user message (greedy), with usage; a reply cut by max_output_tokens is "incomplete"; streamed, the events
    come in OpenAI's order, their deltas make the text, and the SDK's stream helper gets the final response; a JSON
    schema in text.format holds the reply; what it cannot honour is a 400 naming the field."""
    api = openai_client(server)
    system, user = "Answer in one short sentence.", "What is the capital of France?"
    chat = api.chat.completions.create(model=model, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": user}])
    reply = api.responses.create(model=model, instructions=system, input=user, max_output_tokens=24, temperature=0)
    assert reply.output_text == chat.choices[0].message.content and reply.object == "response"
    assert reply.status == ("completed" if chat.choices[0].finish_reason == "stop" else "incomplete")
    assert reply.usage.input_tokens == chat.usage.prompt_tokens and reply.usage.output_tokens \
        == chat.usage.completion_tokens and reply.output[0].role == "assistant" and reply.id.startswith("resp_")
    cut = api.responses.create(model=model, input=[{"role": "user", "content": [{"type": "input_text", "text": user}]}],
                               max_output_tokens=2, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 2 and cut.output[0].status == "incomplete"
    # the last reply given back as input (an output item, its parts with their annotations and logprobs), as a
    # client keeping the conversation sends it: the same as the chat route's turn with that assistant message
    given = [item.model_dump() for item in reply.output]
    given[0]["content"][0]["logprobs"] = []
    follow = [{"role": "user", "content": user}, *given, {"role": "user", "content": "And of Italy?"}]
    again = api.responses.create(model=model, instructions=system, input=follow, max_output_tokens=8, temperature=0,
                                 metadata={"who": "Zoë"})
    turn = api.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": user},
        {"role": "assistant", "content": reply.output_text}, {"role": "user", "content": "And of Italy?"}])
    assert again.output_text == turn.choices[0].message.content and again.metadata == {"who": "Zoë"}
    # echoed back: a lone surrogate (valid JSON, not UTF-8) must not break the answer, streamed or not
    for stream in ("false", "true"):
        raw = httpx.post(f"{server.http}/v1/responses", timeout=60, headers={"content-type": "application/json"},
                         content=f'{{"model": "{model}", "input": "Hi", "max_output_tokens": 1, "stream": {stream}, '
                                 f'"user": "\\ud800"}}'.encode())
        assert raw.status_code == 200 and "\\ud800" in raw.text, raw.text
    kinds, deltas = [], []
    for event in api.responses.create(model=model, input=user, max_output_tokens=6, temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            final = event.response
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"] and set(kinds[4:-4]) == {"response.output_text.delta"}
    assert "".join(deltas) == final.output_text and final.status == "incomplete"
    with api.responses.stream(model=model, input=user, max_output_tokens=6, temperature=0) as stream:
        assert stream.get_final_response().output_text == final.output_text
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    held = api.responses.create(model=model, input=user, max_output_tokens=40, temperature=0, text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert set(json.loads(held.output_text)) == {"city"}
    # tools: "required" holds the reply to a call (the default model's template teaches no format for "auto"); the
    # call and its output given back make the next turn; a named function's call streams as its item's events
    tool = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
        "additionalProperties": False}}
    called = api.responses.create(model=model, input=user, tools=[tool], tool_choice="required", temperature=0,
                                  max_output_tokens=40)
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}
    answered = api.responses.create(model=model, tools=[tool], tool_choice="none", temperature=0, max_output_tokens=8,
                                    input=[{"role": "user", "content": user}, call.model_dump(), result])
    assert answered.output[0].type == "message" and answered.output_text
    with api.responses.stream(model=model, input=user, tools=[tool], temperature=0, max_output_tokens=40,
                              tool_choice={"type": "function", "name": "get_weather"}) as stream:
        kinds = [event.type for event in stream]
        assert stream.get_final_response().output[0].name == "get_weather"
    assert "response.function_call_arguments.done" in kinds and "response.output_text.delta" not in kinds
    for field, value in (("previous_response_id", "resp_1"), ("tools", [{"type": "web_search"}]),
                         ("max_output_tokens", 0), ("conversation", "conv_1"), ("text", {"format": "json"}),
                         ("input", [{"type": "reasoning", "id": "rs_1", "summary": []}])):
        with pytest.raises(openai.BadRequestError) as refused:
            api.responses.create(model=model, **{"input": user, field: value})
        assert refused.value.body["param"] == field, refused.value.body
