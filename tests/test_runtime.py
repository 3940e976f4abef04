"""The two-process runtime end to end: a real `hybridrt serve` (graph executor + JIT context) on the default
model, real sockets, the native client and hand-made frames. The session's plain server (conftest, shared with
test_http_api.py and test_fuzz.py) serves the whole module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from ipc.codec import decode, encode
from ipc.local_stream import LocalConnection
from ipc.messages import Error, Finished, GenerateRequest, Reset, TokenChunk
from launch.client import Client, ServerError
from tests.serve_process import ServeProcess

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
GREEDY_16 = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
CLI = [sys.executable, "-m", "launch.cli"]


@pytest.fixture(scope="module")
def server(shared_server) -> ServeProcess:
    return shared_server


@pytest.fixture(scope="module")
def reference(cpu_engine) -> list:
    """The single-process output (what `generate --in-process` runs) for each prompt: GenerationResults."""
    from jit_context.sampling_params import SamplingParams
    from launch.local import PromptInput

    engine = cpu_engine
    params = SamplingParams(**GREEDY_16)
    results = []
    for prompt in PROMPTS:
        ids = engine.prompt_ids(PromptInput(messages=[{"role": "user", "content": prompt}]))
        results.append(list(engine.generator.generate(ids, params))[-1])
    return results


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def run_request(address: str, **kwargs) -> tuple[list[TokenChunk], Finished]:
    with Client(address) as client:
        *chunks, final = client.generate(**kwargs)
    assert isinstance(final, Finished) and all(isinstance(c, TokenChunk) for c in chunks)
    return chunks, final


def assert_serves(server: ServeProcess) -> None:
    """The server still answers a request correctly."""
    _, final = run_request(server.address, prompt="Hi", params={"max_tokens": 2, "temperature": 0})
    assert final.finish_reason == "length" and len(final.token_ids) == 2


# -- correctness ----------------------------------------------------------------------------------------------


def test_serve_equals_in_process_output(server, reference) -> None:
    for prompt, ref in zip(PROMPTS, reference):
        chunks, final = run_request(server.address, messages=chat(prompt), params=GREEDY_16)
        assert final.token_ids == ref.token_ids, prompt
        assert final.text == ref.text
        assert "".join(c.text for c in chunks) == final.text
        assert [t for c in chunks for t in c.token_ids] == final.token_ids
        assert final.finish_reason == "length"
        assert final.usage["completion_tokens"] == 16 and final.usage["prompt_tokens"] == ref.prompt_tokens
        assert final.timings["ttft_ms"] > 0 and len(final.timings["token_times_ms"]) == 16
        known, sent = final.timings["token_times_ms"], final.timings["sent_times_ms"]
        assert len(sent) == 16 and all(k <= s for k, s in zip(known, sent)), (known, sent)  # sent after it was known
        assert sent == sorted(sent) and all(s <= k for s, k in zip(sent, known[1:]))  # and before the next token
    assert "Paris" in reference[0].text


def test_generate_cli_connect_matches_in_process(server) -> None:
    """`hybridrt generate --json --connect` to a running server gives the in-process answer, and that answer is
    right (the JSON of the user's view in full); the ephemeral pair of `generate` is test_cli.py's."""
    flags = ["--json", "--quiet", "--device", "cpu", "--max-tokens", "16", "--ignore-eos", PROMPTS[0]]
    expected = in_process_cli(["generate", "--in-process", "--speculative", "off", *flags])
    assert len(expected["token_ids"]) == 16 and expected["finish_reason"] == "length"  # past the answer's EOS
    assert "Paris" in expected["text"]
    out = subprocess.run([*CLI, "generate", "--connect", server.address, *flags], capture_output=True, text=True,
                         timeout=180, env=os.environ.copy(), check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == expected["token_ids"] and result["text"] == expected["text"]
    assert set(result) == {"text", "token_ids", "finish_reason", "prompt_tokens", "ttft_ms", "tokens_per_s",
                           "weight_format", "speculation"}
    assert expected["speculation"] is None  # plain decoding; the shared server speculates (n-gram)
    assert result["speculation"]["num_drafts"] >= 0 and 0 <= result["speculation"]["acceptance_rate"] <= 1
    assert result["weight_format"] == "float32"  # what the executor loaded, reported through its status
    assert result["finish_reason"] == "length" and result["prompt_tokens"] == expected["prompt_tokens"] > 10
    assert result["ttft_ms"] > 0 and result["tokens_per_s"] > 0


def in_process_cli(argv: list[str]) -> dict:
    """`hybridrt ARGV` run in this process (the modules are loaded already), its --json output parsed."""
    from launch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


# -- concurrency and cancellation -----------------------------------------------------------------------------


def test_tokenize_and_detokenize_answer_at_once_even_mid_generation(server, default_model_dir) -> None:
    from jit_context.tokenizer import Tokenizer

    tok = Tokenizer.from_path(default_model_dir)
    long = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0.0}  # minutes on the CPU
    with Client(server.address, timeout_s=10) as client:
        stream = client.generate(prompt="Tell me a long story.", params=long)
        assert isinstance(next(stream), TokenChunk)  # the executor is busy with it from here on
        start = time.monotonic()
        assert client.tokenize("Hello world, 日本") == tok.encode("Hello world, 日本")
        assert client.tokenize(messages=chat("Hi")) == tok.apply_chat_template(chat("Hi"))
        without = client.tokenize(messages=chat("Hi"), add_generation_prompt=False)
        assert without == tok.apply_chat_template(chat("Hi"), add_generation_prompt=False)
        assert len(without) < len(client.tokenize(messages=chat("Hi")))
        ids = tok.apply_chat_template(chat("Hi"))
        assert client.detokenize(ids) == tok.decode(ids, skip_special_tokens=False)
        assert time.monotonic() - start < 5.0  # not queued behind the 2000-token generation
        for bad, code in ((lambda: client.detokenize([10**6]), "invalid_request"),
                          (lambda: client.tokenize(messages=[{"role": "robot", "content": "x"}]), "invalid_request"),
                          (lambda: client.tokenize(), "invalid_request")):
            with pytest.raises(ServerError) as err:
                bad()
            assert err.value.code == code
        stream.close()  # cancels the generation


# -- bad input ------------------------------------------------------------------------------------------------


def test_bad_requests_and_frames_are_answered_and_server_keeps_serving(server) -> None:
    """Over TCP to the real process; every kind of bad request and frame is covered in test_jit_server.py."""
    for kwargs, message in (({"prompt": ""}, "the prompt is empty"),
                            ({"prompt": "hello " * 5000}, "maximum context"),
                            ({"token_ids": [1, 10**9]}, "vocabulary"),
                            ({"prompt": "Hi", "params": {"temprature": 0.5}}, "temprature")):
        with pytest.raises(ServerError) as err, Client(server.address, timeout_s=30) as client:
            list(client.generate(**kwargs))
        assert err.value.code == "invalid_request" and message in str(err.value), str(err.value)
    for frames, code in (([b"\xc1\x93\x01"], "malformed"),
                         ([encode(GenerateRequest("r", prompt="hi")), b"extra"], "malformed"),
                         ([msgpack.packb([99, {}])], "unknown_type"),
                         ([msgpack.packb([20, {"request_id": "r", "prompt": 7}])], "bad_fields"),
                         ([encode(Reset("from a client"))], "unexpected")):
        with raw_socket(server.address) as sock:
            sock.send_multipart(frames)
            reply = recv(sock)
        assert isinstance(reply, Error) and reply.code == code and reply.message, (frames, reply)
    assert_serves(server)


def test_oversized_frame_is_answered_and_server_keeps_serving(server) -> None:
    with raw_socket(server.address) as sock:  # over the 1 MiB frame limit: an `oversized` error reply
        sock.send(encode(GenerateRequest("big", prompt="x" * (2 << 20)), max_frame_bytes=4 << 20))
        reply = recv(sock)
        assert isinstance(reply, Error) and reply.code == "oversized", reply
    with raw_socket(server.address) as sock:  # beyond 16 MiB zmq drops it (and the sender) before Python
        sock.send(encode(GenerateRequest("big", prompt="x")) + b"\x00" * (17 << 20))
        assert not sock.poll(500)
    assert_serves(server)


# -- the local stream (clients on this machine: ipc/local_stream.py) --------------------------------------------


def test_native_client_streams_over_the_local_stream_with_zeromq_s_tokens(server) -> None:
    """A Client finds the server's local stream through its status (a socket in the launch's private runtime dir)
    and streams over it; a Client told local=False gets the same tokens and text over ZeroMQ."""
    kwargs = {"messages": chat(PROMPTS[1]), "params": GREEDY_16}
    with Client(server.address) as local, Client(server.address, local=False) as plain:
        before = time.perf_counter()
        *chunks, final = local.generate(**kwargs)
        assert before < final.timings["received_at_s"] < time.perf_counter()  # one clock for both processes
        # the way in splits where the JIT context's wait for clients returned with the request
        assert before < final.timings["polled_at_s"] <= final.timings["received_at_s"]
        path = local.local_path
        assert path is not None and stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(Path(path).parent).st_mode) == 0o700  # only this user reaches it
        assert plain.status()["local_stream"] == path
        *plain_chunks, plain_final = plain.generate(**kwargs)
        assert plain.local_path is None
    assert final.token_ids == plain_final.token_ids and final.text == plain_final.text
    assert [c.token_ids for c in chunks] == [c.token_ids for c in plain_chunks]


def test_bad_and_oversized_frames_on_the_local_stream_are_answered(server) -> None:
    """Hand-made frames on the local stream get the ROUTER's answers; a frame beyond 16x the limit closes that
    connection (the stream cannot be resynchronised) and the server keeps serving."""
    with Client(server.address) as client:
        path = client.status()["local_stream"]
    for data, code in ((b"\xc1\x93\x01", "malformed"), (msgpack.packb([99, {}]), "unknown_type"),
                       (encode(Reset("from a client")), "unexpected"),
                       (encode(GenerateRequest("big", prompt="x" * (2 << 20)), max_frame_bytes=4 << 20), "oversized")):
        with LocalConnection(path, 1 << 20) as conn:
            conn.send(data, timeout_ms=5000)
            reply = decode(conn.wait_frame(30_000))
        assert isinstance(reply, Error) and reply.code == code, (data[:20], reply)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # a bare connection: bytes exactly as given
        raw.settimeout(30)
        raw.connect(path)
        raw.sendall(struct.pack("<I", 17 << 20) + b"\x00" * 64)  # a header announcing 17 MiB
        assert raw.recv(1) == b""  # closed by the server
    assert_serves(server)


# -- processes ------------------------------------------------------------------------------------------------


def test_children_are_named_in_ps(server) -> None:
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in server.children()]
    modules = {args[args.index(b"-m") + 1].decode() for args in cmdlines if b"-m" in args}
    assert {"graph_executor", "jit_context"} <= modules and len(modules) == len(cmdlines), cmdlines


# -- helpers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def raw_socket(address: str):
    """A bare DEALER, as any program could open one: frames go out exactly as given."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def recv(sock: zmq.Socket, timeout_s: float = 30.0):
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return decode(sock.recv())


def test_one_client_interleaved_and_threaded_requests(server) -> None:
    """Two generators of one Client advanced in turn on one thread, and the same Client from two threads:
    every request gets exactly its own reply stream."""
    params = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    prompts = [[1, 2, 3, 4], [50, 60, 70]]
    with Client(server.address) as client:
        alone = [list(client.generate(token_ids=p, params=params))[-1].token_ids for p in prompts]
        a, b = (client.generate(token_ids=p, params=params) for p in prompts)
        got: dict[int, list] = {0: [], 1: []}
        for pair in zip(a, b):  # interleaved on one thread
            for i, msg in enumerate(pair):
                got[i].append(msg)
        assert [got[i][-1].token_ids for i in (0, 1)] == alone
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            results[i] = list(client.generate(token_ids=prompts[i], params=params))[-1].token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [results[0], results[1]] == alone
