"""The prefill's dequantizing passes on a second stream (graph_executor/dequantize_ahead.py): the same logits bit
for bit as the passes on the step's stream, eagerly and in a CUDA graph; clear errors for misuse."""

from __future__ import annotations

import pytest
import torch

from graph_executor.dequantize_ahead import DequantizeAhead
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.kernels.projections import DequantizeRows, dequantizes
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.quant.formats import Int4Groups


def _packed(n: int = 64, k: int = 64, device: str = "cpu") -> Int4Groups:
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scale = torch.rand(n, k // 32, dtype=torch.float16, device=device)
    return Int4Groups(codes=codes, scale=scale, offset=None, group=32)


def test_allocate_rejects_what_it_cannot_serve() -> None:
    w = _packed()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        DequantizeAhead.allocate([w], torch.float16, torch.device("cpu"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="depth must be >= 2"):
            DequantizeAhead.allocate([w.to("cuda")], torch.float16, torch.device("cuda"), depth=1)
        with pytest.raises(ValueError, match="no packed weights"):
            DequantizeAhead.allocate([], torch.float16, torch.device("cuda"))


def test_dequantizes_follows_the_rows_and_the_format() -> None:
    w = _packed()
    rows = DequantizeRows(int4=128, int8=160, fp8=224)
    assert not dequantizes(127, w, dequantize_rows=rows)
    assert dequantizes(128, w, dequantize_rows=rows)
    assert not dequantizes(4096, torch.zeros(4, 4), dequantize_rows=rows)  # dense: nothing to dequantize


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_ahead_gives_the_same_logits_as_in_stream(method: str) -> None:
    from bench.probes.verify_plan import graphed

    loaded = load_model(LoadConfig(model="dummy:smollm2-135m", device="cuda", dtype="float16", max_context=512,
                                   quantize=method, progress=False))
    model, device = loaded.model, torch.device("cuda")
    always = DequantizeRows(1, 1, 1)
    steps = {a: FusedPrefill(model, 300, dequantize_rows=always, dequantize_ahead=a) for a in (0, 2, 3)}
    assert steps[0].ahead is None and len(steps[3].ahead.buffers) == 3
    gen = torch.Generator().manual_seed(7)
    for t in (17, 160, 300):
        ids = torch.randint(0, model.config.vocab_size, (t,), generator=gen).to(device)
        positions = torch.arange(t, device=device)
        index = torch.tensor([t - 1], device=device)
        outs = {}
        for a, step in steps.items():
            eager = torch.full((model.config.vocab_size,), float("nan"), device=device)
            step.run(ids, positions, index, eager)
            replayed = torch.full_like(eager, float("nan"))
            graph = graphed(lambda s=step, o=replayed: s.run(ids, positions, index, o))
            replayed.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(eager).all() and torch.isfinite(replayed).all()  # every logit written
            outs[a] = (eager, replayed)
        for a in (2, 3):  # the same kernels in another order: the same bits
            assert torch.equal(outs[a][0], outs[0][0]), (t, a)
            assert torch.equal(outs[a][1], outs[0][1]), (t, a)


@pytest.mark.cuda
def test_weights_taken_out_of_order_or_left_are_errors() -> None:
    ws = [_packed(device="cuda") for _ in range(3)]
    ahead = DequantizeAhead.allocate(ws, torch.float16, torch.device("cuda"))
    run = ahead.begin(ws)
    with pytest.raises(ValueError, match="out of order"):
        run.take(1)
    dense = run.take(0)
    assert torch.equal(dense, ws[0].dequantize(torch.float32).to(torch.float16))
    run.release(0)
    with pytest.raises(ValueError, match="never taken"):
        run.finish()
