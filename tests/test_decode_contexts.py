"""The decode step's attention grid sized for a context bucket (`DecodeAttention.__call__(context=)`,
`FusedDecoder.step(context=)`, the graph runner's "decode_ctx<C>" graphs): launching only the splits that can hold
keys changes no output or cache element. Under TRITON_INTERPRET=1 on a machine without a GPU; the graphs on a GPU."""

from __future__ import annotations

import os
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.graphs import ARGMAX_GRAPH, GraphRunner, decode_contexts  # noqa: E402
from graph_executor.kernels.decode_attention import DecodeAttention  # noqa: E402
from tests.test_rope_in_attention import DEVICE, attention_runs, tables  # noqa: E402

CASES = [  # heads, kv_heads, head_dim, cache, window, dtype, split, options
    (4, 2, 64, 256, None, torch.float32, None, {}),  # a reduce kernel after the splits
    (9, 3, 64, 256, None, torch.float16, None, dict(fused_reduce=True)),  # the last program combines
    (9, 3, 64, 256, None, torch.float16, None, dict(fused_reduce=True, kv_early=True)),
    (8, 2, 64, 256, None, torch.float16, 32, dict(fused_reduce=True, early_position=True)),
    (4, 2, 64, 256, 40, torch.float16, None, dict(fused_reduce=True)),  # a sliding window
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_grid_for_the_context_gives_the_same_bits(case) -> None:
    """Per position (a split's last, one inside a later split, the cache's last) and per context that holds it (the
    least, a split boundary above, twice the cache: programs past the cache's splits): the output and the cache
    equal the whole cache's grid's, with RoPE inside and (where the options allow) outside; poisoned outputs and
    workspaces first, the split combine's counts back at zero."""
    heads, kv_heads, hd, cache, window, dtype, split, options = CASES[case]
    size = split or 64
    runs = attention_runs((heads, kv_heads, hd, cache, window, dtype, split, options),
                          (size - 1, 2 * size + 5, cache - 1), case,
                          lambda pos: [({}, dict(context=context))  # None: the cache's splits
                                       for context in (None, pos + 1, (pos // size + 2) * size, 2 * cache)],
                          plain_q=not options.get("kv_early"))  # rope_append's q: the plain one-query kernel
    for pos, got in runs:
        for context_run in got[1:]:
            for a, b in zip(got[0], context_run, strict=True):
                assert torch.isfinite(b).all() and torch.equal(a, b), f"pos {pos}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's 0 / 0 where a short grid holds no keys
@pytest.mark.parametrize("case", [1, 2, 3])
def test_a_position_past_the_context_leaves_the_workspace_ready(case) -> None:
    """A call whose grid stops short of its position (a graph's warm-up at the cache's last row) must leave the split
    combine's counts at zero, with the split combine counting all programs, only those holding keys (kv_early,
    early_position), and none launched holding keys (a sliding window past the grid): the next call is right."""
    heads, kv_heads, hd, cache, _, dtype, split, options = CASES[case]
    gen = torch.Generator().manual_seed(50 + case)
    rope = tables(heads, kv_heads, hd, cache)
    kv = torch.randn(2, kv_heads, cache, hd, generator=gen).to(DEVICE, dtype)
    for window in (None, 40):
        attn = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                               **options)
        fresh = DecodeAttention(heads, kv_heads, hd, cache, DEVICE, sliding_window=window, split_size=split,
                                **options)
        qkv = torch.randn((heads + 2 * kv_heads) * hd, generator=gen).to(DEVICE, dtype)
        for pos, context in ((cache - 1, 64), (cache - 1, 192), (130, 100)):
            attn(qkv, kv.clone()[0], kv.clone()[1], torch.tensor([pos], device=DEVICE),
                 torch.empty(heads, hd, device=DEVICE, dtype=dtype), rope=rope, context=context)
            assert not attn.counts.any(), (window, pos, context)
        got = []
        for a in (attn, fresh):
            mine = kv.clone()
            out = torch.full((heads, hd), float("nan"), device=DEVICE, dtype=dtype)
            a(qkv, mine[0], mine[1], torch.tensor([150], device=DEVICE), out, rope=rope, context=192)
            got.append(out)
        assert torch.isfinite(got[0]).all() and torch.equal(got[0], got[1]), window


def test_a_context_is_for_one_query_per_token() -> None:
    attn = DecodeAttention(4, 2, 64, 128, DEVICE)
    q, kv = torch.zeros(4, 64, device=DEVICE), torch.zeros(2, 2, 128, 64, device=DEVICE)
    with pytest.raises(ValueError, match="context"):
        attn(q, kv[0], kv[1], torch.tensor([3], device=DEVICE), torch.empty_like(q), context=0)
    verify = DecodeAttention(4, 2, 64, 128, DEVICE, max_tokens=3)
    q3 = torch.zeros(3, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="verify"):
        verify(q3, kv[0], kv[1], torch.tensor([3, 4, 5], device=DEVICE), torch.empty_like(q3), context=64)


def test_a_decode_step_for_a_context_gives_the_same_logits(tmp_path) -> None:
    """FusedDecoder.step(context=): two steps' logits and the cache after them equal the whole grid's, bit for bit,
    with RoPE inside and outside the attention (a tiny Llama with grouped KV heads, a 160-position cache)."""
    import transformers

    from tests.test_model_equivalence import load_hf_model
    from tests.test_pending_residual import steps

    model = load_hf_model(tmp_path, transformers.LlamaConfig, dict(num_key_value_heads=2, num_hidden_layers=2), 13,
                          str(DEVICE), max_context=160)
    prompt = torch.arange(1, 71, device=DEVICE)
    model(prompt, torch.arange(70, device=DEVICE), torch.tensor([69], device=DEVICE), 70)
    before = model.kv_cache.clone()
    for fuse in (False, True):
        runs = {}
        for context in (None, 73, 320):  # 2 of the cache's 3 splits, then 5 (two past the cache)
            model.kv_cache.copy_(before)
            runs[context] = steps(model, dict(fuse_rope=fuse), 2, 70, context=context)
        for context in (73, 320):
            for a, b in zip(runs[None][0], runs[context][0], strict=True):
                assert torch.isfinite(b).all() and torch.equal(a, b), (fuse, context)
            assert torch.equal(runs[None][1], runs[context][1])


def test_the_context_buckets_and_the_graph_a_position_takes() -> None:
    """decode_contexts: from 512, doubling, below the cache; `_decode_graph`: the smallest captured bucket holding the
    position, else the whole cache's graph, else None (the step runs eagerly)."""
    assert decode_contexts(512) == ()
    assert decode_contexts(4096) == (512, 1024, 2048)
    assert decode_contexts(5000) == (512, 1024, 2048, 4096)
    runner = types.SimpleNamespace(decode_contexts=(512, 1024, 2048), graphs={})
    pick = GraphRunner._decode_graph
    assert pick(runner, "decode", 10) is None
    runner.graphs = dict.fromkeys(["decode", "decode_ctx1024", ARGMAX_GRAPH])
    assert pick(runner, "decode", 10) == "decode_ctx1024"  # 512's graph not captured yet
    assert pick(runner, "decode", 1023) == "decode_ctx1024"
    assert pick(runner, "decode", 1024) == "decode"
    assert pick(runner, ARGMAX_GRAPH, 10) == ARGMAX_GRAPH
    runner.graphs.update(dict.fromkeys(["decode_ctx512", f"{ARGMAX_GRAPH}_ctx2048"]))
    assert pick(runner, "decode", 511) == "decode_ctx512"
    assert pick(runner, "decode", 512) == "decode_ctx1024"
    assert pick(runner, ARGMAX_GRAPH, 1500) == f"{ARGMAX_GRAPH}_ctx2048"
    assert pick(runner, ARGMAX_GRAPH, 2048) == ARGMAX_GRAPH


class _Recorded:
    """A captured graph whose replays are written down by name (what `GraphRunner.decode` really replayed)."""

    def __init__(self, name: str, graph, log: list[str]) -> None:
        self.name, self.graph, self.log = name, graph, log

    def replay(self) -> None:
        self.log.append(self.name)
        self.graph.replay()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("max_context,argmax_graph", [(2048, True), (4096, False)])
def test_on_a_gpu_the_context_graphs_give_the_whole_cache_s_tokens(max_context, argmax_graph) -> None:
    """A GraphRunner with every decode graph captured (each warm-up at the cache's last row, past a bucket graph's
    grid: SmolLM2's attention combines its splits in-kernel with kv_early, so a counter left non-zero would spoil
    every later step): greedy decodes that cross the 512 and 1024 buckets' edges (Decode.argmax's graphs, or the
    plain graph and the argmax kernel after it, as a draft or tensor-parallel runner has it) and plain decodes give
    the tokens and logits of a runner with only the whole cache's graphs, and replay the bucket graphs on the way."""
    from graph_executor.loading.loader import LoadConfig, load_model

    model = load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float16", max_context=max_context,
                                  progress=False)).model
    before = model.kv_cache.clone()
    runs = {}
    for buckets in (False, True):
        model.kv_cache.copy_(before)
        graphs = GraphRunner(model, argmax_graph=argmax_graph)
        names = graphs._decode_graphs()
        bases = 1 + argmax_graph
        assert len(names) == bases * (1 + len(graphs.decode_contexts)) and graphs.decode_contexts[:2] == (512, 1024)
        replayed: list[str] = []
        for name in names if buckets else names[:bases]:
            graphs.capture(name)
            graphs.graphs[name] = _Recorded(name, graphs.graphs[name], replayed)
        assert not graphs.decoder.attention.counts.any()
        tokens, logits = [], []
        graphs.buffers.token.fill_(7)
        for position in range(500, 530):  # greedy: the token fed back on the device
            graphs.decode(position, argmax=True)
            tokens.append(graphs.buffers.token.clone())
        for position in range(1020, 1030):  # plain decodes, the token from the host's side
            graphs.buffers.token.fill_(position % 97)
            graphs.decode(position)
            logits.append(graphs.buffers.logits.clone())
        torch.cuda.synchronize()
        runs[buckets] = (torch.stack(tokens), torch.stack(logits), model.kv_cache.clone(), set(replayed))
    argmax = ARGMAX_GRAPH if argmax_graph else "decode"
    past_1024 = "decode_ctx2048" if max_context > 2048 else "decode"  # positions 1024-1029
    assert runs[True][3] == {f"{argmax}_ctx512", f"{argmax}_ctx1024", "decode_ctx1024", past_1024}
    assert runs[False][3] == {argmax, "decode"}
    for a, b in zip(runs[False][:3], runs[True][:3], strict=True):
        assert torch.equal(a, b)
