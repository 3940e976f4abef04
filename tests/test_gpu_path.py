"""The GPU path (marked `cuda`): graph replay vs eager, a LLaMA-shaped model vs transformers in fp16, sampling on
the device, and the two-process server on the GPU (CUDA IPC buffers and events, MPS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from graph_executor.graphs import GraphRunner
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.runner import ModelRunner
from jit_context.sampler import Sampler
from jit_context.sampling_params import SamplingParams
from tests.test_sampling import chi_square, reference_allowed

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_steps(runner, prompt: list[int], steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy prefill + decode through a runner's buffers; logits of every step and the tokens."""
    b = runner.buffers
    b.input_ids[: len(prompt)].copy_(torch.tensor(prompt))
    runner.prefill(len(prompt))
    logits, tokens = [b.logits.clone()], []
    for i in range(steps):
        b.next_token.copy_(torch.argmax(b.logits).view(1))
        tokens.append(int(b.next_token))
        runner.decode(len(prompt) + i)
        logits.append(b.logits.clone())
    return logits, tokens


def test_graph_replay_matches_eager() -> None:
    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=1024, progress=False)
    model = load_model(cfg).model
    prompt = torch.randint(100, 40000, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    eager_logits, eager_tokens = run_steps(ModelRunner(model), prompt, 128)
    graphs = GraphRunner(model)
    graphs.capture_all()
    assert {"decode", "prefill_64", "extend_512"} <= set(graphs.graphs)
    graph_logits, graph_tokens = run_steps(graphs, prompt, 128)
    assert graph_tokens == eager_tokens
    worst = max(relative_error(g, e) for g, e in zip(graph_logits, eager_logits))
    assert worst < 1e-3, worst


def test_capture_after_a_long_prompt_ran_eagerly() -> None:
    """Graphs are captured while idle, after whatever requests came first: a long prompt served before the small
    buckets were captured must not break their capture (its logits row is out of their range)."""
    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=1024, progress=False)
    model = load_model(cfg).model
    graphs = GraphRunner(model)
    long = torch.randint(100, 40000, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    run_steps(graphs, long, 2)  # nothing captured yet: eager; logits_index is left at 199
    graphs.capture_all()
    torch.cuda.synchronize()
    assert {"prefill_16", "prefill_224"} <= set(graphs.graphs)
    short = long[:10]
    eager_logits, eager_tokens = run_steps(ModelRunner(model), short, 8)
    graph_logits, graph_tokens = run_steps(graphs, short, 8)
    assert graph_tokens == eager_tokens
    assert max(relative_error(g, e) for g, e in zip(graph_logits, eager_logits)) < 1e-3


def test_a_prompt_takes_a_larger_captured_bucket_when_it_replays_faster() -> None:
    """Prefill graphs are timed at capture (`stats.replay_ms`); a prompt whose smallest bucket replays slower than a
    larger captured one runs in the larger (graph_executor/graphs.py, pick_bucket), with the same logits."""

    class Refused:  # stands in for the 208-row graph: replaying it fails the test
        def replay(self) -> None:
            raise AssertionError("the slower bucket was replayed")

    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=512, progress=False)
    model = load_model(cfg).model
    prompt = torch.randint(100, 40000, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    eager_logits, eager_tokens = run_steps(ModelRunner(model), prompt, 2)
    graphs = GraphRunner(model)
    for name in ("decode", "prefill_208", "prefill_224"):
        graphs.capture(name)
    assert set(graphs.stats.replay_ms) == {"prefill_208", "prefill_224"}
    ms = graphs.bucket_ms["prefill"]
    assert set(ms) == {208, 224} and all(v > 0 for v in ms.values()) and not graphs.bucket_ms["extend"]
    ms[208] = ms[224] * 1.1
    graphs.graphs["prefill_208"] = Refused()
    graph_logits, graph_tokens = run_steps(graphs, prompt, 2)
    assert graphs.demand["prefill_208"] == 1  # the demand still goes to the smallest bucket
    assert graph_tokens == eager_tokens
    assert max(relative_error(g, e) for g, e in zip(graph_logits, eager_logits)) < 1e-3
    ms[208] = ms[224]
    with pytest.raises(AssertionError, match="slower bucket"):
        graphs.prefill(200)


def test_a_cublaslt_trial_capture_is_kept_only_when_faster_and_gives_the_same_logits(monkeypatch) -> None:
    """Once every graph exists, pending() lists each prefill graph's cuBLASLt trial; a trial replaces its graph only
    when it replays LT_MARGIN faster, both timed together, and then the extend graph of that bucket is captured
    through cuBLASLt too (graph_executor/graphs.py, LT_TRIAL)."""
    import graph_executor.graphs as graphs_module
    from graph_executor.graphs import LT_TRIAL

    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=512, progress=False)
    model = load_model(cfg).model
    prompt = torch.randint(100, 40000, (50,), generator=torch.Generator().manual_seed(7)).tolist()
    eager_logits, eager_tokens = run_steps(ModelRunner(model), prompt, 2)
    buckets = (16, 64, 96, 144, 160)
    graphs = GraphRunner(model, buckets=buckets)
    while graphs.pending() and not graphs.pending()[0].endswith(LT_TRIAL):
        graphs.capture_next()
    assert graphs.pending() == [f"prefill_{b}{LT_TRIAL}" for b in (160, 144, 96, 64, 16)]  # capture order
    slow, fast, measured = graphs.graphs["prefill_96"], graphs.graphs["prefill_64"], graphs.graphs["prefill_160"]
    monkeypatch.setattr(graphs_module, "LT_MARGIN", -1e9)  # any trial is kept
    graphs.capture("prefill_96" + LT_TRIAL)
    graphs.capture("prefill_160" + LT_TRIAL)
    assert graphs.graphs["prefill_96"] is not slow and graphs.graphs["prefill_160"] is not measured
    assert graphs.stats.cublaslt == ["prefill_96", "prefill_160"] and 96 not in graphs.bucket_ms["prefill"]
    trial_ms = graphs.stats.trials_ms["prefill_160" + LT_TRIAL]
    assert len(trial_ms) == 2 and graphs.bucket_ms["prefill"][160] == graphs.bucket_ms["extend"][160] == trial_ms[1]
    monkeypatch.setattr(graphs_module, "LT_MARGIN", 1.0)  # no trial is kept
    graphs.capture("prefill_64" + LT_TRIAL)
    assert graphs.graphs["prefill_64"] is fast and "prefill_64" not in graphs.stats.cublaslt
    assert graphs.pending() == [f"prefill_{b}{LT_TRIAL}" for b in (144, 16)] + [
        f"extend_{b}{LT_TRIAL}" for b in (96, 160)]
    extend = graphs.graphs["extend_96"]
    graphs.capture_all()
    assert graphs.graphs["extend_96"] is not extend and graphs.stats.cublaslt[-2:] == ["extend_96", "extend_160"]
    assert not graphs.pending() and len(graphs.stats.trials_ms) == 5
    for graph in ("prefill_64", "prefill_96"):  # the 50-token prompt through the cuBLAS graph, then a cuBLASLt one
        graphs.buckets = buckets if graph == "prefill_64" else (96, 144, 160)
        graph_logits, graph_tokens = run_steps(graphs, prompt, 2)
        assert graph_tokens == eager_tokens
        assert max(relative_error(g, e) for g, e in zip(graph_logits, eager_logits)) < 1e-3, graph
    graphs.buckets = buckets
    longer = torch.randint(100, 40000, (120,), generator=torch.Generator().manual_seed(8))
    eager = ModelRunner(model)
    eager.buffers.input_ids[:120].copy_(longer)
    eager.prefill(120)
    graphs.buffers.input_ids[:120].copy_(longer)
    graphs.prefill(30)
    graphs.prefill(90, start_pos=30)  # the cuBLASLt extend_96 graph
    assert graphs.demand["extend_96"] == 1
    assert relative_error(graphs.buffers.logits, eager.buffers.logits) < 1e-3


def test_chunked_prefill_through_graph_matches_eager() -> None:
    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=2048, progress=False)
    model = load_model(cfg).model
    prompt = torch.randint(100, 40000, (1100,), generator=torch.Generator().manual_seed(1)).tolist()
    eager_logits, _ = run_steps(ModelRunner(model), prompt, 4)
    graphs = GraphRunner(model)
    graphs.capture_all()
    graph_logits, _ = run_steps(graphs, prompt, 4)
    assert max(relative_error(g, e) for g, e in zip(graph_logits, eager_logits)) < 1e-3


def test_a_prompt_continuing_the_cache_and_idle_captures_that_leave_it_alone() -> None:
    """Prefix reuse on the GPU: a prompt whose start the cache holds prefills the rest from its start position
    (an extend step, eager before its graph exists, replayed after), with the logits of a whole prefill; capturing
    every graph while a slot holds a conversation (the executor captures while idle, between turns) writes no cache
    row but the scratch row."""
    cfg = LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float32", max_context=256, progress=False)
    model, ref = load_model(cfg).model, load_model(cfg).model  # the same seeded weights
    ids = torch.randint(100, 40000, (110,), generator=torch.Generator().manual_seed(5))
    graphs, eager = GraphRunner(model), ModelRunner(ref)
    graphs.capture("decode")
    graphs.capture("prefill_64")
    for runner in (graphs, eager):
        runner.buffers.input_ids[:110].copy_(ids)

    def whole(n: int) -> torch.Tensor:
        eager.prefill(n)
        return eager.buffers.logits.clone()

    graphs.prefill(50)  # prefill_64, replayed
    assert relative_error(graphs.buffers.logits, whole(50)) < 1e-3
    graphs.prefill(20, 50)  # extend_32, not captured yet: eager
    assert relative_error(graphs.buffers.logits, whole(70)) < 1e-3
    torch.cuda.synchronize()
    held = model.kv_caches[..., :-1, :].clone()  # [slots, layers, 2, kv heads, all rows but the scratch row, hd]
    graphs.capture_all()
    assert {"extend_32", "extend_16", "extend_224", "verify_9"} <= set(graphs.graphs)
    torch.cuda.synchronize()
    assert torch.equal(model.kv_caches[..., :-1, :], held)
    graphs.prefill(40, 70)  # extend_64, replayed
    assert relative_error(graphs.buffers.logits, whole(110)) < 1e-3


def test_llama_shaped_fp16_matches_transformers(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                                      max_position_embeddings=4096)
    hf = transformers.LlamaForCausalLM(config).to(CUDA, torch.float16).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device="cuda", dtype="float16", max_context=512,
                                  progress=False)).model
    runner = GraphRunner(model)
    runner.capture_all()
    prompt = torch.randint(0, 32000, (50,), generator=torch.Generator().manual_seed(2))
    ours, tokens = run_steps(runner, prompt.tolist(), 64)
    with torch.no_grad():
        ids = torch.cat([prompt, torch.tensor(tokens)]).to(CUDA)[None]
        ref = hf(ids).logits[0].float()  # [T, V]
    refs = [ref[len(prompt) - 1 + i] for i in range(65)]
    worst = max(relative_error(o, r) for o, r in zip(ours, refs))
    assert worst < 1e-2, worst


def draw_counts(sampler: Sampler, logits: torch.Tensor, n: int) -> np.ndarray:
    out = torch.empty(1, dtype=torch.int64, device=CUDA)
    counts = np.zeros(logits.shape[0], dtype=np.int64)
    for _ in range(n):
        counts[int(sampler.sample(logits, out=out))] += 1
    return counts


@pytest.mark.parametrize("filters", [{"top_k": 10}, {"top_p": 0.5}, {"min_p": 0.3},
                                     {"top_k": 16, "top_p": 0.7, "min_p": 0.1}])
def test_gpu_sampling_never_leaves_the_allowed_set(filters) -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(7))
    allowed, _ = reference_allowed(logits.numpy(), 1.0, **filters)
    sampler = Sampler(64, CUDA)
    sampler.start_request(SamplingParams(temperature=1.0, seed=3, **filters), [])
    counts = draw_counts(sampler, logits.to(CUDA), 10_000)
    assert not ((counts > 0) & ~allowed).any()


def test_gpu_sampling_chi_square() -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8])
    _, probs = reference_allowed(logits.numpy(), 1.0)
    sampler = Sampler(8, CUDA)
    sampler.start_request(SamplingParams(temperature=1.0, seed=1234), [])
    assert chi_square(draw_counts(sampler, logits.to(CUDA), 20_000), probs) < 24.32


@pytest.fixture
def smollm2_tokenizer(request) -> str:
    """SmolLM2's tokenizer files: $HYBRIDRT_TEST_TOKENIZER (GPU machines without the default model package),
    else the converted default model."""
    import os

    if os.environ.get("HYBRIDRT_TEST_TOKENIZER"):
        return os.environ["HYBRIDRT_TEST_TOKENIZER"]
    return str(request.getfixturevalue("default_model_dir"))


def test_serve_on_gpu_streams_native_and_http(smollm2_tokenizer) -> None:
    openai = pytest.importorskip("openai")
    from ipc.reply_spin import server_spin_ms
    from launch.client import Client, ServerError
    from tests.serve_process import ServeProcess, shm_segments

    before = shm_segments()
    flags = ("--device", "cuda", "--model", "dummy:smollm2-135m", "--tokenizer", smollm2_tokenizer,
             "--max-context", "1024")
    with ServeProcess("--speculative", "ngram", model_flags=flags) as server:  # verify logits over CUDA IPC too
        with Client(server.address) as client:
            # Captured before ready (issue 13): decode and its argmax form, the prefill and extend buckets up to 128
            # tokens and, since this server speculates, the 8 verify graphs, with their phases.
            executor = client.status()["executor"]
            startup = executor["startup"]["phases_s"]
            assert {"decode", "decode_argmax", *(f"{kind}_{b}" for kind in ("prefill", "extend")
                                                 for b in (16, 32, 64, 96, 128)),
                    *(f"verify_{n}" for n in range(2, 10))} <= set(executor["graphs"]["captured"]), executor["graphs"]
            assert "kernel compile and warm-up" in startup and any(p.startswith("graph capture (20 graphs")
                                                                   and p.endswith("verify)") for p in startup), startup
            jit_phases = client.status()["startup"]["phases_s"]
            assert "warm-up request" in jit_phases  # the JIT context's, before ready
            assert "sampling kernels (while the executor loads)" in jit_phases  # before the handshake
            chunks = list(client.generate(messages=[{"role": "user", "content": "Hello there"}],
                                          params={"max_tokens": 40, "temperature": 0, "ignore_eos": True}))
            final = chunks[-1]
            assert final.finish_reason == "length" and len(final.token_ids) == 40
            assert "".join(c.text for c in chunks[:-1]) == final.text
            # a GPU server with cores to spare has its clients spin for their next message (ipc.reply_spin)
            assert client.spin.window_s == server_spin_ms("cuda") / 1e3 and server_spin_ms("cuda") > 0
            with pytest.raises(ServerError, match="temperature"):
                list(client.generate("hi", params={"temperature": -1}))
            assert client.status()["device"].startswith("cuda")
        api = openai.OpenAI(base_url=f"{server.http}/v1", api_key="none")
        model_id = api.models.list().data[0].id
        reply = api.completions.create(model=model_id, prompt="Once upon", max_tokens=8, temperature=0)
        with Client(server.address) as client:
            native = list(client.generate("Once upon", params={"max_tokens": 8, "temperature": 0}))[-1]
        assert reply.choices[0].text == native.text
    assert shm_segments() <= before
