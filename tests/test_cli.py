"""`hybridrt generate` as a user runs it: a real process, real default model, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "launch.cli"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def test_generate_ephemeral_pair_streams_the_in_process_text(default_model_dir, tmp_path, capsys) -> None:
    """`hybridrt generate` with its own ephemeral pair of processes, as a user runs it (text streamed to stdout,
    the load reported on stderr), with sampling flags and a --chat-template: it prints the text that the
    in-process engine (run in this process, through `launch.cli.main`) gives for the same seed and flags, and
    that engine's prompt is the given template's, so the template reached the JIT context as well (another prompt
    would not sample the same text)."""
    from jit_context.tokenizer import Tokenizer
    from launch.cli import main

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]")
    expected_prompt = len(Tokenizer.from_path(default_model_dir).encode("[user] What is 2+2?\n[assistant]"))
    flags = ["--device", "cpu", "--max-tokens", "12", "--ignore-eos", "--temperature", "0.7", "--top-p", "0.9",
             "--top-k", "40", "--seed", "1", "--presence-penalty", "0.5", "--frequency-penalty", "0.3",
             "--logit-bias", "30=1.5", "--chat-template", str(template), "What is 2+2?"]
    assert main(["generate", "--in-process", "--json", "--quiet", *flags]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert expected["prompt_tokens"] == expected_prompt and len(expected["token_ids"]) == 12
    out = run_cli("generate", *flags)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected["text"] + "\n"
    for phase in ("graph_executor: imports ", "graph_executor: weights ", "graph_executor: allocation (weights and "
                  "KV cache) ", "jit_context: waiting for the executor (handshake) ", "jit_context: tokenizer and "
                  "sampler "):
        assert phase in out.stderr, out.stderr  # one line per start-up phase, with its time
    # the ephemeral server's ready line is serve's: what runs, where, in which formats
    assert re.search(r"hybridrt serving smollm2-135m-instruct on cpu \(ready in [0-9.]+ s\): dtype float32, weights "
                     r"float32, context \d+ tokens, KV cache [0-9.]+ MiB, one request at a time", out.stderr), out.stderr


def test_logit_bias_and_logprobs_flags_reach_the_sampler(default_model_dir, capsys) -> None:
    """--logit-bias forces a token; --logprobs N puts each token's entry in the --json object, --prompt-logprobs N
    each prompt token's, the same in process and through the ephemeral pair of processes."""
    from launch.cli import main

    flags = ["generate", "--in-process", "--json", "--quiet", "--device", "cpu", "--max-tokens", "3", "hi"]
    assert main([*flags[:-1], "--logit-bias", "30=100", "--logit-bias", "31=-2", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [30] * 3
    assert main([*flags[:-1], "--logprobs", "2", "--prompt-logprobs", "1", "--ignore-eos", "hi"]) == 0
    alone = json.loads(capsys.readouterr().out)
    entries = alone["logprobs"]
    assert [e["token"] for e in entries] == alone["token_ids"] and all(len(e["top_ids"]) == 2 for e in entries)
    assert "".join(e["text"] for e in entries) == alone["text"] and all(e["logprob"] <= 0 for e in entries)
    prompt = alone["prompt_logprobs"]  # (the chat template's tokens: None for the first, one entry per later one)
    assert prompt[0] is None and len(prompt) == alone["prompt_tokens"]
    assert all(len(e["top_ids"]) == 1 for e in prompt[1:])
    pair = run_cli("generate", "--json", "--quiet", "--device", "cpu", "--max-tokens", "3", "--logprobs", "2",
                   "--prompt-logprobs", "1", "--ignore-eos", "hi")
    served = json.loads(pair.stdout)
    assert [e["top_ids"] for e in served["logprobs"]] == [e["top_ids"] for e in entries]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(served["logprobs"], entries, strict=True))
    assert served["prompt_logprobs"][0] is None and [e["token"] for e in served["prompt_logprobs"][1:]] \
        == [e["token"] for e in prompt[1:]]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(served["prompt_logprobs"][1:], prompt[1:]))
    assert main([*flags[:2], "--logprobs", "2", *flags[3:]]) == 1  # without --json
    assert "--logprobs prints them in the --json object" in capsys.readouterr().err
    assert main([*flags[:2], "--prompt-logprobs", "2", *flags[3:]]) == 1
    assert "--prompt-logprobs prints them in the --json object" in capsys.readouterr().err


def test_structured_output_flags_hold_the_reply_and_bad_ones_fail_before_the_load(default_model_dir, tmp_path,
                                                                                    capsys) -> None:
    """--json-schema (a file; inline text longer than a file name parses too) and --grammar (GBNF text) in process:
    each reply a whole match; a bad regex, a schema file that is not there and two forms at once are one-line errors
    before anything loads."""
    from launch.cli import build_parser, main
    from launch.options import sampling_params

    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "additionalProperties": False, "required": ["city"],
                                  "properties": {"city": {"type": "string", "maxLength": 20}}}))
    flags = ["generate", "--in-process", "--json", "--quiet", "--device", "cpu", "--max-tokens", "30"]
    question = "What is the capital of France? Answer in JSON."
    assert main([*flags, "--json-schema", str(schema), question]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["finish_reason"] == "stop" and set(json.loads(reply["text"])) == {"city"}, reply["text"]
    inline = json.dumps({"type": "object", "description": "x" * 300, "required": ["city"],
                         "properties": {"city": {"type": "string", "maxLength": 20}}})  # longer than a file name
    args = build_parser(["generate"]).parse_args(["generate", "--json-schema", inline, "x"])
    assert sampling_params(args).structured.json == inline  # (parsed as the text, not a file name: no OSError)
    assert main([*flags, "--grammar", 'root ::= [0-9] [0-9]? " km"', "How far is Paris from Versailles?"]) == 0
    assert re.fullmatch(r"[0-9][0-9]? km", json.loads(capsys.readouterr().out)["text"])
    for bad, message in ((["--regex", "(unclosed"], "unclosed group"),
                         (["--json-schema", str(tmp_path / "none.json")], "neither a file nor the text")):
        assert main([*flags, *bad, "hi"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "loading" not in err, err
    with pytest.raises(SystemExit):
        main([*flags, "--regex", "a", "--json-object", "hi"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_generate_in_process_reports_load(default_model_dir) -> None:
    out = run_cli("generate", "--in-process", "--device", "cpu", "--max-tokens", "4", "Say hello.")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "loaded smollm2-135m-instruct [safetensors, cpu, float32]" in out.stderr


def test_help_explains_every_flag(capsys) -> None:
    from launch.cli import main

    with pytest.raises(SystemExit) as done:
        main(["generate", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--device", "--dtype", "--max-tokens", "--temperature", "--top-p", "--top-k",
                 "--seed", "--json", "--load-format", "--max-context", "--tokenizer", "--stop", "--chat-template"):
        assert flag in out


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir"], "model path '/no/such/dir' does not exist"),
    (["--model", "dummy:gpt-5"], "unknown dummy model 'gpt-5'"),
    (["--dtype", "float8", "--device", "cpu"], "dtype 'float8' is not supported on cpu"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--in-process", "--model", "dummy:smollm2-135m", "--device", "cpu", "--max-context", "64"],
     "has no tokenizer; pass --tokenizer PATH"),
    # 3.9 TiB of KV cache fits no machine: refused before any process starts or anything is allocated.
    (["--model", "dummy:llama-2-7b", "--device", "cpu", "--max-context", "4000000"], "does not fit on cpu"),
    (["--in-process", "--model", "dummy:llama-2-7b", "--device", "cpu", "--max-context", "4000000"],
     "does not fit on cpu"),
    (["--chat-template", "hello"], "--chat-template: 'hello' is neither a file nor a Jinja template"),
    (["--logit-bias", "30"], "--logit-bias takes ID=BIAS (e.g. 2=-100), got '30'"),
    (["--logit-bias", "a=1"], "--logit-bias takes ID=BIAS"),
    (["--presence-penalty", "3"], "presence_penalty must be in [-2, 2] (0 = off), got 3"),
    (["--in-process", "--device", "cpu", "--logit-bias", "49152=1"], "logit_bias token ids must be in [0, 49152)"),
    (["--chat-template", "{% for %}"], "--chat-template: the template does not compile"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str, hybridrt_cache, capsys) -> None:
    """In-process (`launch.cli.main`, what the console script calls): every case fails in one line before any
    model is allocated (in the launcher, or in the executor's checks, reported by the supervisor); one case below
    goes through a real process."""
    from launch.cli import main

    assert main(["generate", "--quiet", *args, "hello"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_context_above_the_trained_length_warns_through_the_cli(default_model_dir, capsys) -> None:
    """`--max-context` above the positions the model was trained for (the default model: 8192) is one warning line
    on stderr, and the answer comes anyway; `--quiet` drops it with the other load messages."""
    from launch.cli import main

    args = ["generate", "--in-process", "--device", "cpu", "--max-context", "9000", "--max-tokens", "1", "hello"]
    assert main(args) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "--max-context 9000 is above the 8192 positions" in warnings[0], warnings
    assert main([args[0], "--quiet", *args[1:]]) == 0
    assert "warning" not in capsys.readouterr().err


def test_bad_input_in_a_real_process_is_one_line_and_exit_1(hybridrt_cache) -> None:
    out = run_cli("generate", "--quiet", "--model", "/no/such/dir", "hello")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model path '/no/such/dir' does not exist"), out.stderr


def test_unsupported_architecture_via_cli(tmp_path, capsys) -> None:
    from launch.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert main(["generate", "--quiet", "--model", str(tmp_path), "hi"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: unsupported architecture 'GPT2LMHeadModel' (hybridrt runs "
        "['LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM'])")


def test_serve_with_a_taken_http_port_fails_at_once() -> None:
    """Checked before the children start (before the model loads): one line, exit 1, nothing left behind."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--device", "cpu", "--port", "0", "--http-port", str(port), timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == f"error: cannot bind http://127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("flag", ["--port", "--http-port"])
@pytest.mark.parametrize("value", ["99999", "70000", "-1", "http"])
def test_serve_ports_are_range_checked_by_the_parser(flag: str, value: str, capsys) -> None:
    from launch.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", flag, value])
    assert done.value.code == 2
    assert f"argument {flag}: must be a port number in 0..65535" in capsys.readouterr().err


def test_serve_with_a_taken_native_port_fails_at_once() -> None:
    """Like the HTTP port: checked before the children start, one line, exit 1 (it took a banner and three lines,
    5.8 s later, when only the JIT context found out)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--device", "cpu", "--port", str(port), "--http-port", "0", timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == f"error: cannot bind the native port tcp://127.0.0.1:{port}: Address already in use"


def test_version_and_did_you_mean(capsys, monkeypatch, tmp_path) -> None:
    from launch.cli import main, version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hybridrt {version()}"
    with pytest.raises(SystemExit) as done:
        main(["generate", "--temprature", "0.5", "--max-tokns=4", "hi"])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert "--temprature -> --temperature" in err and "--max-tokns -> --max-tokens" in err, err
    # the subcommand reports its own unknown flags and suggests only its own: serve's --http-port is not generate's
    # (the top parser used to answer "--http-port -> --http-port")
    with pytest.raises(SystemExit):
        main(["generate", "--http-port", "hi"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "hybridrt generate: error: unrecognized arguments: --http-port", err
    with pytest.raises(SystemExit):
        main(["serve", "--prot", "1"])
    assert capsys.readouterr().err.strip().endswith("hybridrt serve: error: unrecognized arguments: --prot 1 (did "
                                                    "you mean: --prot -> --port?)")
    # llama-cli's habit: the prompt as a flag
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi"])
    assert capsys.readouterr().err.strip().endswith(
        "(PROMPT is positional, without a flag: hybridrt generate [options] PROMPT)")
    with pytest.raises(SystemExit):
        main(["cache", "ls", "--bogus"])
    assert "hybridrt cache ls: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    # a prefix of a flag is not that flag (argparse's default took `cache rm --al` for --all and emptied the cache)
    monkeypatch.setenv("HYBRIDRT_CACHE_DIR", str(tmp_path))  # a cache of its own, should it be taken as --all
    with pytest.raises(SystemExit) as done:
        main(["cache", "rm", "--al"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().endswith("hybridrt cache rm: error: unrecognized arguments: --al (did you "
                                                    "mean: --al -> --all?)")


def test_generate_into_a_closed_pipe_exits_quietly(default_model_dir) -> None:
    """`hybridrt generate ... | head -c 1`: the reader leaves early; no BrokenPipe traceback, exit 0."""
    proc = subprocess.Popen([*CLI, "generate", "--in-process", "--quiet", "--device", "cpu", "--max-tokens", "48",
                             "--ignore-eos", "Count from one to fifty"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout.read(1)  # the first streamed byte: generation is under way
    proc.stdout.close()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_model_and_connect_errors_point_the_right_way(default_model_dir, capsys) -> None:
    """A Hub id says there is no download and what to pass; `--connect host:port` shows the tcp:// form."""
    from launch.cli import main

    assert main(["generate", "--quiet", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'HuggingFaceTB/SmolLM2-135M-Instruct' looks like a Hugging Face Hub id")
    assert "--local-dir DIR" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as done:
        main(["generate", "--connect", "127.0.0.1:7461", "hi"])
    assert done.value.code == 2
    assert "(for a TCP port: tcp://127.0.0.1:7461)" in capsys.readouterr().err
    # nothing listening at a well-formed address: the status wait's error says what to check
    from launch.client import Client, ServerError

    with Client("tcp://127.0.0.1:9") as client, pytest.raises(ServerError) as info:
        client.status(timeout_s=0.2)
    assert str(info.value) == ("no status answer from tcp://127.0.0.1:9 within 0.2 s (is `hybridrt serve` running "
                               "there?)")


def test_model_naming_a_file_of_a_model_folder_loads_the_folder(default_model_dir, capsys) -> None:
    from launch.cli import main

    assert main(["generate", "--in-process", "--quiet", "--device", "cpu", "--max-tokens", "2", "--model",
                 str(default_model_dir / "config.json"), "hi"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("case", ["truncated weights", "no tokenizer"])
def test_failures_inside_the_children_are_one_line(case: str, default_model_dir, tmp_path) -> None:
    """Through the two processes (`generate` starts its own pair): the supervisor reports the failing child's own
    one-line error, once: the executor's (a truncated model.safetensors: a traceback before) or the JIT context's
    (a tokenizer path that does not exist: three lines before)."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, folder / name)
    if case == "truncated weights":
        (folder / "model.safetensors").write_bytes((default_model_dir / "model.safetensors").read_bytes()[:100_000])
        flags, message = ["--model", str(folder)], f"cannot read {folder / 'model.safetensors'}: "
    else:
        flags, message = ["--tokenizer", str(tmp_path / "nope")], "tokenizer path does not exist"
    result = run_cli("generate", "--quiet", "--device", "cpu", *flags, "hi", timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_a_model_folder_without_weights_is_refused_before_loading(default_model_dir, tmp_path, capsys) -> None:
    import shutil

    from launch.cli import main

    shutil.copy(default_model_dir / "config.json", tmp_path / "config.json")
    assert main(["generate", "--quiet", "--device", "cpu", "--model", str(tmp_path), "hi"]) == 1
    assert capsys.readouterr().err.strip() == f"error: no *.safetensors files in {tmp_path}"


def test_serve_warms_its_http_path_up_without_a_tokenizer_too() -> None:
    """A model without a tokenizer refuses chats: the HTTP app's start-up requests fall back to completions of token
    ids, and serve says nothing about them (no warning, no request line, nothing in /metrics). A request sent as
    soon as serve prints its http line is answered."""
    import httpx

    from tests.serve_process import ServeProcess

    server = ServeProcess(model_flags=("--device", "cpu", "--model", "dummy:smollm2-135m", "--max-context", "64"),
                          quiet=False)
    try:
        # the http line is a promise: a request sent the moment it appears is answered (it waited in the listen
        # backlog while the app warmed up; it used to be refused for ~0.5 s)
        for line in server.proc.stdout:
            if line.startswith("  http:"):
                break
        assert httpx.get(f"{server.http}/health", timeout=30).status_code == 200
        server.wait_ready()
        metrics = httpx.get(f"{server.http}/metrics", timeout=30).text
        assert "request_success_total{" not in metrics and 'generation_tokens_total{model_name="dummy:smollm2-135m"} 0' \
            in metrics, metrics
    finally:
        assert server.stop() == 0
    err = server.proc.stderr.read()
    assert "warm-up request failed" not in err and " finished (" not in err, err


def test_serve_logs_each_finished_request_unless_quiet(default_model_dir) -> None:
    """Without --quiet, serve's JIT context logs one line per finished request (as vLLM's server does); the HTTP
    API's model id is --served-model-name's. The HTTP app's start-up requests (its warm-up) are neither logged nor
    counted: after one request of ours, the log and /metrics show that one only."""
    import httpx

    from launch.client import Client
    from tests.serve_process import ServeProcess

    server = ServeProcess("--served-model-name", "my-model", "--stats-interval", "0.2", quiet=False)
    try:
        server.wait_ready()
        assert [m["id"] for m in httpx.get(f"{server.http}/v1/models", timeout=30).json()["data"]] == ["my-model"]
        wrong = httpx.post(f"{server.http}/v1/completions", json={"model": "other", "prompt": "hi"}, timeout=30)
        assert wrong.status_code == 404 and "serves `my-model`" in wrong.json()["error"]["message"]
        with Client(server.address) as client:
            final = list(client.generate(token_ids=[5, 6, 7], params={"max_tokens": 3, "temperature": 0.0,
                                                                         "ignore_eos": True}))[-1]
        metrics = httpx.get(f"{server.http}/metrics", timeout=30).text
        assert 'request_success_total{model_name="my-model",finished_reason="length"} 1' in metrics, metrics
        assert 'generation_tokens_total{model_name="my-model"} 3' in metrics, metrics
        # a longer request than --stats-interval 0.2: the throughput lines come while it runs (vLLM's stat logger)
        with Client(server.address) as client:
            list(client.generate(token_ids=[5, 6, 7], params={"max_tokens": 32, "temperature": 0.0,
                                                              "ignore_eos": True}))
    finally:
        assert server.stop() == 0
    err, out = server.proc.stderr.read(), server.proc.stdout.read()
    line = f"jit_context: request {final.request_id} finished (length): 3 prompt + 3 generated tokens, TTFT "
    assert line in err and err.count(" finished (") == 2 and "warm-up request failed" not in err, err
    assert re.search(r"jit_context: generation throughput [0-9.]+ tokens/s, 1 running, 0 waiting", err), err
    # The ready line says what is served, as vLLM and llama-server do; each start-up phase has its line before it.
    ready = re.search(r"hybridrt serving smollm2-135m-instruct on cpu \(ready in [0-9.]+ s\): dtype float32, "
                      r"weights float32, context 4096 tokens, KV cache ([0-9.]+) MiB, 2 requests at once \(batched\)",
                      out)
    assert ready and float(ready.group(1)) == 2 * 30 * 2 * 3 * 4096 * 64 * 4 / (1 << 20), out  # 2 slots on the CPU
    assert re.search(r"graph_executor: weights \d+\.\d\d s", err) and "jit_context: imports " in err, err
    # The converted default model's tokenizer folder is known before the executor reports it: loaded meanwhile.
    assert "jit_context: tokenizer (while the executor loads) " in err, err


def test_serve_port_0_takes_a_free_port_and_sigterm_stops_it_before_or_after_ready(default_model_dir) -> None:
    """`serve --port 0` binds a free native port and prints it (the supervisor used to wait for ready on port 0
    itself, for --ready-timeout; now the JIT context binds it and tells the supervisor); SIGTERM while the model
    loads stops it at once, without serving (it used to be ignored until ready), and after ready as before: exit 0
    both times."""
    import signal
    import time

    from launch.client import Client
    from tests.test_chat import Pipe

    argv = [*CLI, "serve", "--device", "cpu", "--port", "0", "--http-port", "0"]
    serve = Pipe(argv)
    try:
        serve.wait_for(lambda: serve.out.count(b"\n") >= 2, "the ready line and the native address", 60)
        lines = serve.out.decode().splitlines(keepends=True)
        assert lines[0].startswith("hybridrt serving smollm2-135m-instruct on cpu"), lines
        address = re.fullmatch(r"  native: (tcp://127\.0\.0\.1:(\d+))\n", lines[1])
        assert address and int(address[2]) > 0, lines
        with Client(address[1]) as client:
            assert client.status()["model"] == "smollm2-135m-instruct"
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.finish(timeout_s=30) == 0
    finally:
        serve.proc.kill()
        serve.proc.wait()

    serve = Pipe(argv)
    try:
        # the children are starting, far from ready
        serve.wait_for(lambda: serve.err.startswith(b"launcher: checks"), "the launcher's first phase line", 60)
        serve.proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert serve.finish(timeout_s=30) == 0 and b"serving" not in serve.out, bytes(serve.out)
        assert time.monotonic() - start < 10.0, time.monotonic() - start  # not the whole load (nor --ready-timeout)
    finally:
        serve.proc.kill()
        serve.proc.wait()
