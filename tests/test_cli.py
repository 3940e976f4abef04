"""`hybridrt generate` as a user runs it: a real process, real default model, one-line errors."""

from __future__ import annotations

import json
import os
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
             "--top-k", "40", "--seed", "1", "--chat-template", str(template), "What is 2+2?"]
    assert main(["generate", "--in-process", "--json", "--quiet", *flags]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert expected["prompt_tokens"] == expected_prompt and len(expected["token_ids"]) == 12
    out = run_cli("generate", *flags)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected["text"] + "\n"
    assert "graph_executor: smollm2-135m-instruct ready on cpu" in out.stderr
    assert "server ready in" in out.stderr


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
     "has no tokenizer"),
    # 3.9 TiB of KV cache fits no machine: refused before any process starts or anything is allocated.
    (["--model", "dummy:llama-2-7b", "--device", "cpu", "--max-context", "4000000"], "does not fit on cpu"),
    (["--in-process", "--model", "dummy:llama-2-7b", "--device", "cpu", "--max-context", "4000000"],
     "does not fit on cpu"),
    (["--chat-template", "hello"], "--chat-template: 'hello' is neither a file nor a Jinja template"),
    (["--chat-template", "{% for %}"], "--chat-template: the template does not compile"),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str, hybridrt_cache, capsys) -> None:
    """In-process (`launch.cli.main`, what the console script calls): every case fails before any model
    process would start; one case below goes through a real process."""
    from launch.cli import main

    assert main(["generate", "--quiet", *args, "hello"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


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
