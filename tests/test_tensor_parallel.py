"""Tensor parallelism (issue 15), CPU:
- the model's split: two real processes joined by torch.distributed over gloo, each running its rank's part of a tiny
  Llama (`shard_model` of the same whole model) through a prefill and 32 decode steps; every step's logits equal the
  whole model's (TP=1) within 1e-5 in float32, for Llama (MHA), Llama 3 (GQA, KV heads split), GQA with fewer KV
  heads than ranks (replicated) and Qwen2 (QKV bias); shapes that do not divide are one-line errors;
- each rank loads only its part of a checkpoint (safetensors by slice, GGUF cut after reading), equal to the
  whole model's slices;
- the served path: `hybridrt serve --tensor-parallel 2` on a Llama 3-style HF folder (also speculating: n-gram, and a
  draft run whole on rank 0), and `--tensor-parallel 3` on SmolLM2-135M (9 heads, 3 KV heads; batched requests), give
  the greedy tokens of the whole model in process; a rank killed mid-request ends the server with one line naming
  it, nothing left running; a model whose heads do not divide is one line at start.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.multiprocessing as mp

from graph_executor.loading.config import ModelConfig
from graph_executor.tensor_parallel import TensorParallel
from ipc.free_port import free_port

CONFIGS = {
    "llama-mha": ModelConfig("llama", 512, 64, 96, 2, 4, 4, 16, 256),
    "llama3-gqa": ModelConfig("llama", 512, 64, 96, 2, 4, 2, 16, 256, tie_word_embeddings=True),
    "gqa-replicated-kv": ModelConfig("llama", 512, 64, 96, 2, 4, 1, 16, 256),
    "qwen2-bias": ModelConfig("qwen2", 512, 64, 96, 2, 4, 2, 16, 256, qkv_bias=True),
}
PROMPT = [5, 17, 300, 42, 9, 120, 77, 3]
STEPS = 32
CONTEXT = 64


def _whole(cfg: ModelConfig, device: torch.device = torch.device("cpu"), slots: int = 1):
    from graph_executor.loading.loader import _fill_random
    from graph_executor.model import LlamaModel

    model = LlamaModel(cfg, CONTEXT, device, torch.float32, slots=slots)
    _fill_random(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("norm") or name.endswith("bias"):
                b.copy_(torch.empty(b.shape).uniform_(0.5, 1.5, generator=gen))
    return model


def _run(model, tokens: list[int]) -> list[torch.Tensor]:
    """Logits of the prompt's last position, then of each of `tokens` decoded in turn."""
    n = len(PROMPT)
    out = [model(torch.tensor(PROMPT), torch.arange(n), torch.tensor([n - 1]), n)[0]]
    for i, t in enumerate(tokens):
        p = n + i
        out.append(model(torch.tensor([t]), torch.tensor([p]), torch.tensor([0]), p + 1)[0])
    return out


@contextmanager
def _gloo_rank(rank: int, size: int, port: int):
    """This process as rank `rank` of a gloo group of `size` (rendezvous on 127.0.0.1:port), on one thread (the
    ranks share the machine's cores); the group is torn down however the body ends."""
    import torch.distributed as dist

    if dist.is_initialized():  # inside `_cases_rank`: the group it set up serves every case
        yield
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cases_rank(rank: int, size: int, port: int, results: str, rank_fn, cases: list[tuple]) -> None:
    """rank_fn(rank, size, port, f"{results}.{i}", *case) for every case, in one gloo group (a pair of rank processes
    costs seconds of imports; the cases' tiny models do not)."""
    from tests.triton_interpreter import install

    install()  # a spawned process: tests/conftest.py did not run here (see tests/triton_interpreter.py)
    with _gloo_rank(rank, size, port):
        for i, case in enumerate(cases):
            rank_fn(rank, size, port, f"{results}.{i}", *case)


def _dispatch(rank: int, size: int, port: int, results: str, rank_fn, *case) -> None:
    """One case of the shared pair of rank processes (`two_rank_runs`): rank_fn(rank, size, port, results, *case)."""
    rank_fn(rank, size, port, results, *case)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory) -> dict[str, list[tuple[tuple, list[dict]]]]:
    """Every two-rank comparison of this file's steps with the whole model, run in one pair of gloo rank processes
    (each pair costs seconds of imports; the cases' tiny models do not): per test, its cases with each rank's saved
    result. A rank that raises fails the spawn, and with it every test here that asked for the runs."""
    plan = {  # test -> (rank function, cases)
        "fused_prefill": (_fused_prefill_rank, [("qwen2-bias",)]),
        "mixed": (_fused_mixed_rank, [("qwen2-bias",)]),
        "batched": (_fused_rows_rank, [("qwen2-bias", False), ("llama-mha", False), ("llama-mha", True)]),
        "fused_decode": (_fused_rank, [("qwen2-bias",), ("gqa-replicated-kv",)]),
        "fused_decode_peer": (_fused_rank, [("llama3-gqa", True)]),
        "reference": (_rank, [(name,) for name in CONFIGS]),
        "score": (_score_rank, [("llama3-gqa",)]),
    }
    flat = [(key, fn, case) for key, (fn, cases) in plan.items() for case in cases]
    results = str(tmp_path_factory.mktemp("two-ranks") / "result")
    mp.spawn(_cases_rank, args=(2, free_port(), results, _dispatch, [(fn, *case) for _, fn, case in flat]),
             nprocs=2, join=True)
    runs: dict[str, list[tuple[tuple, list[dict]]]] = {}
    for i, (key, _, case) in enumerate(flat):
        runs.setdefault(key, []).append((case, [torch.load(f"{results}.{i}.{rank}") for rank in range(2)]))
    return runs


def _match_the_whole_model(runs: list[tuple[tuple, list[dict]]], steps: int) -> None:
    """Each rank saved {"diffs": [...], "scale": ...} (its logits against the whole model's, and their largest
    magnitude): every rank has `steps` diffs per case, each within 1e-4 of the scale."""
    assert runs
    for case, ranks in runs:
        for rank, r in enumerate(ranks):
            assert len(r["diffs"]) == steps and r["scale"] > 0.1, (case, rank, r)
            assert max(r["diffs"]) <= 1e-4 * r["scale"], (case, rank, r)


def _rank(rank: int, size: int, port: int, results: str, name: str) -> None:
    from graph_executor.tensor_parallel import shard_model

    with _gloo_rank(rank, size, port):
        whole = _whole(CONFIGS[name])
        # The whole model's greedy run, step by step through its cache: the tokens and every step's logits in one
        # pass (what _run(whole, tokens) gives again, as each step's logits depend only on the tokens before it).
        n = len(PROMPT)
        want = [whole(torch.tensor(PROMPT), torch.arange(n), torch.tensor([n - 1]), n)[0]]
        tokens = []
        for p in range(n, n + STEPS):
            tokens.append(int(want[-1].argmax()))
            want.append(whole(torch.tensor([tokens[-1]]), torch.tensor([p]), torch.tensor([0]), p + 1)[0])
        part = shard_model(whole, TensorParallel(rank, size))
        got = _run(part, tokens)
        diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
        scale = max(float(w.abs().max()) for w in want)
        torch.save({"diff": diff, "scale": scale, "steps": len(got)}, f"{results}.{rank}")


def _score_rank(rank: int, size: int, port: int, results: str, name: str) -> None:
    """A prompt's scoring step (ScorePrompt) relayed by rank 0's LeaderRunner to a following rank: rank 0's values
    against the whole model's ModelRunner step, then a decode from the cache it wrote (every rank ran the forwards)."""
    from graph_executor.runner import ModelRunner
    from graph_executor.tensor_parallel import shard_model
    from graph_executor.tp_relay import LeaderRunner, follow

    with _gloo_rank(rank, size, port):
        n = len(PROMPT)
        whole = ModelRunner(_whole(CONFIGS[name]))
        whole.buffers.input_ids[:n] = torch.tensor(PROMPT)
        want = whole.score_prompt(n, 0, 0, 3, n - 1)
        whole.buffers.token.fill_(11)
        whole.decode(n)
        part = shard_model(_whole(CONFIGS[name]), TensorParallel(rank, size))
        if rank:
            follow(part, TensorParallel(rank, size), graphs=False)
            torch.save({"followed": True}, f"{results}.{rank}")
            return
        leader = LeaderRunner(ModelRunner(part), TensorParallel(rank, size))
        leader.buffers.input_ids[:n] = torch.tensor(PROMPT)
        got = leader.score_prompt(n, 0, 0, 3, n - 1)
        leader.buffers.token.fill_(11)
        leader.decode(n)
        leader.stop()
        torch.save({"values": (got, want), "decode": float((leader.buffers.logits - whole.buffers.logits).abs().max())},
                   f"{results}.{rank}")


def test_two_ranks_score_a_prompt_as_the_whole_model(two_rank_runs):
    """ScorePrompt on two ranks (GQA, tied embeddings): rank 0's scores (each row's next-id log-probability and rank,
    top 3 log-probabilities and ids) are the whole model's, and a decode after it sees the same cache."""
    [(_, (leader, follower))] = two_rank_runs["score"]
    got, want = leader["values"]
    assert len(got) == len(want) == (len(PROMPT) - 1) * 8 and follower == {"followed": True}
    for i in range(len(PROMPT) - 1):  # a row: logprob, rank, 3 top logprobs, 3 ids
        g, w = got[i * 8:(i + 1) * 8], want[i * 8:(i + 1) * 8]
        assert abs(g[0] - w[0]) < 1e-5 and g[1] == w[1] and g[5:] == w[5:], i
        assert max(abs(a - b) for a, b in zip(g[2:5], w[2:5], strict=True)) < 1e-5, i
    assert leader["decode"] < 1e-4


FUSED_STEPS = 3


def _fused_rank(rank: int, size: int, port: int, results: str, name: str, peer: bool = False) -> None:
    """The GPU path's decode step (`FusedDecoder`, its Triton kernels under the interpreter here) on this rank's part,
    after an eager prefill of the prompt on the ranks, against the whole model's eager decode. `peer`: the ranks sum
    the step's vectors with the one-kernel all-reduce over peer memory (shared files here, as --tp-allreduce peer
    has GPU ranks do over CUDA IPC)."""
    import torch.distributed as dist

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.tensor_parallel import shard_model

    with _gloo_rank(rank, size, port):
        whole = _whole(CONFIGS[name])
        tp = TensorParallel(rank, size)
        if peer:
            tp = tp.with_peer_allreduce(CONFIGS[name].hidden_size, torch.float32, torch.device("cpu"))
        part = shard_model(whole, tp)
        n = len(PROMPT)
        for model in (whole, part):  # both caches hold the prompt
            model(torch.tensor(PROMPT), torch.arange(n), torch.tensor([n - 1]), n)
        decoder = FusedDecoder(part)
        diffs, scale, token = [], 0.0, 7
        for p in range(n, n + FUSED_STEPS):
            got = torch.full((CONFIGS[name].vocab_size,), float("nan"))
            decoder.step(torch.tensor([token]), torch.tensor([p]), got)
            want = whole(torch.tensor([token]), torch.tensor([p]), torch.tensor([0]), p + 1)[0]
            diffs.append(float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
            token = int(want.argmax())
        calls = tp.peer.calls if peer else 0
        if peer:
            dist.barrier()  # both ranks past their last read of the other's region
            tp.peer.close()
        torch.save({"diffs": diffs, "scale": scale, "peer_calls": calls}, f"{results}.{rank}")


def _fused_prefill_rank(rank: int, size: int, port: int, results: str, name: str) -> None:
    """The GPU path's prefill step (`FusedPrefill`, Triton rows under the interpreter) on this rank's part: the prompt
    from position 0 (causal attention over the new rows), then 3 more tokens attending from the cache (a chunk),
    against the whole model's eager forward."""
    from graph_executor.fused_prefill import FusedPrefill
    from graph_executor.tensor_parallel import shard_model

    with _gloo_rank(rank, size, port):
        whole = _whole(CONFIGS[name])
        part = shard_model(whole, TensorParallel(rank, size))
        step = FusedPrefill(part, 16)
        n, more = len(PROMPT), [11, 12, 13]
        diffs, scale = [], 0.0
        for ids, start, from_cache in ((PROMPT, 0, False), (more, n, True)):
            t = len(ids)
            positions = torch.arange(start, start + t)
            got = torch.full((CONFIGS[name].vocab_size,), float("nan"))
            step.run(torch.tensor(ids), positions, torch.tensor([t - 1]), got, from_cache=from_cache)
            want = whole(torch.tensor(ids), positions, torch.tensor([t - 1]), start + t)[0]
            diffs.append(float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
        torch.save({"diffs": diffs, "scale": scale}, f"{results}.{rank}")


def test_two_ranks_fused_prefill_steps_give_the_whole_models_logits(two_rank_runs):
    """The fused prefill step on two ranks (GQA with bias): a prompt, then a chunk from the cache; every rank's
    logits are the whole model's."""
    _match_the_whole_model(two_rank_runs["fused_prefill"], 2)


def _fused_mixed_rank(rank: int, size: int, port: int, results: str, name: str) -> None:
    """The mixed step (a prompt chunk of slot 1 padded to 16 rows, decode rows of slots 2 and 0) on this rank's part,
    Triton under the interpreter, against the whole model's prefill of the chunk and batched decode."""
    from graph_executor.fused_mixed import FusedMixedStep
    from graph_executor.fused_prefill import FusedPrefill
    from graph_executor.tensor_parallel import shard_model

    with _gloo_rank(rank, size, port):
        cfg = CONFIGS[name]
        whole = _whole(cfg, slots=3)
        part = shard_model(whole, TensorParallel(rank, size), slots=3)
        prompts = {0: PROMPT, 2: [9, 8, 7], 1: [20, 21, 22, 23]}
        for model in (whole, part):
            for slot, ids in prompts.items():
                n = len(ids)
                model(torch.tensor(ids), torch.arange(n), torch.tensor([n - 1]), n, slot=slot)
        chunk, start, bucket = [40, 41, 42, 43, 44], len(prompts[1]), 16
        order, tokens = [2, 0], [11, 12]
        positions = torch.tensor([len(prompts[s]) for s in order])
        ids = torch.tensor(chunk + [0] * (bucket - len(chunk)) + tokens)
        rows_pos = torch.cat([torch.arange(start, start + bucket), positions])
        rows_slot = torch.tensor([1] * bucket + order)
        logits = torch.full((cfg.vocab_size,), float("nan"))
        batch = torch.full((2, cfg.vocab_size), float("nan"))
        FusedMixedStep(FusedPrefill(part, 32), 4).run(ids, rows_pos, rows_slot, bucket,
                                                      torch.tensor([len(chunk) - 1]), [logits], batch)
        n = len(chunk)
        want = whole(torch.tensor(chunk), torch.arange(start, start + n), torch.tensor([n - 1]), start + n, slot=1)[0]
        want_batch = whole.forward_batch(torch.tensor(tokens), positions, order)
        diffs = [float((logits - want).abs().max())] + [float((batch[i] - want_batch[i]).abs().max()) for i in (0, 1)]
        torch.save({"diffs": diffs, "scale": float(want.abs().max())}, f"{results}.{rank}")


def test_two_ranks_mixed_steps_give_the_whole_models_logits(two_rank_runs):
    """The mixed step (continuous batching's prompt chunks with decode rows) on two ranks: the chunk's logits (the
    prefill step's gather) and the decode rows' (the rows' gather) are the whole model's on every rank."""
    _match_the_whole_model(two_rank_runs["mixed"], 3)


def _fused_rows_rank(rank: int, size: int, port: int, results: str, name: str, packed: bool = False) -> None:
    """The batched decode step (two KV slots holding different prompts) and the verify step (4 tokens) on this rank's
    part, Triton under the interpreter, against the whole model's eager steps row by row. `packed`: both models
    quantized to int8 in groups of 16 and kept packed (the part's groups are the whole's: K splits at a group
    boundary), so the steps take the low-bit kernels and lm_head its packed path."""
    from graph_executor.fused_batch_decoder import FusedBatchDecoder
    from graph_executor.fused_verify import FusedVerify
    from graph_executor.quant.apply import quantize_model
    from graph_executor.quant.specs import quantize_plan
    from graph_executor.tensor_parallel import shard_model

    with _gloo_rank(rank, size, port):
        cfg = CONFIGS[name]
        whole = _whole(cfg, slots=2)
        part = shard_model(whole, TensorParallel(rank, size), slots=2)
        if packed:
            for model in (whole, part):
                quantize_model(model, quantize_plan("int8", 16, model.config), progress=False, keep_packed=True)
        prompts = [PROMPT, PROMPT[::-1][:5]]
        for model in (whole, part):
            for slot, ids in enumerate(prompts):
                n = len(ids)
                model(torch.tensor(ids), torch.arange(n), torch.tensor([n - 1]), n, slot=slot)
        diffs, scale = [], 0.0
        tokens, positions = torch.tensor([7, 9]), torch.tensor([len(p) for p in prompts])
        got = torch.full((2, cfg.vocab_size), float("nan"))
        FusedBatchDecoder(part, 2).step(tokens, positions, torch.tensor([0, 1]), got)
        for slot in range(2):
            p = int(positions[slot])
            want = whole(tokens[slot:slot + 1], positions[slot:slot + 1], torch.tensor([0]), p + 1, slot=slot)[0]
            diffs.append(float((got[slot] - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
        n = len(PROMPT) + 1  # slot 0 after the batched step: verify 4 tokens from there
        ids, verify_positions = torch.tensor([3, 4, 5, 6]), torch.arange(n, n + 4)
        got = torch.full((4, cfg.vocab_size), float("nan"))
        FusedVerify(part, 4).run(ids, verify_positions, got)
        want = whole(ids, verify_positions, torch.arange(4), n + 4)
        diffs += [float((g - w).abs().max()) for g, w in zip(got, want)]
        torch.save({"diffs": diffs, "scale": scale}, f"{results}.{rank}")


def test_two_ranks_batched_decode_and_verify_steps_give_the_whole_models_logits(two_rank_runs):
    """The fused batched decode (2 slots) and verify (4 rows) steps on two ranks, dense (QKV bias; MHA) or packed int8
    (MHA): every row of logits, on every rank, is the whole model's (the rows' gather interleaves the ranks'
    vocabulary blocks)."""
    assert [case for case, _ in two_rank_runs["batched"]] == [("qwen2-bias", False), ("llama-mha", False),
                                                             ("llama-mha", True)]
    _match_the_whole_model(two_rank_runs["batched"], 2 + 4)


def test_two_ranks_fused_decode_steps_give_the_whole_models_logits(two_rank_runs):
    """The fused decode step on two ranks (o_proj and down_proj's partial products summed by an all-reduce of the
    residual, lm_head's vocabulary rows gathered), with QKV bias and with replicated KV heads: each step's logits, on
    every rank, are the whole model's."""
    _match_the_whole_model(two_rank_runs["fused_decode"], FUSED_STEPS)


def test_two_ranks_summing_over_peer_memory_give_the_whole_models_logits(two_rank_runs):
    """The same with the decode step's all-reduces in the one-kernel all-reduce over the ranks' peer memory
    (kernels/peer_allreduce.py; shared files and Triton's interpreter here): every residual sum went through it (two
    a layer a step) and the logits are still the whole model's."""
    _match_the_whole_model(two_rank_runs["fused_decode_peer"], FUSED_STEPS)
    for _, ranks in two_rank_runs["fused_decode_peer"]:
        assert [r["peer_calls"] for r in ranks] == [2 * CONFIGS["llama3-gqa"].num_layers * FUSED_STEPS] * 2


def test_peer_allreduce_on_cpu_ranks_is_one_line_at_start():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "launch.cli", "generate", "--quiet", "--device", "cpu", "--model",
                           "dummy:llama-2-7b", "--tensor-parallel", "2", "--tp-allreduce", "peer", "hi"],
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines == ["error: --tp-allreduce peer needs GPU ranks (CPU ranks sum over gloo)"], \
        proc.stderr


def test_two_ranks_give_the_whole_models_logits(two_rank_runs):
    """Each config (MHA, GQA, GQA with replicated KV heads, QKV bias) sharded on two ranks: the prompt's and every
    greedy step's logits, on every rank, are the whole model's."""
    assert [case for case, _ in two_rank_runs["reference"]] == [(name,) for name in CONFIGS]
    for (name,), ranks in two_rank_runs["reference"]:
        for rank, r in enumerate(ranks):
            assert r["steps"] == STEPS + 1 and r["scale"] > 0.1
            assert r["diff"] <= 1e-5, (name, rank, r)


def test_the_split_checks_the_shapes():
    cfg = CONFIGS["llama3-gqa"]
    with pytest.raises(ValueError, match=r"--tensor-parallel 3 .*attention heads \(4\).*KV heads"):
        TensorParallel(0, 3).local_config(cfg)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        TensorParallel(2, 2)
    local = TensorParallel(1, 2).local_config(cfg)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 48)
    assert list(TensorParallel(1, 4).kv_heads(CONFIGS["gqa-replicated-kv"])) == [0]
    assert TensorParallel(1, 2).fused_rows("qkv", cfg).tolist()[:2] == [32, 33]  # query head 2's first row



# -- the served path ---------------------------------------------------------------------------------------


def _ranks(server) -> dict[int, int]:
    """rank -> pid of the server's executor processes."""
    from pathlib import Path

    ranks = {}
    for pid in server.children():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"graph_executor" in argv:
            ranks[int(argv[argv.index(b"--tp-rank") + 1]) if b"--tp-rank" in argv else 0] = pid
    return ranks


@pytest.fixture(scope="module")
def tp_server(default_model_dir):
    from tests.serve_process import ServeProcess

    server = ServeProcess("--tensor-parallel", "3", "--max-num-seqs", "2", http=False)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_three_ranks_serve_the_whole_models_tokens(tp_server, cpu_engine):
    from jit_context.sampling_params import SamplingParams
    from launch.client import Client

    assert sorted(_ranks(tp_server)) == [0, 1, 2]
    from launch.client import Client as StatusClient

    with StatusClient(tp_server.address) as client:
        assert client.status()["executor"]["tensor_parallel"] == 3
    prompts = ["The capital of France is", "def fib(n):", "Three colours:"]
    # Three lengths on two slots: the third request waits for a slot and joins the batch mid-run (each step on three
    # ranks sharing 2 cores costs a few tenths of a second here: a few tokens each show it).
    params = [SamplingParams(max_tokens=4 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(3)]
    got: dict[int, list[int]] = {}

    def ask(i: int) -> None:
        with Client(tp_server.address) as client:
            got[i] = list(client.generate(prompts[i], params=params[i]))[-1].token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]  # batched: two slots, three requests
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        *_, alone = cpu_engine.generator.generate(cpu_engine.tokenizer.encode(prompt), params[i])
        assert got[i] == alone.token_ids, i


@dataclass
class RankKilled:
    """What `kill_rank_1` saw: the server's exit code, seconds from the kill to its end, its stderr, the executor
    ranks' pids (rank -> pid) and every child process it had before the kill."""

    code: int
    ended_s: float
    stderr: str
    ranks: dict[int, int]
    children: list[int]

    def assert_ended_naming_rank_1(self, within_s: float) -> None:
        """One run, one line naming rank 1 as the cause, within `within_s`, with no process left."""
        from ipc.liveness import process_alive

        assert self.code == 1 and "graph_executor rank 1 was killed by SIGKILL" in self.stderr, self.stderr
        print(f"server ended {self.ended_s:.2f} s after the kill")
        assert self.ended_s < within_s, self.ended_s
        assert not any(process_alive(pid) for pid in [*self.ranks.values(), *self.children])


def kill_rank_1(server, ask=None) -> RankKilled:
    """Wait for `server` (a ServeProcess with tensor parallelism) to be ready, SIGKILL its rank 1 (mid-request when
    `ask(client)` opens a stream: after its first message, and the stream must then end in a ServerError), and wait
    for the server to end. Stops the server whatever happens."""
    import os
    import signal

    from launch.client import Client, ServerError
    from tests.serve_process import child_pids

    try:
        server.wait_ready()
        ranks = _ranks(server)
        children = child_pids(server.proc.pid)
        with Client(server.address) as client:
            stream = ask(client) if ask is not None else None
            if stream is not None:
                next(stream)
            os.kill(ranks[1], signal.SIGKILL)
            killed = time.monotonic()
            if stream is not None:
                with pytest.raises(ServerError):
                    list(stream)
        code = server.proc.wait(timeout=15)
        ended = time.monotonic() - killed
    finally:
        server.stop()
    return RankKilled(code, ended, server.proc.stderr.read(), ranks, children)


def test_a_rank_killed_mid_request_ends_the_server_naming_it(default_model_dir):
    from tests.serve_process import ServeProcess

    killed = kill_rank_1(ServeProcess("--tensor-parallel", "3", "--max-num-seqs", "1", http=False),
                         lambda client: client.generate("Count to fifty:", params={
                             "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}))
    killed.assert_ended_naming_rank_1(3.0)  # the supervisor's poll and the survivors' exit


def test_a_rank_killed_while_idle_ends_the_server_at_once(tp_server):
    """A rank that dies while no step runs: nobody relays to it, so no rank notices by itself (on GPUs a rank may
    not notice mid-request either: its GPU waits in a captured NCCL collective). The supervisor kills the other ranks
    at once instead of giving them PEER_EXIT_GRACE_S (2 s) to leave; the line names the rank that died.
    The server is the module's three-rank one, idle after test_three_ranks_serve_the_whole_models_tokens (a start of
    three ranks costs seconds): this ends it, so no test after this one in the file may ask for tp_server."""
    killed = kill_rank_1(tp_server)
    # the ranks killed after it are not causes
    assert "rank 2" not in killed.stderr and "graph_executor was killed" not in killed.stderr, killed.stderr
    killed.assert_ended_naming_rank_1(1.5)


def test_heads_that_do_not_divide_are_one_line_at_start(default_model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "launch.cli", "serve", "--quiet", "--device", "cpu", "--port", "0",
                           "--http-port", "0", "--tensor-parallel", "2"], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--tensor-parallel 2 needs" in lines[0] and "attention heads (9)" in lines[0], lines


# -- each rank loads only its part ------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama2-mha", "qwen2-qkv-bias", "tied-embeddings"])
@pytest.mark.parametrize("form", ["safetensors", "gguf"])
def test_a_rank_loads_its_part_of_a_checkpoint(case, form, tmp_path):
    """Per rank, a load with tensor_parallel=2 holds exactly the slices `shard_model` cuts from the whole model (HF
    safetensors read by slice; GGUF tensors cut after reading), for MHA, Qwen2's biases and tied embeddings."""
    from graph_executor.loading.loader import LoadConfig, load_model
    from graph_executor.tensor_parallel import shard_model
    from tests.test_loaders import write_gguf
    from tests.test_model_equivalence import CASES, make_hf_model

    config_cls, extra = CASES[case]
    hf = make_hf_model(config_cls, extra, seed=3)
    if form == "safetensors":
        hf.save_pretrained(tmp_path)
        path = str(tmp_path)
    else:
        path = str(tmp_path / "m.gguf")
        arch = "qwen2" if "qwen2" in case else "llama"
        theta = hf.config.rope_parameters["rope_theta"]
        write_gguf(hf, path, rope_theta=theta, arch=arch)
    whole = load_model(LoadConfig(model=path, device="cpu", dtype="float32", progress=False)).model
    for rank in range(2):
        part = load_model(LoadConfig(model=path, device="cpu", dtype="float32", progress=False, tensor_parallel=2,
                                     tp_rank=rank)).model
        want = shard_model(whole, TensorParallel(rank, 2))
        got_buffers, want_buffers = dict(part.named_buffers()), dict(want.named_buffers())
        for name, tensor in want_buffers.items():
            if name != "kv_caches":
                assert torch.equal(got_buffers[name], tensor), (case, form, rank, name)
        assert torch.equal(part.lm_head, want.lm_head)


def test_two_ranks_serve_a_checkpoints_greedy_tokens(tmp_path):
    """The issue's served check: a Llama 3-style (GQA) HF folder served by two executor ranks gives, for prompts given
    as token ids, the greedy tokens of the same folder in one process."""
    import transformers

    from graph_executor.loading.loader import LoadConfig
    from jit_context.sampling_params import SamplingParams
    from launch.client import Client
    from launch.local import LocalEngine
    from tests.serve_process import ServeProcess
    from tests.test_model_equivalence import make_hf_model

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=5).save_pretrained(tmp_path)
    params = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    prompts = [[5, 9, 200, 17], [100, 3, 3, 3, 3, 41]]
    alone = LocalEngine(LoadConfig(model=str(tmp_path), device="cpu", dtype="float32", progress=False))
    want = [list(alone.generator.generate(p, SamplingParams(**params)))[-1].token_ids for p in prompts]
    with ServeProcess("--tensor-parallel", "2", "--max-num-seqs", "1", http=False,
                      model_flags=("--model", str(tmp_path), "--device", "cpu", "--dtype", "float32")) as server:
        assert sorted(_ranks(server)) == [0, 1]
        with Client(server.address) as client:
            got = [list(client.generate(token_ids=p, params=params))[-1].token_ids for p in prompts]
    assert got == want


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_two_ranks_speculate_with_the_whole_models_greedy_tokens(method, tmp_path):
    """Speculative decoding over two ranks: every verify step is relayed (its ids: the draft's, written on rank 0,
    or the n-gram proposals of the command) and the greedy tokens are the whole model's without speculation. The draft
    is the model itself (run whole on rank 0), so it proposes what the ranks then accept."""
    import transformers

    from graph_executor.loading.loader import LoadConfig
    from jit_context.sampling_params import SamplingParams
    from launch.client import Client
    from launch.local import LocalEngine
    from tests.serve_process import ServeProcess
    from tests.test_model_equivalence import make_hf_model

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=7).save_pretrained(tmp_path)
    params = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    prompt = [5, 9, 200, 17, 5, 9, 200, 17, 5, 9]  # a repeat for the n-gram proposer to find
    alone = LocalEngine(LoadConfig(model=str(tmp_path), device="cpu", dtype="float32", progress=False))
    want = list(alone.generator.generate(prompt, SamplingParams(**params)))[-1].token_ids
    flags = ["--speculative", method, "--num-speculative-tokens", "4", "--no-adaptive-k"]
    if method == "draft":
        flags += ["--draft-model", str(tmp_path)]
    with ServeProcess("--tensor-parallel", "2", *flags, http=False,
                      model_flags=("--model", str(tmp_path), "--device", "cpu", "--dtype", "float32")) as server:
        with Client(server.address) as client:
            final = list(client.generate(token_ids=prompt, params=params))[-1]
    assert final.token_ids == want
    spec = final.timings["speculation"]
    assert spec["num_draft_tokens"] > 0, spec  # verify steps ran over the ranks
    if method == "draft":
        assert spec["num_accepted_tokens"] == spec["num_draft_tokens"], spec  # the model proposing itself


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_two_ranks_quantize_their_parts_to_the_whole_models_greedy_tokens(method, tmp_path):
    """`--quantize` on two ranks: each quantizes its own part (groups of 16 along K: the parts of o_proj and down_proj
    split K at group boundaries), which gives the values of the whole model quantized in one process: the same greedy
    tokens. A group that does not divide a rank's part of K is one line at start."""
    import subprocess
    import sys

    import transformers

    from graph_executor.loading.loader import LoadConfig
    from jit_context.sampling_params import SamplingParams
    from launch.client import Client
    from launch.local import LocalEngine
    from tests.serve_process import ServeProcess
    from tests.test_model_equivalence import make_hf_model

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=9).save_pretrained(tmp_path)
    params = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    prompts = [[5, 9, 200, 17], [100, 3, 3, 3, 3, 41]]
    alone = LocalEngine(LoadConfig(model=str(tmp_path), device="cpu", dtype="float32", quantize=method,
                                   quantize_group=16, progress=False))
    want = [list(alone.generator.generate(p, SamplingParams(**params)))[-1].token_ids for p in prompts]
    flags = ("--model", str(tmp_path), "--device", "cpu", "--dtype", "float32", "--quantize", method)
    with ServeProcess("--tensor-parallel", "2", "--max-num-seqs", "1", "--quantize-group", "16", http=False,
                      model_flags=flags) as server:
        with Client(server.address) as client:
            got = [list(client.generate(token_ids=p, params=params))[-1].token_ids for p in prompts]
            assert method in client.status()["executor"]["weight_format"]
    assert got == want
    if method == "int8":  # down_proj's 96 columns split in two: 48 does not divide by 32
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "serve", "--quiet", "--port", "0", "--http-port",
                               "0", "--tensor-parallel", "2", *flags], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert "does not divide" in lines[0] and "tensor-parallel ranks' part" in lines[0], lines


@pytest.mark.parametrize("spec", ["int4-offset", "int8", "int8-offset", "fp8"])
def test_a_packed_weights_part_is_the_part_of_its_values(spec):
    """rows.part on packed weights (a GPU rank loading a GGUF file keeps its types packed): rows, and columns at
    group boundaries, give exactly the part of the dequantized whole; columns inside a group are refused."""
    import dataclasses

    from graph_executor.quant import rows
    from graph_executor.quant.apply import quantize
    from graph_executor.quant.specs import WeightSpec

    kind, _, offset = spec.partition("-")
    gen = torch.Generator().manual_seed(3)
    w = quantize(torch.randn(12, 96, generator=gen),
                 WeightSpec("fp8") if kind == "fp8" else WeightSpec(kind, 16, offset=kind == "int4"))
    if spec == "int8-offset":  # GGUF's Q5_1 / Q5_K: int8 codes with an offset per group (quantize makes none)
        w = dataclasses.replace(w, offset=torch.randn(w.scale.shape, generator=gen).to(w.scale.dtype))
    whole = rows.dequantize(w, torch.float32)
    for index in ((slice(4, 8),), (slice(None), slice(48, 96)), (slice(None), slice(0, 32))):
        assert torch.equal(rows.dequantize(rows.part(w, index), torch.float32), whole[index]), index
    if kind != "fp8":
        with pytest.raises(ValueError, match="do not start and end at its groups of 16"):
            rows.part(w, (slice(None), slice(8, 56)))


def test_a_rank_loads_its_part_of_a_packed_tensor():
    """copy_into on a rank whose slots are packed (int8, groups of 16): down_proj's columns and gate_proj's rows of a
    whole packed tensor land as the rank's part, equal to the whole's values there."""
    from graph_executor.loading.weight_map import copy_into, hf_slot
    from graph_executor.model import LlamaModel
    from graph_executor.quant import rows
    from graph_executor.quant.apply import quantize
    from graph_executor.quant.specs import WeightSpec, quantize_plan

    cfg, tp = CONFIGS["llama-mha"], TensorParallel(1, 2)
    local = tp.local_config(cfg)
    model = LlamaModel(local, CONTEXT, torch.device("cpu"), torch.float32, plan=quantize_plan("int8", 16, local),
                       tp=tp, full_config=cfg)
    gen = torch.Generator().manual_seed(4)
    down = quantize(torch.randn(cfg.hidden_size, cfg.intermediate_size, generator=gen), WeightSpec("int8", 16))
    gate = quantize(torch.randn(cfg.intermediate_size, cfg.hidden_size, generator=gen), WeightSpec("int8", 16))
    copy_into(model, "model.layers.0.mlp.down_proj.weight", down)
    copy_into(model, "model.layers.0.mlp.gate_proj.weight", gate)
    half = cfg.intermediate_size // 2
    got_down = rows.dequantize(hf_slot(model, "model.layers.0.mlp.down_proj.weight"), torch.float32)
    got_gate = rows.dequantize(hf_slot(model, "model.layers.0.mlp.gate_proj.weight"), torch.float32)
    assert torch.equal(got_down, rows.dequantize(down, torch.float32)[:, half:])
    assert torch.equal(got_gate, rows.dequantize(gate, torch.float32)[half:])


def test_gpu_ranks_leave_mps_off_unless_asked(tmp_path):
    """MPS `auto` starts no daemon for more than one GPU rank (NCCL between the ranks' GPUs has not run under one), and
    says why; one rank and `off` are unchanged."""
    from launch.mps import MpsDaemon

    ranks = MpsDaemon.start("auto", tmp_path / "pipe", tmp_path / "log", gpu=True, gpu_ranks=2)
    assert not ranks.running and "2 tensor-parallel ranks" in ranks.reason and "--mps on" in ranks.reason
    off = MpsDaemon.start("off", tmp_path / "pipe", tmp_path / "log", gpu=True, gpu_ranks=2)
    assert off.reason == "disabled by --mps off"
    cpu = MpsDaemon.start("auto", tmp_path / "pipe", tmp_path / "log", gpu=False, gpu_ranks=1)
    assert not cpu.running and cpu.reason == "no GPU in use"


def test_a_cpu_rank_runs_on_the_cpu_and_gpu_ranks_need_a_gpu():
    from graph_executor.process import rank_device
    from ipc.errors import DeviceError

    assert rank_device("cpu", TensorParallel(1, 2)) == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            rank_device("cuda", TensorParallel(1, 2))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_a_rank_reads_only_its_part_of_each_gguf_tensor(qtype, tmp_path):
    """`iter_gguf_tensors(part_of=)` on a file of quantized tensors (llama.cpp's Q/K row permutation included): each
    rank's tensors, dense (dequantized) and packed, equal the whole tensors' parts; rows and block-aligned columns
    are read alone (their stored rows / byte columns), columns inside a block (down_proj's 48 of 96 here, blocks of
    32) are cut after converting the rank's rows."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    from graph_executor.loading.config import ModelConfig
    from graph_executor.loading.gguf_loader import _permuted_rows, _read_part, gguf_config, iter_gguf_tensors
    from graph_executor.quant import rows
    from graph_executor.quant.specs import WeightPlan, WeightSpec
    from ipc.errors import ModelLoadError
    from tests.test_loaders import GGUF_NAMES, llama_cpp_permute

    qt = gguf.GGMLQuantizationType[qtype]
    h, inter, heads, kv = 64, 96, 4, 2
    gen = np.random.default_rng(9)
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in (("block_count", 1), ("context_length", 128), ("embedding_length", h),
                       ("feed_forward_length", inter), ("head_count", heads), ("head_count_kv", kv),
                       ("layer_norm_rms_eps", 1e-5), ("vocab_size", 256)):
        getattr(w, f"add_{key}")(value)
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv * 16, h),
              "self_attn.v_proj.weight": (kv * 16, h), "self_attn.o_proj.weight": (h, h),
              "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    for rest, shape in shapes.items():
        a = gen.standard_normal(shape).astype(np.float32)
        if rest.startswith("self_attn.q_proj"):
            a = llama_cpp_permute(a, heads)
        elif rest.startswith("self_attn.k_proj"):
            a = llama_cpp_permute(a, kv)
        if qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(f"blk.0.{GGUF_NAMES[rest]}", a.astype(np.float16))
        else:
            w.add_tensor(f"blk.0.{GGUF_NAMES[rest]}", quantize(a, qt), raw_dtype=qt)
    w.add_tensor("blk.0.attn_norm.weight", gen.standard_normal(h).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader)
    assert isinstance(cfg, ModelConfig) and cfg.num_kv_heads == kv
    whole = dict(iter_gguf_tensors(reader, cfg))
    # Q8_0 kept packed (int8, groups of 32) in qkv, o and gate_up; down_proj's 48 columns would split a group
    packed_plan = WeightPlan({f"layers.0.{slot}": WeightSpec("int8", 32)
                              for slot in ("qkv_proj", "o_proj", "gate_up_proj")}) if qtype == "Q8_0" else None
    for rank in range(2):
        tp = TensorParallel(rank, 2)

        def part_of(name, tp=tp):
            return tp.checkpoint_part(name, cfg)

        mine = dict(iter_gguf_tensors(reader, cfg, part_of=part_of))
        assert mine.keys() == whole.keys()
        for name, tensor in whole.items():
            part = part_of(name)
            want = tensor if part is None else tensor[part]
            assert np.array_equal(mine[name], want), (qtype, rank, name)
        # what was read: rows, and columns at block boundaries, alone; down_proj's columns cut from its rows
        by_name = {hf: t for t in reader.tensors if (hf := f"model.layers.0.{GGUF_NAMES_INV[t.name[6:]]}")}
        o, down = "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"
        assert _read_part(by_name[o], None, part_of(o))[2] is None
        assert (_read_part(by_name[down], None, part_of(down))[2] is None) == (qtype == "F16")  # F16: blocks of 1
        q = "model.layers.0.self_attn.q_proj.weight"
        data, dims, cut = _read_part(by_name[q], _permuted_rows(q, cfg), part_of(q))
        assert cut is None and data.shape[0] == h // 2 and dims == (h, h // 2)
        if packed_plan is not None:
            packed = dict(iter_gguf_tensors(reader, cfg, packed_plan, "cpu", part_of))
            kept = [name for name, t in packed.items() if not isinstance(t, np.ndarray)]
            assert len(kept) == 6, kept  # q, k, v, o, gate, up
            for name in kept:
                got = rows.dequantize(packed[name], torch.float32).numpy()
                part = part_of(name)
                assert np.allclose(got, whole[name] if part is None else whole[name][part], rtol=0, atol=1e-6), name
            split = WeightPlan({"layers.0.down_proj": WeightSpec("int8", 32)})
            with pytest.raises(ModelLoadError, match="tensor-parallel rank's part; --dequantize"):
                list(iter_gguf_tensors(reader, cfg, split, "cpu", part_of))


GGUF_NAMES_INV = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                  "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                  "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
                  "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight"}
