"""The GPU path's batched decode (issue 14): batch-M GEMVs (`kernels/gemv_batch.py`), RoPE + KV append and decode
attention reading each row's KV slot from the device, the fused batched step (`FusedBatchDecoder`), and on a GPU the
captured graphs per batch size (`GraphRunner.decode_batch`, padding included) and slot prefills.

Without a GPU the kernels run under the Triton interpreter in float32 against float64 (kernels) or the model's
reference step (`LlamaModel.forward_batch`); the `cuda` tests run float16 on the device against the same reference.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from graph_executor.fused_batch_decoder import FusedBatchDecoder  # noqa: E402
from graph_executor.kernels import gemv_batch  # noqa: E402
from graph_executor.loading.config import ModelConfig  # noqa: E402
from graph_executor.loading.loader import _fill_random  # noqa: E402
from graph_executor.model import LlamaModel  # noqa: E402
from graph_executor.quant.apply import quantize_model  # noqa: E402
from graph_executor.quant.specs import quantize_plan  # noqa: E402
from graph_executor.quant.tiles import DEFAULT_KINDS, DEFAULT_SLOTS, tile_model  # noqa: E402
from graph_executor.runner import ModelRunner  # noqa: E402
from ipc.messages import PromptChunk  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
TOL = dict(rtol=2e-2, atol=2e-2) if DTYPE == torch.float16 else dict(rtol=1e-5, atol=1e-5)
CONFIGS = {
    "mha": ModelConfig("llama", 512, 64, 96, 2, 4, 4, 16, 256),
    "gqa-bias-window": ModelConfig("qwen2", 512, 64, 96, 2, 4, 2, 16, 256, qkv_bias=True, sliding_window=6),
}


@pytest.mark.parametrize("cublas", [False, True], ids=["triton", "cublas"])
@pytest.mark.parametrize("m,n,k", [(1, 40, 100), (3, 64, 256), (5, 33, 130), (16, 48, 64), (19, 20, 70)])
def test_batched_gemvs_match_float64(m, n, k, cublas):
    gen = torch.Generator().manual_seed(m * 1000 + n)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE)

    w, x, a, gu, bias = rnd(n, k), rnd(m, k), rnd(m, k), rnd(m, 2 * k), rnd(n)
    nw = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, DTYPE)
    cfg = gemv_batch.BatchGemvConfig(16, 32, 4, 1, cublas=cublas)
    wd, xd = w.double(), x.double()
    out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float32)
    gemv_batch.rmsnorm_gemm(w, x, nw, 1e-5, out, bias, cfg)
    normed = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()).to(DTYPE).double()
    torch.testing.assert_close(out.double(), normed @ wd.T + bias.double(), **TOL)
    r0 = rnd(m, n)
    r = r0.clone()
    gemv_batch.gemm_residual(w, a, r, cfg)
    torch.testing.assert_close(r.double(), r0.double() + a.double() @ wd.T, **TOL)
    r = r0.clone()
    gemv_batch.silu_gemm_residual(w, gu, r, cfg)
    g, u = gu.double().chunk(2, dim=-1)
    act = (torch.nn.functional.silu(g) * u).to(DTYPE).double()
    torch.testing.assert_close(r.double(), r0.double() + act @ wd.T, **TOL)


def _model(cfg: ModelConfig, slots: int, context: int = 32) -> LlamaModel:
    model = LlamaModel(cfg, context, DEVICE, DTYPE, slots=slots)
    _fill_random(model, seed=0)
    gen = torch.Generator(device=DEVICE).manual_seed(1)  # the same weights in every model built here
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("norm"):
                b.uniform_(0.5, 1.5, generator=gen)  # not all ones: the norm weights enter the products
    return model


def _prefill(model: LlamaModel, prompts: dict[int, list[int]]) -> None:
    for slot, prompt in prompts.items():
        n = len(prompt)
        model(torch.tensor(prompt, device=DEVICE), torch.arange(n, device=DEVICE),
              torch.tensor([n - 1], device=DEVICE), n, slot=slot)


@pytest.mark.parametrize("plan,fuse_rope", [("triton", False), ("cublas", False), ("cublas", True)])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_fused_batched_step_equals_the_reference_step(name, plan, fuse_rope):
    cfg = CONFIGS[name]
    model = _model(cfg, slots=3)
    prompts = {0: list(range(1, 8)), 2: [9, 8, 7], 1: list(range(20, 30))}
    _prefill(model, prompts)
    before = model.kv_caches.clone()
    order = [2, 0, 1]
    tokens = torch.tensor([11, 12, 13], device=DEVICE)
    positions = torch.tensor([len(prompts[s]) for s in order], device=DEVICE)
    want = model.forward_batch(tokens, positions, order).float()
    caches = model.kv_caches.clone()
    model.kv_caches.copy_(before)
    logits = torch.full((3, cfg.vocab_size), float("nan"), device=DEVICE)
    plans = {"cublas": gemv_batch.BatchGemvPlan(), "triton": gemv_batch.TENSOR_CORE}
    decoder = FusedBatchDecoder(model, 4, plan=plans[plan], fuse_rope=fuse_rope)
    decoder.step(tokens, positions, torch.tensor(order, device=DEVICE), logits)
    torch.testing.assert_close(logits, want, **TOL)
    torch.testing.assert_close(model.kv_caches, caches, **TOL)  # each row wrote its own slot, nothing else


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_prompt_into_a_slot_read_from_the_device_equals_the_reference(name):
    """FusedPrefill with the slot read on the device (the extend graphs serve every slot): a prompt from position 0
    and its continuation, into slot 2 of 3, against the reference prefill into that slot; no other slot changes."""
    from graph_executor.fused_prefill import FusedPrefill

    cfg = CONFIGS[name]
    model = _model(cfg, slots=3)
    _prefill(model, {0: list(range(1, 8)), 1: [9, 8, 7]})
    before = model.kv_caches.clone()
    ids = torch.arange(50, 62, device=DEVICE)
    want = []
    for start, n in ((0, 8), (8, 4)):  # 8 tokens, then 4 more continuing them
        want.append(model(ids[start:start + n], torch.arange(start, start + n, device=DEVICE),
                          torch.tensor([n - 1], device=DEVICE), start + n, slot=2)[0].float())
    want_caches = model.kv_caches.clone()
    model.kv_caches.copy_(before)
    prefill = FusedPrefill(model, 16)
    for (start, n), expected in zip(((0, 8), (8, 4)), want):
        logits = torch.full((cfg.vocab_size,), float("nan"), device=DEVICE)
        prefill.run(ids[start:start + n], torch.arange(start, start + n, device=DEVICE),
                    torch.tensor([n - 1], device=DEVICE), logits, from_cache=True,
                    slots=torch.full((n,), 2, device=DEVICE))
        torch.testing.assert_close(logits, expected, **TOL)
    torch.testing.assert_close(model.kv_caches, want_caches, **TOL)
    with pytest.raises(ValueError, match="from_cache"):
        prefill.run(ids[:4], torch.arange(4, device=DEVICE), torch.tensor([3], device=DEVICE), logits,
                    slots=torch.full((4,), 2, device=DEVICE))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_mixed_step_equals_a_prefill_then_a_batched_decode(name):
    """FusedMixedStep: a prompt chunk of slot 1 continuing what its cache holds (7 real rows padded to 16, as a graph
    bucket pads them) and decode rows of slots 2 and 0, in one pass; against the reference prefill of the chunk and
    the reference batched decode. Every logit and every cache row written is compared."""
    from graph_executor.fused_mixed import FusedMixedStep
    from graph_executor.fused_prefill import FusedPrefill

    cfg = CONFIGS[name]
    model = _model(cfg, slots=3)
    prompts = {0: list(range(1, 8)), 2: [9, 8, 7], 1: list(range(20, 30))}
    _prefill(model, prompts)
    chunk_ids, start = [40, 41, 42, 43, 44, 45, 46], len(prompts[1])
    before = model.kv_caches.clone()
    # the reference: the chunk as a prefill of slot 1 from `start`, then the decode rows
    n = len(chunk_ids)
    want_logits = model(torch.tensor(chunk_ids, device=DEVICE), torch.arange(start, start + n, device=DEVICE),
                        torch.tensor([n - 1], device=DEVICE), start + n, slot=1)[0].float()
    order, tokens = [2, 0], torch.tensor([11, 12], device=DEVICE)
    positions = torch.tensor([len(prompts[s]) for s in order], device=DEVICE)
    want_batch = model.forward_batch(tokens, positions, order).float()
    want_caches = model.kv_caches.clone()
    model.kv_caches.copy_(before)
    bucket = 16
    ids = torch.tensor(chunk_ids + [0] * (bucket - n) + tokens.tolist(), device=DEVICE)
    rows_pos = torch.cat([torch.arange(start, start + bucket, device=DEVICE), positions])
    rows_slot = torch.tensor([1] * bucket + order, device=DEVICE)
    logits = torch.full((cfg.vocab_size,), float("nan"), device=DEVICE)
    batch_logits = torch.full((2, cfg.vocab_size), float("nan"), device=DEVICE)
    step = FusedMixedStep(FusedPrefill(model, 32), 4)
    step.run(ids, rows_pos, rows_slot, bucket, torch.tensor([n - 1], device=DEVICE), [logits], batch_logits)
    torch.testing.assert_close(logits, want_logits, **TOL)
    torch.testing.assert_close(batch_logits, want_batch, **TOL)
    written = model.kv_caches.clone()
    written[1, :, :, :, start + n:start + bucket] = want_caches[1, :, :, :, start + n:start + bucket]  # padding rows
    torch.testing.assert_close(written, want_caches, **TOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_mixed_step_of_two_chunks_equals_their_prefills_then_a_batched_decode(name):
    """FusedMixedStep with two prompt chunks (prompts arriving together): slot 1 continuing its cache (7 tokens) and
    slot 3 from position 0 (5 tokens), each padded to 16 rows, with decode rows of slots 2 and 0; against the
    reference prefills and batched decode, every logit and cache row compared."""
    from graph_executor.fused_mixed import FusedMixedStep
    from graph_executor.fused_prefill import FusedPrefill

    cfg = CONFIGS[name]
    model = _model(cfg, slots=4)
    prompts = {0: list(range(1, 8)), 2: [9, 8, 7], 1: list(range(20, 30))}
    _prefill(model, prompts)
    chunks = {1: ([40, 41, 42, 43, 44, 45, 46], len(prompts[1])), 3: ([60, 61, 62, 63, 64], 0)}  # slot: ids, start
    before = model.kv_caches.clone()
    want_chunk = {}
    for slot, (chunk_ids, start) in chunks.items():
        n = len(chunk_ids)
        want_chunk[slot] = model(torch.tensor(chunk_ids, device=DEVICE), torch.arange(start, start + n, device=DEVICE),
                                 torch.tensor([n - 1], device=DEVICE), start + n, slot=slot)[0].float()
    order, tokens = [2, 0], torch.tensor([11, 12], device=DEVICE)
    positions = torch.tensor([len(prompts[s]) for s in order], device=DEVICE)
    want_batch = model.forward_batch(tokens, positions, order).float()
    want_caches = model.kv_caches.clone()
    model.kv_caches.copy_(before)
    bucket, ids, rows_pos, rows_slot, last = 16, [], [], [], []
    for i, (slot, (chunk_ids, start)) in enumerate(chunks.items()):
        ids += chunk_ids + [0] * (bucket - len(chunk_ids))
        rows_pos += list(range(start, start + bucket))
        rows_slot += [slot] * bucket
        last.append(i * bucket + len(chunk_ids) - 1)
    ids = torch.tensor(ids + tokens.tolist(), device=DEVICE)
    rows_pos = torch.cat([torch.tensor(rows_pos, device=DEVICE), positions])
    rows_slot = torch.tensor(rows_slot + order, device=DEVICE)
    chunk_logits = torch.full((2, cfg.vocab_size), float("nan"), device=DEVICE)
    batch_logits = torch.full((2, cfg.vocab_size), float("nan"), device=DEVICE)
    FusedMixedStep(FusedPrefill(model, 64), 4).run(ids, rows_pos, rows_slot, bucket, torch.tensor(last, device=DEVICE),
                                                   [chunk_logits[0], chunk_logits[1]], batch_logits)
    torch.testing.assert_close(chunk_logits[0], want_chunk[1], **TOL)
    torch.testing.assert_close(chunk_logits[1], want_chunk[3], **TOL)
    torch.testing.assert_close(batch_logits, want_batch, **TOL)
    written = model.kv_caches.clone()
    for slot, (chunk_ids, start) in chunks.items():  # padding rows write past each prompt: no valid row sees them
        n = len(chunk_ids)
        written[slot, :, :, :, start + n:start + bucket] = want_caches[slot, :, :, :, start + n:start + bucket]
    torch.testing.assert_close(written, want_caches, **TOL)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_the_batched_and_mixed_steps_over_packed_weights_equal_the_reference(method):
    """Packed weights (as `--quantize` or a GGUF kept packed leave them) through the batched decode and the mixed
    step: the low-bit GEMM for the few rows, against the reference steps on the same packed model (which dequantize
    per use), every logit compared."""
    from graph_executor.fused_mixed import FusedMixedStep
    from graph_executor.fused_prefill import FusedPrefill

    cfg = CONFIGS["gqa-bias-window"]
    model = _model(cfg, slots=3)
    quantize_model(model, quantize_plan(method, 32, cfg), progress=False, keep_packed=True)
    assert not isinstance(model.layers[0].down_proj, torch.Tensor) and not isinstance(model.lm_head, torch.Tensor)
    if method != "int8":  # o_proj and down_proj tile-major, as the loader leaves them on a GPU (int8: row-major)
        assert tile_model(model, DEFAULT_SLOTS, DEFAULT_KINDS)
    prompts = {0: list(range(1, 8)), 2: [9, 8, 7], 1: list(range(20, 30))}
    _prefill(model, prompts)
    before = model.kv_caches.clone()
    order, tokens = [2, 0], torch.tensor([11, 12], device=DEVICE)
    positions = torch.tensor([len(prompts[s]) for s in order], device=DEVICE)
    want = model.forward_batch(tokens, positions, order).float()
    model.kv_caches.copy_(before)
    logits = torch.full((2, cfg.vocab_size), float("nan"), device=DEVICE)
    FusedBatchDecoder(model, 4).step(tokens, positions, torch.tensor(order, device=DEVICE), logits)
    torch.testing.assert_close(logits, want, **TOL)
    model.kv_caches.copy_(before)
    start, chunk = len(prompts[1]), [40, 41, 42]
    want_chunk = model(torch.tensor(chunk, device=DEVICE), torch.arange(start, start + 3, device=DEVICE),
                       torch.tensor([2], device=DEVICE), start + 3, slot=1)[0].float()
    model.kv_caches.copy_(before)
    ids = torch.tensor(chunk + [0] * 13 + tokens.tolist(), device=DEVICE)
    rows_pos = torch.cat([torch.arange(start, start + 16, device=DEVICE), positions])
    rows_slot = torch.tensor([1] * 16 + order, device=DEVICE)
    chunk_logits = torch.full((cfg.vocab_size,), float("nan"), device=DEVICE)
    logits.fill_(float("nan"))
    FusedMixedStep(FusedPrefill(model, 32), 4).run(ids, rows_pos, rows_slot, 16, torch.tensor([2], device=DEVICE),
                                                   [chunk_logits], logits)
    # float32: the packed lm_head's GEMV (the chunk's row) and the reference's dequantized product round apart by
    # ~1e-5 on single logits; norm-relative, as test_quant_model compares the packed steps
    assert float((chunk_logits - want_chunk).norm() / want_chunk.norm()) < (1e-4 if DTYPE == torch.float32 else 2e-2)
    torch.testing.assert_close(logits, want, **TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_decode_graphs_and_slot_prefills_equal_the_reference(name):
    """GraphRunner with 4 slots: prefill each slot (slot 0 by its prefill graph, the others by the extend graphs, a
    40-token prompt in two chunks), then batched decode steps of 1..4 sequences (size 3 padded to 4) replayed from
    captured graphs, some carrying a prompt chunk of another slot (mixed steps, chunks of 7 and 20 tokens; one of 40,
    past the mixed buckets, runs as a prefill and then the decode), two chunks of other slots at once (a 2-chunk mixed
    step, run eagerly then captured) and three (too wide for one step: the last runs as its prefill first), against
    ModelRunner on a copy of the weights, every chunk's logits compared."""
    from graph_executor.graphs import GraphRunner

    cfg = CONFIGS[name]
    model, ref = _model(cfg, slots=4, context=64), _model(cfg, slots=4, context=64)
    graphs, eager = GraphRunner(model), ModelRunner(ref)
    assert graphs.batch_sizes == (1, 2, 4)
    assert "mixed_2x16_4" in graphs.pending()  # 2 x 16 rows fit a 32-row step: captured while idle, like the others
    for name in graphs.pending():
        if name != "mixed_2x16_4":  # left for later: the steps before it is captured
            graphs.capture(name)
    assert {"decode_batch_1", "decode_batch_2", "decode_batch_4", "prefill_16", "extend_16", "extend_32",
            "mixed_16_4", "mixed_32_4"} <= set(graphs.graphs)
    assert graphs.mixed_sizes == (4,)  # a mixed step's decode rows are padded to one size
    assert not any("@" in name for name in graphs.graphs)  # no graph is per slot: slots are read on the device
    prompts = {0: list(range(3, 20)), 1: [5, 6, 7], 2: list(range(40, 80)), 3: [9]}
    for runner in (graphs, eager):
        for slot, prompt in prompts.items():
            runner.buffers.slot_ids(slot)[:len(prompt)].copy_(torch.tensor(prompt))
            runner.prefill(len(prompt), 0, slot)
    torch.testing.assert_close(graphs.buffers.logits, eager.buffers.logits, **TOL)  # the last slot's prompt
    lengths = {s: len(p) for s, p in prompts.items()}
    steps = [([0, 1, 2, 3], []), ([2, 0, 3], []), ([1], []), ([0, 1, 2], [(3, 7)]), ([3, 1], []),
             ([3], [(1, 20)]), ([0, 2, 1], []),
             ([0, 2], [(3, 40)]),  # 40 > the largest bucket (32): its prefill (extend steps of 32 and 8), then the decode
             # 2 chunks of 16 rows: before their graph is captured the second runs as a prefill first, then both
             # ride the 2-chunk graph
             ([1], [(0, 5), (2, 6)]), ([1], [(0, 4), (2, 3)]),
             ([3], [(1, 9), (0, 3), (2, 2)])]  # 3 x 16 rows > 32: the last chunk's prefill, then a 2-chunk step
    # (decode slots, [(chunk slot, chunk tokens), ...])
    for step, (batch, chunk_list) in enumerate(steps):
        positions = [lengths[s] for s in batch]
        chunks = []
        for slot, count in chunk_list:
            chunks.append(PromptChunk(count, lengths[slot], slot))
            lengths[slot] += count
        for runner in (graphs, eager):
            for s in batch:
                runner.buffers.next_token[s] = 100 + 10 * step + s
            for i, chunk in enumerate(chunks):
                ids = torch.arange(chunk.num_tokens) + 200 + 10 * step + i
                runner.buffers.slot_ids(chunk.slot)[chunk.start_pos:chunk.start_pos + chunk.num_tokens].copy_(ids)
            runner.decode_batch(batch, positions, chunks)
        torch.cuda.synchronize()
        torch.testing.assert_close(graphs.buffers.batch_logits[:len(batch)], eager.buffers.batch_logits[:len(batch)],
                                   **TOL, msg=lambda m: f"step {step}, decode rows: {m}")
        for i in range(len(chunks)):
            torch.testing.assert_close(graphs.buffers.chunk_logits(i), eager.buffers.chunk_logits(i), **TOL,
                                       msg=lambda m: f"step {step}, chunk {i}: {m}")
        for s in batch:
            lengths[s] += 1
        if step == 8:  # captured while idle, once its logits are read (a capture's warm-up writes the step's outputs)
            assert "mixed_2x16_4" not in graphs.graphs and "mixed_2x16_4" in graphs.pending()
            graphs.capture("mixed_2x16_4")
    graphs.capture_all()  # every shape the steps asked for has a graph: nothing is left pending, nothing fails
    assert not graphs.pending() and "mixed_2x16_4" in graphs.graphs
    for s, length in lengths.items():  # past a sequence's length the graphs' padding rows leave values of their own
        torch.testing.assert_close(model.kv_caches[s, :, :, :, :length], ref.kv_caches[s, :, :, :, :length], **TOL)


def test_mixed_graph_names_count_their_chunks():
    """A graph's body is built from its name (a "mixed_<bucket>" demand key once passed for a several-chunk shape:
    "mixed" holds an x)."""
    from graph_executor.graphs import _chunk_count

    assert [_chunk_count(n) for n in ("mixed_128", "mixed_16_4", "mixed_2x16_4", "mixed_3x64_4", "extend_16",
                                      "decode_batch_4")] == [1, 1, 2, 3, 0, 0]
