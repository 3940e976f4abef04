"""The command lines the supervisor gives its children parse in the children: each flag it passes exists there and
means what the server's config says (speculation -> verify graphs captured before ready, prefix reuse, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from graph_executor.loading.load_config import LoadConfig
from jit_context.speculative_config import SpeculativeConfig
from launch.supervisor import ServerConfig, executor_argv, jit_argv


def _config(device: str = "cpu", **kw) -> ServerConfig:
    return ServerConfig(LoadConfig(model="dummy:smollm2-135m", device=device, progress=False), **kw)


@pytest.mark.parametrize("method", ["off", "ngram"])
def test_the_executor_parses_its_command_line_and_captures_verify_graphs_when_the_server_speculates(method):
    from graph_executor.process import parse_args

    argv = executor_argv(_config(speculation=SpeculativeConfig(method)), "ipc:///tmp/x", Path("/tmp/e"))
    assert argv[1:3] == ["-m", "graph_executor"]
    args = parse_args(argv[3:])
    assert args.capture_verify == (method == "ngram")
    assert (args.model, args.device, args.error_file) == ("dummy:smollm2-135m", "cpu", "/tmp/e")


@pytest.mark.parametrize("reuse", [False, True])
def test_the_jit_context_parses_its_command_line(reuse, tmp_path):
    from jit_context.process import parse_args

    config = _config("cuda:1", prefix_reuse=reuse, tokenizer=str(tmp_path), speculation=SpeculativeConfig("ngram", 4),
                     jit_idle_spin_ms=20.0 if reuse else 0.0)
    argv = jit_argv(config, "ipc:///tmp/x", "ipc:///tmp/y", 1234, Path("/tmp/e"), gpu=True)
    assert argv[1:3] == ["-m", "jit_context"]
    args = parse_args(argv[3:])
    assert args.prefix_reuse == reuse
    assert (args.executor_pid, args.tokenizer, args.cuda_device, args.quiet) == (1234, str(tmp_path), "cuda:1", True)
    assert (args.speculative, args.num_speculative_tokens) == ("ngram", 4)
    assert args.idle_spin_ms == (20.0 if reuse else 0.0)
