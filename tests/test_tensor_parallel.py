"""Tensor parallelism (issue 15), CPU: two real processes joined by torch.distributed over gloo, each running its
rank's part of a tiny Llama (`shard_model` of the same whole model) through a prefill and 32 decode steps; every
step's logits equal the whole model's (TP=1) within 1e-5 in float32, for Llama (MHA), Llama 3 (GQA, KV heads split),
GQA with fewer KV heads than ranks (replicated) and Qwen2 (QKV bias). Shapes that do not divide are one-line errors.
The served path (N executor processes) is not built yet.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from graph_executor.loading.config import ModelConfig
from graph_executor.tensor_parallel import TensorParallel

CONFIGS = {
    "llama-mha": ModelConfig("llama", 512, 64, 96, 2, 4, 4, 16, 256),
    "llama3-gqa": ModelConfig("llama", 512, 64, 96, 2, 4, 2, 16, 256, tie_word_embeddings=True),
    "gqa-replicated-kv": ModelConfig("llama", 512, 64, 96, 2, 4, 1, 16, 256),
    "qwen2-bias": ModelConfig("qwen2", 512, 64, 96, 2, 4, 2, 16, 256, qkv_bias=True),
}
PROMPT = [5, 17, 300, 42, 9, 120, 77, 3]
STEPS = 32
CONTEXT = 64


def _whole(cfg: ModelConfig):
    from graph_executor.loading.loader import _fill_random
    from graph_executor.model import LlamaModel

    model = LlamaModel(cfg, CONTEXT, torch.device("cpu"), torch.float32)
    _fill_random(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("norm") or name.endswith("bias"):
                b.uniform_(0.5, 1.5, generator=gen)
    return model


def _run(model, tokens: list[int]) -> list[torch.Tensor]:
    """Logits of the prompt's last position, then of each of `tokens` decoded in turn."""
    n = len(PROMPT)
    out = [model(torch.tensor(PROMPT), torch.arange(n), torch.tensor([n - 1]), n)[0]]
    for i, t in enumerate(tokens):
        p = n + i
        out.append(model(torch.tensor([t]), torch.tensor([p]), torch.tensor([0]), p + 1)[0])
    return out


def _rank(rank: int, size: int, port: int, name: str, results: str) -> None:
    import torch.distributed as dist

    from graph_executor.tensor_parallel import shard_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        whole = _whole(CONFIGS[name])
        want = _run(whole, [])  # the prompt's logits first, to choose the tokens greedily
        tokens = []
        for _ in range(STEPS):
            tokens.append(int(want[-1].argmax()))
            want = _run(whole, tokens)
        part = shard_model(whole, TensorParallel(rank, size))
        got = _run(part, tokens)
        diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
        scale = max(float(w.abs().max()) for w in want)
        torch.save({"diff": diff, "scale": scale, "steps": len(got)}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_give_the_whole_models_logits(name, tmp_path):
    results = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, _free_port(), name, results), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(f"{results}.{rank}")
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
    assert TensorParallel(1, 2).qkv_rows(cfg).tolist()[:2] == [32, 33]  # query head 2's first row

