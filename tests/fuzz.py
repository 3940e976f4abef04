"""Seeded generators of hostile inputs for a running `hybridrt serve`, and a driver that sends them in batches
and checks after each batch that the server is still whole (both children alive, a normal request gives the
same answer as before). tests/test_fuzz.py runs a CI-sized sample; the full run of the issue's targets is

    python -m tests.fuzz --frames 10000 --http 5000 [--seed 0]     (starts its own CPU server)

Every case is reproducible from (seed, index): a failure names both and shows the case.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import msgpack
import zmq

from jit_context.sampling_params import SamplingParams

TAGS = (1, 2, 4, 5, 6, 7, 10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29)  # every message kind, client or not
NASTY_VALUES: tuple = (None, True, False, 0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -1e308, math.inf,
                       -math.inf, math.nan, 1e-320, -0.0, "", "x", "\U0001f600", "\x00", "é" * 1000, b"", b"\xff",
                       [], [1], {}, {"a": 1}, [[[[[]]]]], "a" * 200_000, list(range(5000)))
ROLES = ("user", "assistant", "system", "tool", "robot", "", None, 5)
PARAM_NAMES = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "logit_bias", "seed", "stop", "stop_token_ids", "ignore_eos", "structured",
               "prompt_logprobs", "logprobs", "bogus")
# Structured outputs that compile (short matches: a valid request stays cheap) and ones that must be refused.
STRUCTURED = ({"json_object": True}, {"regex": "[a-z]{1,3}"}, {"choice": ["a", "b"]}, {"grammar": "start: /[0-9]+/"},
              {"json": {"type": "object", "properties": {"x": {"type": "integer"}}}}, {"grammar": 'root ::= "a"'},
              {"regex": "(unclosed"}, {"grammar": "start: <|nope|>"}, {"json": {"type": "bogus"}}, {"json": True},
              {"json": "[" * 3000}, {"choice": []}, {"regex": "a", "choice": ["b"]},
              {"grammar": "start: s\ns: s s | \"a\""})
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                     "properties": {"a": {"type": "integer"}}}}}
SAFE_MAX_TOKENS = 2  # a fuzzed request that happens to be valid generates at most this many tokens


@dataclass
class Case:
    index: int
    kind: str
    frames: list[bytes] = field(default_factory=list)  # native: the frames of one message
    vanish: bool = False  # native: the client closes right after sending
    method: str = "POST"  # http
    path: str = ""
    body: bytes = b""
    headers: dict = field(default_factory=dict)

    def show(self) -> str:
        if self.kind.startswith("http"):
            return f"{self.method} {self.path} headers={self.headers} body={self.body[:300]!r}"
        return f"frames={[f[:300] for f in self.frames]!r} vanish={self.vanish}"


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _value(rng: random.Random):
    return rng.choice(NASTY_VALUES)


def _params(rng: random.Random) -> dict:
    params = {name: _value(rng) for name in rng.sample(PARAM_NAMES, rng.randrange(0, 4))}
    if "structured" in params and rng.random() < 0.7:
        params["structured"] = rng.choice(STRUCTURED)
    if rng.random() < 0.5:  # plausible values, sometimes just out of range
        params["temperature"] = rng.choice([0, 0.7, 1e-6, 1e6, 1e308, -1.0, 2.0])
        params["repetition_penalty"] = rng.choice([1.0, 1.3, 0.0, 1e308, 1e-300])
    return params


def _messages(rng: random.Random) -> object:
    if rng.random() < 0.2:
        return _value(rng)
    return [{"role": rng.choice(ROLES), "content": rng.choice(["hi", "", _value(rng), [{"type": "text"}]])}
            for _ in range(rng.randrange(0, 3))]


def _safe(fields: dict) -> dict:
    """Cap a request that the server would accept: valid ones generate at most SAFE_MAX_TOKENS tokens."""
    params = fields.get("params")
    if isinstance(params, dict):
        try:
            SamplingParams.from_dict(params)
        except (ValueError, TypeError):
            return fields
        fields["params"] = {**params, "max_tokens": _capped(params.get("max_tokens"))}
    return fields


def _capped(max_tokens) -> int:
    valid = isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1
    return min(max_tokens, SAFE_MAX_TOKENS) if valid else SAFE_MAX_TOKENS


def _request_fields(rng: random.Random, tag: int) -> dict:
    rid = rng.choice([uuid.uuid4().hex, "", "x" * 300, 5, None])
    if tag == 20:
        fields = {"request_id": rid, "params": _params(rng)}
        which = rng.choice(["prompt", "messages", "token_ids", "two", "none"])
        if which in ("prompt", "two"):
            fields["prompt"] = rng.choice(["Hi", "", "\U0001f600" * 50, "x" * 300_000, _value(rng)])
        if which in ("messages", "two"):
            fields["messages"] = _messages(rng)
        if which == "token_ids":
            # (5000 ids: over the context; a valid long prompt would take seconds to prefill on a CPU)
            fields["token_ids"] = rng.choice([[1, 2, 3], [-1], [10**6], [2**64 - 1], list(range(5000)), "ids", []])
        return _safe(fields)
    if tag == 24:
        return {"request_id": rid, rng.choice(["prompt", "messages"]): rng.choice(
            ["Hello", "日本" * 120_000, _messages(rng), _value(rng)])}
    if tag == 26:
        return {"request_id": rid, "token_ids": rng.choice([[1, 2], list(range(60_000)), [10**9], [-5], "x"])}
    if tag == 23:
        return {"request_id": rid}
    return {name: _value(rng) for name in rng.sample(("request_id", "facts", "step", "code", "message", "pid",
                                                      "protocol_version", "role", "text"), rng.randrange(0, 4))}


def native_case(rng: random.Random, index: int) -> Case:
    kind = rng.choice(["bytes", "truncated", "flipped", "fields", "fields", "fields", "multiframe", "utf8"])
    tag = rng.choice(TAGS + (20, 20, 24, 26, 999, -1))
    frame = _pack([tag, _request_fields(rng, tag)])
    if kind == "bytes":
        frames = [rng.randbytes(rng.randrange(0, 200))]
    elif kind == "truncated":
        frames = [frame[: rng.randrange(0, max(1, len(frame)))]]
    elif kind == "flipped":
        data = bytearray(frame)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        frames = [bytes(data)]
    elif kind == "multiframe":
        frames = [frame, frame][: rng.randrange(2, 3)] + [b"extra"]
    elif kind == "utf8":  # a str whose bytes are not UTF-8 (an encoded lone surrogate)
        frames = [frame.replace(b"Hi", b"\xed\xa0") if b"Hi" in frame else b"\x92\x14\x81\xa1a\xa2\xed\xa0"]
    else:
        frames = [frame]
    return Case(index, f"native-{kind}", frames=frames, vanish=rng.random() < 0.2)


HTTP_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize", "/v1/models",
              "/health", "/metrics", "/version", "/v1/nothing", "/v1/completions/", "//v1/completions")


def _json_value(rng: random.Random):
    return rng.choice([None, True, 0, -1, 2**70, 1e308, "", "x" * 100_000, "\ud800", [], {}, [1, "a"],
                       {"nested": [{"deep": [None]}]}, 10**400])


def _http_body(rng: random.Random, path: str) -> dict:
    body: dict = {"model": rng.choice([None, "smollm2-135m-instruct", "other", "\ud800", 5])}
    if "chat" in path:
        body["messages"] = rng.choice([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "\ud800"}],
                                       [{"role": "robot", "content": 5}], [], "Hi", _json_value(rng),
                                       [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None,
                                        "tool_calls": [{"id": "c", "type": "function", "function": {
                                            "name": "f", "arguments": rng.choice(["{}", "{", "[" * 3000])}}]},
                                        {"role": "tool", "tool_call_id": rng.choice(["c", None]), "content": "1"}]])
    elif "completions" in path:
        body["prompt"] = rng.choice(["Hi", "", ["Hi"], [1, 2, 3], [-1], "\ud800", [[1, 2, 3]], [[1], [2]], [[]],
                                     _json_value(rng)])
    elif "responses" in path:
        body["input"] = rng.choice(["Hi", "", [{"role": "user", "content": "Hi"}], [{"role": "tool", "content": "x"}],
                                    [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                                    [{"role": "user", "content": [{"type": "input_image"}]}], _json_value(rng)])
        for name in rng.sample(("instructions", "max_output_tokens", "text", "previous_response_id", "tools",
                                "store", "reasoning", "truncation", "stream"), rng.randrange(0, 3)):
            body[name] = _json_value(rng) if rng.random() < 0.5 else {
                "max_output_tokens": rng.choice([0, 1, 2]), "text": rng.choice(
                    [{"format": {"type": "json_object"}}, {"format": {"type": "xml"}}, {"format": None}]),
                "truncation": rng.choice(["auto", "disabled"]), "stream": True}.get(name, _json_value(rng))
        if not isinstance(body.get("max_output_tokens"), int) or body["max_output_tokens"] > 2:
            body["max_output_tokens"] = 2  # (a valid request stays cheap)
    elif "detokenize" in path:
        body["tokens"] = rng.choice([[1, 2], [10**9], [-1], list(range(250_000)), _json_value(rng)])
    elif "tokenize" in path:
        body["prompt"] = rng.choice(["Hello", "日本" * 120_000, "\ud800", _json_value(rng)])
    for name in rng.sample(("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                            "stop", "stream", "n", "logprobs", "stream_options", "presence_penalty",
                            "frequency_penalty", "logit_bias", "bogus", "response_format", "structured_outputs",
                            "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools", "tool_choice",
                            "parallel_tool_calls", "echo", "prompt_logprobs"), rng.randrange(0, 4)):
        body[name] = _json_value(rng) if rng.random() < 0.7 else rng.choice([1e308, -1, 0.5, 2])
        if rng.random() < 0.6:  # plausible values of the structured output and tool fields
            body[name] = {
                "response_format": rng.choice([{"type": "json_object"}, {"type": "text"}, {"type": "xml"},
                                               {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
                                               {"type": "json_schema"}]),
                "structured_outputs": rng.choice(STRUCTURED), "guided_json": rng.choice([{}, "{", {"type": 5}]),
                "guided_regex": rng.choice(["[0-9]", "(", ""]), "guided_choice": rng.choice([["a"], [], [""]]),
                "guided_grammar": rng.choice(["start: /a/", "x ::= y", ""]),
                "tools": rng.choice([[TOOL], [TOOL, TOOL], [{"type": "function"}], []]),
                "tool_choice": rng.choice(["auto", "none", "required", {"type": "function", "function": {"name": "f"}},
                                           {"type": "function", "function": {"name": "g"}}]),
            }.get(name, body[name])
    body["max_tokens"] = rng.choice([1, 2, body.get("max_tokens", 1)])
    if isinstance(body["max_tokens"], int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 2:
        body["max_tokens"] = 2
    return body


def http_case(rng: random.Random, index: int) -> Case:
    path = rng.choice(HTTP_PATHS)
    kind = rng.choice(["json", "json", "json", "raw", "method", "header"])
    headers = {"content-type": "application/json"}
    if kind == "raw":
        body = rng.choice([rng.randbytes(rng.randrange(0, 100)), b"{", b'{"prompt": "\\ud800', b"[]", b"null",
                           b'{"prompt": 1e999}', b"\xff\xfe"])
    else:
        body = json.dumps(_http_body(rng, path)).encode()
    if kind == "header":
        headers["authorization"] = rng.choice(["", "Bearer", "bearer x", "Basic eA==", "Bearer \x7f"])
        headers["content-type"] = rng.choice(["text/plain", "application/json; charset=latin-1", ""])
    method = rng.choice(["GET", "PUT", "DELETE", "PATCH"]) if kind == "method" else "POST"
    if path in ("/v1/models", "/health", "/metrics", "/version") and kind != "method":
        method = "GET"
    return Case(index, f"http-{kind}", method=method, path=path, body=body, headers=headers)


class Fuzzer:
    """Sends cases to one server in batches; after each batch checks `healthy()`; collects failures."""

    def __init__(self, address: str, http_base: str | None, healthy: Callable[[], str | None], seed: int) -> None:
        self.address, self.http_base, self.healthy, self.seed = address, http_base, healthy, seed
        self.ctx = zmq.Context()
        self.failures: list[str] = []
        self.sent = {"native": 0, "http": 0}

    def native(self, count: int, batch: int = 100) -> None:
        rng = random.Random(self.seed)
        for start in range(0, count, batch):
            cases = [native_case(rng, i) for i in range(start, min(count, start + batch))]
            self._send_native(cases)
            self._check(cases)

    def http(self, count: int, batch: int = 50) -> None:
        rng = random.Random(self.seed + 1)
        with httpx.Client(base_url=self.http_base, timeout=30.0) as client:
            for start in range(0, count, batch):
                cases = [http_case(rng, i) for i in range(start, min(count, start + batch))]
                for case in cases:
                    try:
                        reply = client.request(case.method, case.path, content=case.body, headers=case.headers)
                    except httpx.HTTPError as e:
                        self.failures.append(f"seed {self.seed} {case.kind} #{case.index}: {e!r}: {case.show()}")
                        continue
                    self.sent["http"] += 1
                    if reply.status_code >= 500:
                        self.failures.append(f"seed {self.seed} {case.kind} #{case.index}: HTTP {reply.status_code}"
                                             f" {reply.text[:300]!r}: {case.show()}")
                self._check(cases)

    def _send_native(self, cases: list[Case]) -> None:
        sockets = []
        for case in cases:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0 if case.vanish else 1000)
            sock.connect(self.address)
            sock.send_multipart(case.frames)
            self.sent["native"] += 1
            if case.vanish:
                sock.close()
            else:
                sockets.append(sock)
        # Replies to the batch: errors come at once, short generations soon; some frames get none (a cancel of an
        # unknown request), and what is left unread exercises clients that go away before their answer.
        deadline = time.monotonic() + 1.0
        for sock in sockets:
            while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                sock.recv_multipart()
            sock.close()

    def _check(self, cases: list[Case]) -> None:
        problem = self.healthy()
        if problem is not None:
            shown = "\n  ".join(c.show()[:400] for c in cases[-5:])
            raise AssertionError(f"seed {self.seed}, cases {cases[0].index}..{cases[-1].index} ({cases[0].kind}..): "
                                 f"{problem}; last cases:\n  {shown}")

    def close(self) -> None:
        self.ctx.term()


def runtime_pids(address: str) -> tuple[int, int]:
    """(graph executor, JIT context) pids, as the server reports them."""
    from launch.client import Client

    with Client(address, timeout_s=30) as client:
        facts = client.status()
    return facts["executor"]["executor_pid"], facts["jit_context_pid"]


def dead_process(serve, pids: tuple[int, int]) -> str | None:
    """None while `hybridrt serve` and both of its runtime children live; else which one is gone."""
    import os

    if serve.poll() is not None:
        return f"serve exited with {serve.returncode}"
    for name, pid in zip(("graph executor", "JIT context"), pids):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"the {name} (pid {pid}) exited"
    return None


def reference_request(address: str) -> list[int]:
    """A normal request (greedy, 4 tokens); its ids must not change while the server is fuzzed."""
    from launch.client import Client

    with Client(address, timeout_s=60) as client:
        *_, final = client.generate(prompt="The capital of France is",
                                    params={"max_tokens": 4, "temperature": 0, "ignore_eos": True})
    return final.token_ids


def fuzz_server(server, frames: int, http: int, seed: int) -> tuple[Fuzzer, bool]:
    """Send `frames` native and `http` HTTP cases to a running ServeProcess, checking after every batch that it
    is whole (AssertionError naming the seed and the cases otherwise). Returns the fuzzer (its `sent` and
    `failures`) and whether serve and both runtime children are alive at the end."""
    expected = reference_request(server.address)
    pids = runtime_pids(server.address)

    def healthy() -> str | None:
        if (dead := dead_process(server.proc, pids)) is not None:
            return dead
        got = reference_request(server.address)
        return None if got == expected else f"the reference request changed: {got} != {expected}"

    fuzzer = Fuzzer(server.address, server.http, healthy, seed)
    try:
        fuzzer.native(frames)
        fuzzer.http(http)
    finally:
        fuzzer.close()
    return fuzzer, dead_process(server.proc, pids) is None


def main(argv: list[str] | None = None) -> int:
    from tests.serve_process import ServeProcess

    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10_000, help="fuzzed native frames")
    p.add_argument("--http", type=int, default=5_000, help="fuzzed HTTP requests")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.monotonic()
    with ServeProcess() as server:
        fuzzer, alive = fuzz_server(server, args.frames, args.http, args.seed)
    print(json.dumps({"seed": args.seed, "sent": fuzzer.sent, "failures": len(fuzzer.failures),
                      "server_alive": alive, "seconds": round(time.monotonic() - start, 1)}))
    for failure in fuzzer.failures[:20]:
        print(failure, file=sys.stderr)
    return 0 if alive and not fuzzer.failures else 1


if __name__ == "__main__":
    sys.exit(main())
