"""The conversion cache (graph_executor/loading/cache.py): keyed by content, built once (also by two processes at
once), damaged entries rebuilt, a cap with least-recently-used eviction, a cache dir that can't be written, the
GGUF tokenizer through it, and `hybridrt cache ls|rm`."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from graph_executor.loading import cache
from launch.cli import main as cli


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("HYBRIDRT_CACHE_DIR", str(path))
    monkeypatch.delenv("HYBRIDRT_CACHE_MAX_GB", raising=False)
    return path


def _source(path: Path, size: int = 3 << 20, seed: int = 0) -> Path:
    path.write_bytes(bytes((i * 31 + seed) % 251 for i in range(256)) * (size // 256))
    return path


class Builder:
    """A conversion that writes two files and counts its runs (in a file: it may run in another process)."""

    def __init__(self, counter: Path, delay_s: float = 0.0) -> None:
        self.counter, self.delay_s = counter, delay_s

    def __call__(self, out: Path) -> None:
        with open(self.counter, "a") as f:
            f.write("x")
        time.sleep(self.delay_s)
        (out / "weights.bin").write_bytes(os.urandom(2 << 20))
        (out / "config.json").write_text("{}")

    @property
    def runs(self) -> int:
        return len(self.counter.read_text()) if self.counter.exists() else 0


def test_the_key_follows_the_content_not_the_path_or_the_mtime(tmp_path) -> None:
    a = _source(tmp_path / "a.gguf")
    b = tmp_path / "elsewhere" / "b.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, (1, 1))
    assert cache.content_key(a, "tokenizer") == cache.content_key(b, "tokenizer")
    assert cache.content_key(a, "tokenizer") != cache.content_key(a, "safetensors")  # another conversion
    with open(b, "r+b") as f:  # an edited header
        f.seek(100)
        f.write(b"\xff")
    assert cache.content_key(a, "tokenizer") != cache.content_key(b, "tokenizer")
    with open(b, "ab") as f:
        f.write(b"\0")
    assert cache.content_key(b, "tokenizer") != cache.content_key(a, "tokenizer")


def test_a_new_converter_version_converts_again(cache_dir, tmp_path, monkeypatch) -> None:
    """Bumping CONVERTER_VERSION (a conversion that writes different files) changes the key: the old entry is not
    served, the source is converted again."""
    source, build = _source(tmp_path / "m.gguf"), Builder(tmp_path / "runs")
    key = cache.content_key(source, "safetensors")
    old, built = cache.converted("m", "safetensors", source, build)
    assert built and build.runs == 1
    monkeypatch.setattr(cache, "CONVERTER_VERSION", cache.CONVERTER_VERSION + 1)
    assert cache.content_key(source, "safetensors") != key
    new, built = cache.converted("m", "safetensors", source, build)
    assert built and build.runs == 2 and new != old and cache.check_entry(new)


def test_an_entry_is_built_once_then_served_and_a_damaged_one_is_rebuilt(cache_dir, tmp_path, capsys) -> None:
    source, build = _source(tmp_path / "m.gguf"), Builder(tmp_path / "runs")
    folder, built = cache.converted("m", "safetensors", source, build)
    assert built and build.runs == 1 and cache.check_entry(folder) and folder.parent == cache_dir / "models"
    assert cache.converted("m", "safetensors", source, build) == (folder, False) and build.runs == 1
    for damage in ("truncate", "edit", "delete", "manifest"):
        target = folder / ("weights.bin" if damage != "manifest" else cache.MANIFEST)
        if damage == "truncate":
            os.truncate(target, 1000)
        elif damage == "edit":  # a byte the sampled hash reads (the first MiB)
            with open(target, "r+b") as f:
                f.seek(10)
                flipped = f.read(1)[0] ^ 1
                f.seek(10)  # the read moved on: writing there would change byte 11, a no-op 1 time in 256
                f.write(bytes([flipped]))
        elif damage == "delete":
            target.unlink()
        else:
            target.write_text("{not json")
        assert not cache.check_entry(folder)
        runs = build.runs
        again, built = cache.converted("m", "safetensors", source, build)
        assert again == folder and built and build.runs == runs + 1 and cache.check_entry(folder), damage
        assert "damaged; rebuilding" in capsys.readouterr().err
    assert not list((cache_dir / "models").glob(cache.BUILDING + "*"))  # no temporary folder left


def _convert_in_child(source: str, counter: str, cache_path: str, results) -> None:
    os.environ["HYBRIDRT_CACHE_DIR"] = cache_path
    folder, built = cache.converted("m", "safetensors", Path(source), Builder(Path(counter), delay_s=0.5))
    results.put((str(folder), built, cache.check_entry(folder)))


def test_two_processes_converting_the_same_model_at_once_build_it_once(cache_dir, tmp_path) -> None:
    source = _source(tmp_path / "m.gguf")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_convert_in_child, args=(str(source), str(tmp_path / "runs"), str(cache_dir),
                                                          results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    assert Builder(tmp_path / "runs").runs == 1
    assert got[0][0] == got[1][0] and all(ok for _, _, ok in got) and [b for _, b, _ in got] == [False, True]


def test_a_cache_dir_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    monkeypatch.setenv("HYBRIDRT_CACHE_DIR", str(blocker / "cache"))
    source, build = _source(tmp_path / "m.gguf"), Builder(tmp_path / "runs")
    folder, built = cache.converted("m", "safetensors", source, build)
    err = capsys.readouterr().err
    assert built and (folder / "config.json").exists() and not folder.is_relative_to(blocker)  # a private copy
    assert err.count("\n") == 1 and err.startswith("warning: the cache dir") and "m.gguf" in err
    assert cache.converted("m", "tokenizer", source, build, private_fallback=False) == (None, False)


def test_least_recently_used_entries_go_first_past_the_cap(cache_dir, tmp_path, monkeypatch) -> None:
    build = Builder(tmp_path / "runs")
    folders = []
    for i in range(3):
        folder, _ = cache.converted(f"m{i}", "safetensors", _source(tmp_path / f"m{i}.gguf", seed=i), build)
        os.utime(folder / cache.MANIFEST, (1000 + i, 1000 + i))  # m0 used longest ago
        folders.append(folder)
    older, _ = cache.converted("old", "safetensors", _source(tmp_path / "old.gguf", seed=9), build)
    manifest = json.loads((older / cache.MANIFEST).read_text())
    (older / cache.MANIFEST).write_text(json.dumps({**manifest, "version": cache.CONVERTER_VERSION - 1}))
    cache.converted("m0", "safetensors", tmp_path / "m0.gguf", build)  # a hit: m0 is now the most recent
    legacy = cache_dir / "models" / "smollm2-135m-instruct-123-456"  # an older hybridrt's copy
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    abandoned = cache_dir / "models" / (cache.BUILDING + "dead")
    abandoned.mkdir()
    os.utime(abandoned, (1, 1))
    removed = cache.evict(limit=int(4.5 * (1 << 20)))  # two of the three ~2 MiB entries fit
    assert {e.folder for e in removed} == {folders[1], legacy, older, abandoned}
    assert folders[0].exists() and folders[2].exists()
    monkeypatch.setenv("HYBRIDRT_CACHE_MAX_GB", "0.001")  # ~1 MiB: a new build keeps only itself
    newest, _ = cache.converted("m3", "safetensors", _source(tmp_path / "m3.gguf", seed=3), build)
    assert [e.folder for e in cache.entries()] == [newest]


def test_cache_ls_and_rm(cache_dir, tmp_path, capsys) -> None:
    build = Builder(tmp_path / "runs")
    a, _ = cache.converted("alpha", "safetensors", _source(tmp_path / "a.gguf"), build)
    b, _ = cache.converted("beta", "tokenizer", _source(tmp_path / "b.gguf", seed=1), build)
    os.truncate(b / "weights.bin", 10)
    (cache_dir / "triton" / "x").mkdir(parents=True)
    (cache_dir / "triton" / "x" / "k.cubin").write_bytes(b"0" * 100)
    assert cli(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "2 entries" in out
    assert out.splitlines()[-1] == f"Triton's compiled kernels: 100 B in {cache_dir / 'triton'}", out
    lines = {line.split()[0]: line for line in out.splitlines()[2:-1]}
    assert " ok " in lines[a.name] and str(tmp_path / "a.gguf") in lines[a.name] and " corrupt " in lines[b.name]
    assert cli(["cache", "rm", "gamma"]) == 1
    assert "no cache entry named gamma" in capsys.readouterr().err
    assert cli(["cache", "rm", "beta"]) == 0 and not b.exists() and a.exists()
    assert cli(["cache", "rm", "--all"]) == 0
    assert not a.exists() and not (cache_dir / "triton").exists()
    assert "Triton's kernel cache" in capsys.readouterr().out


def test_a_gguf_tokenizer_is_converted_once_and_loads_as_the_gguf_does(cache_dir, default_model_gguf,
                                                                       gguf_tokenizer, capsys) -> None:
    from graph_executor.loading.loader import gguf_tokenizer as cached_tokenizer
    from jit_context.tokenizer import Tokenizer

    folder = cached_tokenizer(default_model_gguf, progress=True)
    assert folder.parent == cache_dir / "models" and "caching the tokenizer" in capsys.readouterr().err
    start = time.perf_counter()
    assert cached_tokenizer(default_model_gguf, progress=True) == folder  # a hit: no GGUF parse
    assert time.perf_counter() - start < 1.0 and capsys.readouterr().err == ""
    tok = Tokenizer.from_path(folder)
    text = "Hello, world! Ünïcödé and   spaces\n<|im_end|> 12345"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert tok.encode(text) == gguf_tokenizer.encode(text)
    assert tok.apply_chat_template(messages) == gguf_tokenizer.apply_chat_template(messages)
    assert tok.eos_token_ids == gguf_tokenizer.eos_token_ids and tok.vocab_size == gguf_tokenizer.vocab_size


def test_triton_compiles_into_the_cache_dir_unless_told_otherwise(cache_dir, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cache.use_for_triton()
    assert os.environ["TRITON_CACHE_DIR"] == str(cache_dir / "triton") and (cache_dir / "triton").is_dir()
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    cache.use_for_triton()
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"
    if importlib.util.find_spec("triton") is not None:  # Triton reads the variable when it compiles
        from triton import knobs

        assert knobs.cache.dir == "/somewhere/else"


def test_the_tokenizer_folder_is_known_before_the_model_loads(cache_dir, tmp_path) -> None:
    """What the launcher tells the JIT context to preload: the folder load_model will report, where it is known."""
    from graph_executor.loading.tokenizer_location import GGUF_TOKENIZER_KIND, known_tokenizer_folder

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert known_tokenizer_folder(str(folder)) is None  # no tokenizer files: the executor reports none either
    (folder / "tokenizer_config.json").write_text("{}")
    assert known_tokenizer_folder(str(folder)) == folder
    assert known_tokenizer_folder(str(folder / "config.json")) == folder  # a file of the folder: the folder
    assert known_tokenizer_folder("dummy:smollm2-135m") is None
    assert known_tokenizer_folder(str(tmp_path / "missing")) is None
    gguf_file = _source(tmp_path / "m.gguf")
    assert known_tokenizer_folder(str(gguf_file)) is None  # not converted yet: nothing to preload
    built, _ = cache.converted("m", GGUF_TOKENIZER_KIND, gguf_file, Builder(tmp_path / "runs"))
    assert known_tokenizer_folder(str(gguf_file)) == built
    assert known_tokenizer_folder(str(gguf_file), load_format="safetensors") is None


def test_the_launcher_never_imports_torch() -> None:
    """`hybridrt serve` spawns its children and waits: parsing, the GPU question, the tokenizer folder and the
    supervisor need no torch (the children import theirs at once, on every core), and no ZeroMQ or asyncio either
    (~0.15 s of imports on this machine: the supervisor's client is imported after the spawn)."""
    code = ("import sys, launch.cli, launch.cmd_serve, launch.cmd_generate, launch.supervisor;"
            "from graph_executor.loading.tokenizer_location import known_tokenizer_folder;"
            "launch.cli.build_parser(); known_tokenizer_folder('smollm2-135m-instruct');"
            "launch.supervisor.gpu_requested('auto'); assert 'torch' not in sys.modules, 'torch imported';"
            "late = sorted(m for m in ('zmq', 'asyncio', 'transformers') if m in sys.modules); assert not late, late")
    in_fresh_python(code, timeout_s=60)


def test_the_executor_imports_gguf_only_for_a_gguf_file() -> None:
    """The executor process module and the loader import the gguf package (and its yaml: ~0.1-0.17 s) only when a
    GGUF file is read: a cached default model or an HF folder starts without it."""
    in_fresh_python("import sys, graph_executor.process, graph_executor.loading.loader, graph_executor.quant.formats;"
                    "late = sorted(m for m in ('gguf', 'yaml') if m in sys.modules); assert not late, late")


def test_the_jit_context_imports_triton_only_on_a_gpu() -> None:
    """The JIT context's one Triton kernel (the greedy token, graph_executor/kernels/argmax.py) is imported when a Sampler is
    made for a GPU: a CPU install need not have Triton, and a CPU start does not pay its import."""
    in_fresh_python("import sys, torch, jit_context.process, jit_context.server, jit_context.generator;"
                    "from jit_context.sampler import Sampler; Sampler(8, torch.device('cpu'));"
                    "assert 'triton' not in sys.modules, 'triton imported'")


def in_fresh_python(code: str, timeout_s: float = 120) -> None:
    """Run `code` in a new interpreter (nothing imported yet): its assertions must hold."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stderr
