"""Tensor parallelism on GPUs (issue 15), marked cuda:
- on any GPU machine: NCCL collectives captured inside a CUDA graph replay with the values of the moment (the
  mechanism every GPU rank's graphs rely on), on a one-rank NCCL group in a child process; and a server asked for
  more ranks than the machine has GPUs ends in one line before it loads anything;
- on two GPUs or more (kind nvidia-h200-x2): a served tiny Llama-3-style (GQA) model on two ranks, each in its own
  graphs, gives the greedy tokens of one GPU, with and without n-gram speculation; a rank killed mid-request ends the
  server within 2 s, naming it, with no process left.
The CPU half (gloo, the split's numerics, the loaders) is tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.cuda

TWO_GPUS = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs (kind nvidia-h200-x2)")

NCCL_IN_A_GRAPH = textwrap.dedent("""
    import torch, torch.distributed as dist
    from ipc.free_port import free_port
    port = free_port()
    gpu = torch.device("cuda:0")
    torch.cuda.set_device(gpu)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=gpu)
    warm = torch.ones(1, device=gpu)
    dist.all_reduce(warm)
    torch.cuda.synchronize()
    x = torch.zeros(64, device=gpu)
    gathered = torch.zeros(64, device=gpu)
    token = torch.zeros(1, dtype=torch.int64, device=gpu)
    out = torch.zeros(64, device=gpu)
    stream = torch.cuda.Stream()

    def body():
        dist.broadcast(token, src=0)
        dist.all_reduce(x)
        dist.all_gather_into_tensor(gathered, x)
        torch.add(gathered, token.float(), out=out)

    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        body()
    for step in range(5):
        values = torch.randn(64, device=gpu)
        x.copy_(values)
        token.fill_(step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, values + step), (step, (out - values - step).abs().max().item())
    dist.destroy_process_group()
    print("ok")
""")


def test_nccl_collectives_in_a_graph_replay_the_values_of_the_moment():
    proc = subprocess.run([sys.executable, "-c", NCCL_IN_A_GRAPH], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_more_ranks_than_gpus_is_one_line_at_start():
    if torch.cuda.device_count() >= 8:
        pytest.skip("eight GPUs or more: eight ranks fit")
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "serve", "--quiet", "--device", "cuda", "--port", "0",
                           "--http-port", "0", "--tensor-parallel", "8", "--model", "dummy:llama-2-7b"],
                          capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "--tensor-parallel 8 runs one rank per GPU" in lines[0], lines
    assert f"this machine shows {torch.cuda.device_count()}" in lines[0], lines


def _tiny_gqa_folder(path) -> str:
    import transformers

    from tests.test_model_equivalence import make_hf_model

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=5).save_pretrained(path)
    return str(path)


def _served_tokens(folder: str, ranks: int, prompts: list[list[int]], *extra: str) -> list[list[int]]:
    from launch.client import Client
    from tests.serve_process import ServeProcess

    params = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    with ServeProcess("--tensor-parallel", str(ranks), "--max-num-seqs", "1", *extra, http=False,
                      model_flags=("--model", folder, "--device", "cuda", "--dtype", "float32")) as server:
        with Client(server.address) as client:
            facts = client.status()["executor"]
            if ranks > 1:
                assert facts["tensor_parallel"] == ranks
                assert facts["graphs"]["captured"], facts  # the ranks replay graphs
            return [list(client.generate(token_ids=p, params=params))[-1].token_ids for p in prompts]


@TWO_GPUS
@pytest.mark.parametrize("speculative", [(), ("--speculative", "ngram")])
def test_two_gpu_ranks_serve_one_gpus_greedy_tokens(speculative, tmp_path):
    folder = _tiny_gqa_folder(tmp_path)
    prompts = [[5, 9, 200, 17], [100, 3, 3, 3, 3, 41], list(range(300, 340))]
    assert _served_tokens(folder, 2, prompts, *speculative) == _served_tokens(folder, 1, prompts, *speculative)


@TWO_GPUS
def test_a_gpu_rank_killed_mid_request_ends_the_server_naming_it():
    from tests.serve_process import ServeProcess
    from tests.test_tensor_parallel import kill_rank_1

    server = ServeProcess("--tensor-parallel", "2", "--max-num-seqs", "1", "--max-context", "4096", http=False,
                          model_flags=("--model", "dummy:tinyllama-1.1b", "--device", "cuda"))
    killed = kill_rank_1(server, lambda client: client.generate(token_ids=[5, 9, 200], params={
        "max_tokens": 4000 - 8, "temperature": 0.0, "ignore_eos": True}))
    killed.assert_ended_naming_rank_1(2.0)
