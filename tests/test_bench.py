"""`hybridrt bench` on the CPU: the whole harness end to end on a tiny model (so it cannot rot), engine
isolation (time limits, an engine that is not there), and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from bench.stats import percentile
from bench.workloads import TTFT_PAUSE_S
from ipc.errors import HybridrtError
from launch import cmd_bench

SMOKE = ["--device", "cpu", "--max-context", "256", "--prompt-lens", "10,25", "--decode-tokens", "16",
         "--decode-prompt-len", "8", "--contexts", "32,64", "--context-steps", "8", "--repeats", "1", "--quiet"]


def save_tiny_llama(folder: Path, **overrides) -> str:
    """A 2-layer Llama with random weights (seed 0) saved as an HF folder; `overrides`: LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
                            **overrides})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer Llama (HF folder, random weights): the harness's code paths at a fraction of a second per engine
    (dummy:smollm2-135m takes longer to fill with random weights than this whole run)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, default_model_dir) -> str:
    """tiny_model's shape with the default model's vocabulary, tokenizer and chat template: the chat workloads' text
    paths (template, tokenizer, detokenizer) without SmolLM2's 135M parameters' CPU time."""
    import shutil

    folder = tmp_path_factory.mktemp("tiny-chat")
    save_tiny_llama(folder, vocab_size=49152, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(default_model_dir) / name, folder / name)
    return str(folder)


def bench_args(*argv: str) -> argparse.Namespace:
    """Parse as `hybridrt bench ...` would (independent of which subcommands launch/cli.py registers)."""
    parser = argparse.ArgumentParser(prog="hybridrt")
    cmd_bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def run_bench(*argv: str) -> int:
    args = bench_args(*argv)
    return args.run(args)


def test_cpu_smoke_run_writes_every_figure(tiny_model, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert run_bench(*SMOKE, "--model", tiny_model, "--engines", "hybridrt-executor,hf-eager", "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["env"]["card"].startswith("cpu") and results["env"]["torch"] == torch.__version__
    assert results["env"]["transformers"] and "commit" in results["env"]["git"]
    assert results["model"]["name"] == tiny_model and results["model"]["dtype"] == "float32"
    assert results["model"]["params"] == 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 512 * 64 + 64

    floors = results["floors"]
    assert floors["status"] == "ok" and floors["bandwidth_gb_s"] > 0 and floors["matmul_tflop_s"] > 0
    assert set(floors["prefill_ms"]) == {"10", "25"} and {"32", "64"} <= set(floors["decode_ms"])

    for name in ("hybridrt-executor", "hf-eager"):
        r = results["engines"][name]
        assert r["status"] == "ok", r.get("error")
        assert set(r["ttft"]) == {"10", "25"} and r["ttft"]["10"]["median_ms"] > 0
        paused = r["ttft"]["25"]["after_pause"]  # the same requests, each after TTFT_PAUSE_S of idle
        assert paused["pause_s"] == TTFT_PAUSE_S and len(paused["samples_ms"]) == 1 and paused["median_ms"] > 0
        assert r["decode"]["count"] == 16 and len(r["decode"]["gaps_ms"]) == 16
        assert r["decode"]["p50_ms"] <= r["decode"]["p99_ms"] <= r["decode"]["max_ms"]
        assert set(r["context"]) == {"32", "64"} and r["context"]["64"]["count"] == 8
        s = r["startup"]
        assert 0 <= s["process_started"] <= s["weights_ready"] <= s["ready"] <= s["warm"]
        assert r["memory"]["peak_rss_bytes"] > 0
        vs_floor = results["ratios"]["vs_floor"][name]
        assert vs_floor["ttft"]["10"] == pytest.approx(r["ttft"]["10"]["median_ms"] / floors["prefill_ms"]["10"],
                                                       rel=1e-2)
        assert vs_floor["decode_p50"] > 0 and set(vs_floor["context_p50"]) == {"32", "64"}

    ours, peer = results["engines"]["hybridrt-executor"], results["engines"]["hf-eager"]
    vs_peer = results["ratios"]["vs_peer"]["hybridrt-executor/hf-eager"]
    assert vs_peer["decode_p50"] == pytest.approx(ours["decode"]["p50_ms"] / peer["decode"]["p50_ms"], rel=1e-2)
    assert "needs figures from both" in results["overhead"]["note"]

    md = (out / "results.md").read_text()
    for heading in ("## Floors", "## TTFT (ms): median (P99) of 1, back to back", "## Decode", "## Per-token latency",
                    "## Ratios", "## Engines", f"## TTFT (ms) after {TTFT_PAUSE_S * 1e3:.0f} ms of idle"):
        assert heading in md
    assert f"sources sha256 {results['env']['git']['source_sha256'][:12]}" in md  # the code run, commit or not
    assert peer["facts"]["sdpa_cudnn"] is None  # the cuDNN switch is the GPU's (bench/engines/hf.py)
    assert f"- hf-eager: transformers {results['env']['transformers']}, attention sdpa\n" in md
    assert md in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert all((out / f).stat().st_size > 0 for f in ("ttft.png", "context.png", "decode_cdf.png"))


def test_engine_over_its_time_limit_is_recorded_and_run_completes(tiny_model, tmp_path) -> None:
    out = tmp_path / "run"
    assert run_bench(*SMOKE, "--model", tiny_model, "--engines", "hybridrt-executor", "--workloads", "floors,ttft",
                     "--timeout", "0.3", "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["engines"]["hybridrt-executor"]["status"] == "timeout"
    assert "no result within 0.3 s" in results["engines"]["hybridrt-executor"]["error"]
    assert results["floors"]["status"] == "timeout"
    assert "timeout" in (out / "results.md").read_text()


def test_engine_that_fails_records_its_error(tiny_model, tmp_path) -> None:
    from bench import run_engine
    from bench.resolve import BenchOptions, resolve_spec

    spec = resolve_spec(BenchOptions(device="cpu", model=tiny_model, engines="hybridrt-executor",
                                     tokenizer=str(tmp_path / "no-such-tokenizer")))
    spec_path, result_path = tmp_path / "spec.json", tmp_path / "result.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    argv = ["--spec", str(spec_path), "--engine", "hybridrt-executor", "--result", str(result_path)]
    assert run_engine.main(argv) == 0
    result = json.loads(result_path.read_text())
    assert result["status"] == "error" and "no-such-tokenizer" in result["error"]


def test_result_file_survives_facts_that_are_not_json(tmp_path) -> None:
    from bench.run_engine import ResultFile

    result = ResultFile(tmp_path / "r.json", "hybridrt")
    result.update(facts={"handle": b"\x00" * 8, "ok": 1})
    assert json.loads((tmp_path / "r.json").read_text())["facts"] == {"handle": "<8 bytes>", "ok": 1}


@pytest.mark.parametrize("argv,error,message", [
    (["--engines", "hybridrt,vllm"], ValueError, "unknown engine 'vllm'"),
    (["--workloads", "ttft,throughput"], ValueError, "unknown workload 'throughput'"),
    (["--engines", "hf-compile"], HybridrtError, "engine hf-compile needs a CUDA GPU"),
    (["--prompt-lens", "10,ten"], ValueError, "prompt-lens must be a comma list of integers"),
    (["--max-context", "64"], ValueError, "max-context 64 is too small"),
    (["--mps", "on", "--timeout", "0"], ValueError, "timeout must be > 0"),
    (["--model", "dummy:gpt-5"], HybridrtError, "unknown dummy model 'gpt-5'"),
])
def test_bad_input_is_a_clear_error(argv, error, message) -> None:
    with pytest.raises(error, match=message):
        run_bench("--device", "cpu", *argv)


def test_model_that_does_not_fit_is_refused(monkeypatch) -> None:
    monkeypatch.setattr("bench.resolve.host_available_bytes", lambda: 8 * 1024**3)
    with pytest.raises(HybridrtError, match=r"dummy:llama-2-7b \(float32\) does not fit on cpu: it needs about "
                                            r"2\d\.\d GiB .* but available RAM is 8\.0 GiB"):
        run_bench("--device", "cpu", "--model", "dummy:llama-2-7b", "--dtype", "float32")


def test_default_context_leaves_room_for_the_longest_prompts_bucket() -> None:
    """The GPU path captures prefill buckets (every 32 rows) below the max context: a 500-token prompt needs its
    512-row bucket, so the bench's default context is above 512 (it was 512: the prompt ran in two chunks)."""
    from bench.resolve import BenchOptions, resolve_spec
    from graph_executor.graphs import DEFAULT_BUCKETS

    spec = resolve_spec(BenchOptions(device="cpu", model="dummy:smollm2-135m", workloads="ttft", prompt_lens="10,500"))
    assert spec.max_context > min(b for b in DEFAULT_BUCKETS if b >= 500)
    spec = resolve_spec(BenchOptions(device="cpu", model="dummy:smollm2-135m", workloads="ttft", prompt_lens="100"))
    assert spec.max_context == 256  # still rounded to 256 where the bucket fits


def test_fit_check_is_the_loaders_rule(monkeypatch) -> None:
    """The bench refuses exactly what loading would: graph_executor.memory's bytes for the same context."""
    from bench.resolve import BenchOptions, resolve_spec
    from graph_executor.loading.presets import preset
    from graph_executor.memory import required_bytes

    need = required_bytes(preset("smollm2-135m"), torch.float32, 256)
    opts = BenchOptions(device="cpu", model="dummy:smollm2-135m", max_context=256)
    monkeypatch.setattr("bench.resolve.host_available_bytes", lambda: need)
    assert resolve_spec(opts).max_context == 256
    monkeypatch.setattr("bench.resolve.host_available_bytes", lambda: need - 1)
    with pytest.raises(HybridrtError, match="does not fit on cpu"):
        resolve_spec(opts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_refused() -> None:
    with pytest.raises(HybridrtError, match="no CUDA GPU"):
        run_bench("--device", "cuda")


def test_help_explains_every_flag_engine_and_workload(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_args("--help")
    text = capsys.readouterr().out
    for word in ("--model", "--device", "--dtype", "--engines", "--workloads", "--prompt-lens", "--decode-tokens",
                 "--contexts", "--repeats", "--out", "--mps", "--timeout", "--tokenizer", "hybridrt-executor",
                 "hf-eager", "hf-compile", "ttft", "decode", "context", "startup", "memory", "overhead", "floors"):
        assert word in text


def test_cli_prints_one_line_error(capsys) -> None:
    """Through `launch.cli.main`, what the console script calls (test_cli.py runs one such error in a real
    process)."""
    from launch.cli import main

    assert main(["bench", "--device", "cpu", "--engines", "nope"]) == 1
    assert capsys.readouterr().err.strip() == ("error: unknown engine 'nope' (choose from: hybridrt, "
                                               "hybridrt-http, hybridrt-executor, hf-eager, hf-compile)")


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_source_digest_identifies_the_code(tmp_path) -> None:
    """A run on a tree copied without .git is still tied to its code: the digest changes with any source."""
    from bench.envinfo import source_digest

    for pkg in ("graph_executor", "jit_context", "ipc", "launch", "bench"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "a.py").write_text(f"# {pkg}\n")
    first = source_digest(tmp_path)
    assert source_digest(tmp_path) == first and len(first) == 64
    (tmp_path / "ipc" / "a.py").write_text("# ipc changed\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "ipc" / "a.py").write_text("# ipc\n")
    assert source_digest(tmp_path) == first
    (tmp_path / "ipc" / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == first


def test_kernel_profile_cpu_smoke(tiny_model, capsys) -> None:
    """The per-kernel profiler runs end to end (on the CPU it lists torch ops) and prints both tables."""
    from bench.probes.kernel_profile import main

    main(["--model", tiny_model, "--device", "cpu", "--context", "32", "--prompt", "16", "--steps", "2", "--top", "5"])
    out = capsys.readouterr().out
    assert "### decode at context 32:" in out and "### prefill of 16 tokens:" in out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 10 and any("aten::" in r for r in rows), out


def test_startup_section_reports_phases_and_the_first_requests() -> None:
    from bench.report import startup_section

    phases = {"graph_executor": {"phases_s": {"imports": 3.1, "weights": 0.25}, "ready_since_spawn_s": 5.26},
              "jit_context": {"phases_s": {"imports": 3.0}, "ready_since_spawn_s": 5.59}}
    first = {"prompt_tokens": 100, "ttft_ms": [4.78, 3.03, 2.63, 2.44, 2.71], "server_ttft_ms": [2.5, 1.76, 1.69,
                                                                                                  1.57, 1.67],
             "steady_ttft_ms": 2.73, "worst_ratio": 1.751, "after_idle_s": 2.0, "after_idle_ttft_ms": 4.1,
             "after_idle_server_ttft_ms": 2.4}
    lines = startup_section({"engines": {"hybridrt": {"startup": {"phases": phases, "first_requests": first}},
                                         "hf-eager": {"startup": {}}}})
    text = "\n".join(lines)
    assert lines[0] == "## Start-up phases (s) and the first requests after ready"
    assert "- hybridrt, graph_executor: imports 3.10, weights 0.25; ready 5.26 s after spawn" in text
    assert "TTFT 4.78, 3.03, 2.63, 2.44, 2.71 ms against 2.73 steady: worst 1.75x" in text
    assert "(the JIT context's own TTFT: 2.50, 1.76, 1.69, 1.57, 1.67 ms)" in text
    assert ("- hybridrt, a request after 2 s idle: TTFT 4.10 ms (the JIT context's own: 2.40); the first request after "
            "ready 1.17x it") in text
    assert "hf-eager" not in text
    assert startup_section({"engines": {"hf-eager": {"startup": {}}}}) == []


def test_chat_workload_through_the_native_client_and_the_http_api(tiny_chat_model, tmp_path) -> None:
    """The chat workload: text through the server's template and tokenizer, natively and through `hybridrt serve`'s
    HTTP API (its own process); the HTTP engine records the token-level workloads as skipped and the run goes on."""
    out = tmp_path / "chat"
    assert run_bench("--device", "cpu", "--model", tiny_chat_model, "--engines", "hybridrt,hybridrt-http",
                     "--workloads", "chat,ttft,startup", "--prompt-lens", "10", "--repeats", "1", "--quiet",
                     "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    native, http = results["engines"]["hybridrt"], results["engines"]["hybridrt-http"]
    assert native["status"] == http["status"] == "ok", (native.get("error"), http.get("error"))
    # the startup workload on the two-process engine: each process's phases, and the first requests after ready
    phases = native["startup"]["phases"]
    assert {"graph_executor", "jit_context"} <= set(phases), phases
    assert phases["graph_executor"]["phases_s"]["imports"] > 0 and phases["jit_context"]["ready_since_spawn_s"] > 0
    first = native["startup"]["first_requests"]
    assert len(first["ttft_ms"]) == 5 and min(first["ttft_ms"]) > 0 and first["worst_ratio"] > 0, first
    assert set(native["chat"]) == {"short", "long"}
    assert set(http["chat"]) == {"short", "long", "short_http_client", "long_http_client"}  # httpx, then http.client
    for r in (native, http):
        assert all(r["chat"][k]["median_ms"] > 0 for k in r["chat"])
    assert native["ttft"]["10"]["median_ms"] > 0 and "chat workload only" in http["ttft"]["skipped"]
    md = (out / "results.md").read_text()
    assert "## Chat TTFT" in md and "HTTP API - native client (median): short " in md and " through http.client)" in md
    assert "## Start-up phases (s) and the first requests after ready" in md
    assert "- hybridrt, the first 5 requests after ready (" in md and "- hybridrt, graph_executor: imports " in md
    assert "| hybridrt-http |" in md and "| hybridrt-http (http.client) |" in md
    assert "| 10 | - | " in md  # the TTFT table has the native engine only


def test_concurrency_and_turns_workloads_through_a_batching_server(tiny_model, tmp_path) -> None:
    """The hybridrt engine with 2 slots and prefix reuse: 2 streams at once against one alone, an arrival while
    the other decodes, and a chat's second turn that reuses the first turn's KV (CPU)."""
    out = tmp_path / "run"
    assert run_bench("--device", "cpu", "--model", tiny_model, "--engines", "hybridrt", "--workloads",
                     "concurrency,turns", "--max-num-seqs", "2", "--prefix-reuse", "--decode-tokens", "8",
                     "--decode-prompt-len", "8", "--repeats", "1", "--quiet", "--out", str(out)) == 0
    r = json.loads((out / "results.json").read_text())["engines"]["hybridrt"]
    assert r["status"] == "ok", r.get("error")
    c = r["concurrency"]
    assert c["streams"] == 2 and len(c["per_stream"]) == 2 and c["aggregate_tokens_per_s"] > 0
    assert c["decode_phase_tokens_per_s"] > 0 and c["decode_phase_vs_single"] > 0
    assert c["arrival"]["running"] == 1 and c["arrival"]["busy_ttft"]["median_ms"] > 0
    t = r["turns"]
    assert t["prefix_reuse"] and all(n >= 560 for n in t["cached_prompt_tokens"]) and t["ratio"] > 0
    md = (out / "results.md").read_text()
    assert "## Concurrency (hybridrt, --max-num-seqs 2" in md
    assert "## Second turn of a chat (hybridrt, prefix reuse on)" in md
    assert "2 together: all, once all decode" in md


def test_a_tensor_parallel_gpu_run_checks_one_ranks_part_against_a_gpu(monkeypatch) -> None:
    """dummy:llama-2-70b (138 GB in float16) fits two 100 GiB GPUs as two ranks, not one (the fit check of each
    GPU is the rank's part: its heads, MLP block and vocabulary rows)."""
    from bench.resolve import BenchOptions, resolve_spec

    monkeypatch.setattr("bench.resolve.resolve_device_name", lambda name: "cuda")
    monkeypatch.setattr("bench.resolve.free_bytes", lambda spec: 100 * 1024**3)
    opts = dict(device="cuda", model="dummy:llama-2-70b", dtype="float16", engines="hybridrt", workloads="decode")
    assert resolve_spec(BenchOptions(**opts, tensor_parallel=2)).tensor_parallel == 2
    with pytest.raises(HybridrtError, match="does not fit on cuda"):
        resolve_spec(BenchOptions(**opts))


def test_a_tensor_parallel_axis_runs_once_per_rank_count_side_by_side(tiny_model, tmp_path) -> None:
    """`--tensor-parallel 1,2`: one run per rank count into tp-N/ (the peers and the in-process engine at 1 rank
    only) and tensor_parallel.md: decode P50 against the floor and against one rank, TTFT per prompt length."""
    out = tmp_path / "tp"
    assert run_bench(*SMOKE, "--model", tiny_model, "--engines", "hybridrt,hybridrt-executor",
                     "--workloads", "floors,decode,ttft", "--tensor-parallel", "1,2", "--out", str(out)) == 0
    one, two = (json.loads((out / f"tp-{n}" / "results.json").read_text()) for n in (1, 2))
    assert one["spec"]["tensor_parallel"] == 1 and two["spec"]["tensor_parallel"] == 2
    assert one["engines"]["hybridrt-executor"]["status"] == "ok"
    assert two["engines"]["hybridrt-executor"]["status"] == "skipped"
    assert two["engines"]["hybridrt"]["status"] == "ok" and two["engines"]["hybridrt"]["decode"]["p50_ms"] > 0
    table = (out / "tensor_parallel.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and "| TTFT 10 ms | TTFT 25 ms |" in table
    assert rows[0].split("|")[6].strip() == "1.000"  # the first row against itself
    # the two-rank floor adds the measured all-reduce (gloo here) for 2 per layer and the gather
    tp = two["floors"]["tensor_parallel"]
    layers = two["spec"]["model_config"]["num_hidden_layers"]
    assert tp["ranks"] == 2 and tp["collectives_per_step"] == 2 * layers + 1 and tp["allreduce_us"] > 0
    assert "tensor_parallel" not in one["floors"]
    extra = tp["allreduce_us"] * 1e-3 * tp["collectives_per_step"]
    context = str(two["floors"]["decode_context"])
    assert two["floors"]["decode_ms"][context] > extra  # the bytes (the whole model's on the CPU) and the collectives
    assert "Tensor parallel over 2 ranks" in (out / "tp-2" / "results.md").read_text()
    with pytest.raises(ValueError, match="give a list to one of them at a time"):
        run_bench(*SMOKE, "--tensor-parallel", "1,2", "--quantize", "none,int8")
    with pytest.raises(ValueError, match="rank counts >= 1"):
        run_bench(*SMOKE, "--tensor-parallel", "0,2")


def test_near_tie_probe_cpu_smoke(default_model_dir, capsys) -> None:
    """bench.probes.near_tie on the CPU: the greedy run is float32 too, so every step matches the float32 pass, and
    the table lists the smallest margins (positive)."""
    from bench.probes.near_tie import main

    main(["--model", "smollm2-135m-instruct", "--device", "cpu", "--max-tokens", "6", "--show", "3"])
    out = capsys.readouterr().out
    assert "6 tokens" in out and ": 0 step(s) choose differently" in out, out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and all(r[2] == r[3] and float(r[4]) > 0 for r in rows), out


def test_hf_eager_probe_runs_each_variant_to_the_same_tokens(capsys) -> None:
    """bench.probes.hf_eager on the CPU (SmolLM2's shapes cut to 2 layers): a row per variant, every one of them
    (StaticCache, eager attention, one thread, no collector, SDPA without cuDNN) giving the plain loop's greedy
    tokens; the cuDNN switch is back as it was after."""
    from bench.probes.hf_eager import main

    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    main(["--model", "smollm2-135m", "--layers", "2", "--device", "cpu", "--context", "16", "--steps", "6"])
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["plain", "threads1", "nogc", "static", "eager-attn", "no-cudnn"]
    assert all(" | yes | " in r for r in rows), rows
    assert all(float(r.split(" | ")[-1].rstrip(" |")) <= 1e-5 for r in rows), rows  # float32: rounding apart
    with pytest.raises(SystemExit, match="unknown variant"):
        main(["--variants", "plain,fast"])


def test_the_engines_section_says_how_each_hf_peer_ran_its_attention() -> None:
    """A GPU run's hf-eager has SDPA's cuDNN backend off (its per-length plans; bench/engines/hf.py), hf-compile as
    torch picks it: the report says which, under the engines table; engines without the fact get no line."""
    from bench.report import status_section

    facts = {"transformers": "5.17.0", "attn_implementation": "sdpa"}
    engines = {"hf-eager": {"status": "ok", "wall_s": 1, "facts": {**facts, "sdpa_cudnn": False}},
               "hf-compile": {"status": "ok", "wall_s": 1, "facts": {**facts, "sdpa_cudnn": True}},
               "hybridrt": {"status": "ok", "wall_s": 1, "facts": {"graphs": []}}}
    lines = status_section({"engines": engines})
    assert lines[-3:] == ["- hf-eager: transformers 5.17.0, attention sdpa, SDPA's cuDNN backend off (it builds a "
                          "plan per sequence length)",
                          "- hf-compile: transformers 5.17.0, attention sdpa, SDPA's cuDNN backend on", ""]
    assert not any(line.startswith("- hybridrt") for line in lines)


def test_one_ranks_cost_is_its_part_of_the_model() -> None:
    """`ModelCost.of(ranks=N)`, what one tensor-parallel rank reads per token: its heads, MLP block and 1/N of
    lm_head's rows (the norms whole; the untied embedding table held whole but not read); with tied embeddings the
    rank's lm_head rows are a copy of the table's, held beside it."""
    from bench.model_info import ModelCost
    from graph_executor.loading.presets import preset

    cfg = preset("llama-2-7b")
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    one, two = ModelCost.of(cfg, "float16"), ModelCost.of(cfg, "float16", ranks=2)
    per_layer = (3 * h * h + h * h + 2 * i * h + h * i) // 2
    assert two.decode_weight_bytes == 2 * (layers * per_layer + v * h // 2 + (2 * layers + 1) * h)
    assert two.weight_bytes == two.decode_weight_bytes + 2 * v * h  # + the table
    assert one.decode_weight_bytes == 2 * (2 * layers * per_layer + v * h + (2 * layers + 1) * h)
    tied = preset("smollm2-135m")  # 9 heads, 3 KV heads: 3 ranks, one KV head each
    assert tied.tie_word_embeddings
    three = ModelCost.of(tied, "float16", ranks=3)
    h, i, v, hd = tied.hidden_size, tied.intermediate_size, tied.vocab_size, tied.head_dim
    qkv = (3 + 2) * hd * h  # 3 query heads and one KV head (K and V)
    per_layer = qkv + 3 * hd * h + 2 * (i // 3) * h + h * (i // 3)
    assert three.decode_weight_bytes == 2 * (tied.num_layers * per_layer + v * h // 3 + (2 * tied.num_layers + 1) * h)
    assert three.weight_bytes == three.decode_weight_bytes + 2 * v * h


def test_the_all_reduce_probe_measures_gloo_ranks_on_the_cpu() -> None:
    from bench.allreduce import measure_allreduce

    t = measure_allreduce("cpu", 2, 64, "float32")
    assert t.ranks == 2 and t.hidden == 64 and 0 < t.seconds < 0.1 and "gloo" in t.how
    with pytest.raises(ValueError, match="2 ranks or more"):
        measure_allreduce("cpu", 1, 64, "float32")
