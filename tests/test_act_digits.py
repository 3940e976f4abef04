"""Activation digits made by the residual's reduce kernel (graph_executor/kernels/act_digits.py): a packed GEMV
that reads them gives what it gives forming its own (float32 rounding apart: the sum of squares is added in
another order), every output checked, int4 and int8 consumers, offsets or none, groups of 16 and 32, an activation
length that is not a whole number of reduce blocks; buffers poisoned first, so every element the consumer reads is
one the producer wrote; calls the digits do not fit are refused; the fused decode step with them equals the one
without. On CPU under the Triton interpreter (dp4a emulated)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graph_executor.kernels import gemv_splitk
from graph_executor.kernels.act_digits import ActDigits
from graph_executor.kernels.gemv_splitk import DigitsOut, SplitKConfig, SplitKScratch
from tests.test_gemv_splitk import rel, weight

CPU = torch.device("cpu")
PRODUCER = SplitKConfig(32, 16, 4, reduce_kernel=True)  # a residual call over int4 codes [hidden, 256]


def poisoned(d: ActDigits) -> ActDigits:
    d.words.fill_(0x5A5A5A5A)
    for t in (d.amax, d.sums, d.sumsq):
        t.fill_(float("nan"))
    return d


SERVE_CASES = [  # consumer bits, group, symmetric, hidden (the producer's N, the consumer's K), consumer config
    (4, 32, False, 512, SplitKConfig(32, 64, 4, reduce_kernel=True)),
    (4, 16, True, 320, SplitKConfig(16, 32, 2, reduce_kernel=True)),
    (8, 32, True, 512, SplitKConfig(32, 128, 4, reduce_kernel=True)),
    (8, 16, False, 320, SplitKConfig(16, 64, 2, reduce_kernel=True)),
]


@pytest.mark.parametrize("bits, group, symmetric, hidden, consumer", SERVE_CASES)
@pytest.mark.parametrize("silu", [False, True])
def test_the_reduce_kernels_digits_serve_the_next_gemv(bits, group, symmetric, hidden, consumer, silu) -> None:
    serve_check(CPU, bits, group, symmetric, hidden, consumer, silu, rows=48)


@pytest.mark.cuda
def test_the_reduce_kernels_digits_serve_the_next_gemv_on_the_gpu() -> None:
    """The CPU cases, then LLaMA-2-7B's o_proj writing gate_up's digits with the shipped int4 configs (PDL)."""
    from graph_executor.fused_decoder import INT4_PLAN

    cuda = torch.device("cuda")
    for case in SERVE_CASES:
        for silu in (False, True):
            serve_check(cuda, *case, silu, rows=48)
    pdl = dataclasses.replace(INT4_PLAN.gate_up, pdl=True)
    serve_check(cuda, 4, 32, False, 4096, pdl, False, rows=22016, producer_k=4096,
                producer_cfg=dataclasses.replace(INT4_PLAN.o, pdl=True))


def serve_check(device, bits, group, symmetric, hidden, consumer, silu, rows, producer_k=256,
                producer_cfg=PRODUCER) -> None:
    producer = weight(4, hidden, producer_k, 32, False, device, 1)
    reader = weight(bits, rows, hidden, group, symmetric, device, 2)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2 * producer_k if silu else producer_k, generator=g).to(device)
    x0 = torch.randn(hidden, generator=g).to(device)
    x0[:40] *= 30  # a group with a large value beside small ones
    nw = (torch.rand(hidden, generator=g) + 0.5).to(device)
    bias = torch.randn(rows, generator=g).to(device)
    scratch = SplitKScratch.allocate([producer, reader], [producer_cfg, consumer], device)
    digits = poisoned(ActDigits.allocate(hidden, bits == 4, group, device))
    x = x0.clone()
    call = gemv_splitk.silu_gemv_residual if silu else gemv_splitk.gemv_residual
    call(producer, a, x, scratch, producer_cfg, digits_out=DigitsOut(digits, nw))
    expect = x0.clone()
    call(producer, a, expect, scratch, producer_cfg)
    assert torch.equal(x, expect)  # the residual itself is the same with the digits written after it
    got = torch.full((rows,), float("nan"), device=device)
    gemv_splitk.rmsnorm_gemv(reader, x, nw, 1e-5, got, scratch, bias=bias, cfg=consumer, digits=digits)
    own = torch.full((rows,), float("nan"), device=device)
    gemv_splitk.rmsnorm_gemv(reader, x, nw, 1e-5, own, scratch, bias=bias, cfg=consumer)
    assert not got.isnan().any()
    assert rel(got, own) < (1e-6 if device.type == "cpu" else 1e-5), rel(got, own)
    xd = x.double()
    ref = reader.dequantize(torch.float64) @ (xd * nw.double()) / torch.sqrt((xd * xd).mean() + 1e-5) + bias.double()
    assert rel(got, ref) < 1e-4
    assert torch.equal(scratch.count, torch.zeros_like(scratch.count))


def test_digits_that_do_not_fit_are_refused() -> None:
    int4 = weight(4, 32, 512, 32, False, CPU, 4)
    int8 = weight(8, 32, 512, 32, True, CPU, 5)
    cfg = SplitKConfig(32, 64, 4, reduce_kernel=True)
    scratch = SplitKScratch.allocate([int4, int8, int4], [cfg, cfg, SplitKConfig(32, 16, 4)], CPU)
    d4 = ActDigits.allocate(512, True, 32, CPU)
    x, nw, out = torch.randn(512, device=CPU), torch.ones(512, device=CPU), torch.empty(32, device=CPU)
    with pytest.raises(ValueError, match="do not serve"):  # int4 digits to an int8 GEMV
        gemv_splitk.rmsnorm_gemv(int8, x, nw, 1e-5, out, scratch, cfg=cfg, digits=d4)
    with pytest.raises(ValueError, match="do not serve"):  # slices of 128 activations: not whole reduce blocks
        gemv_splitk.rmsnorm_gemv(int4, x, nw, 1e-5, out, scratch, cfg=SplitKConfig(32, 16, 4), digits=d4)
    with pytest.raises(ValueError, match="reduce kernel"):  # the fixup path writes no digits
        gemv_splitk.gemv_residual(int4, x, torch.zeros(32, device=CPU), scratch, SplitKConfig(32, 64, 4),
                                  digits_out=DigitsOut(ActDigits.allocate(32, True, 32, CPU), nw[:32]))
    with pytest.raises(ValueError, match="whole groups"):
        ActDigits.allocate(100, True, 32, CPU)
    from graph_executor.kernels.projections import rmsnorm_gemv
    with pytest.raises(ValueError, match="packed int4/int8 GEMVs only"):
        rmsnorm_gemv(torch.randn(32, 512, device=CPU), x, nw, 1e-5, out, digits=d4)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_a_decode_step_with_producer_digits_equals_the_one_without(tmp_path, method: str) -> None:
    """FusedDecoder(producer_digits=True) on a tiny packed model: o's and down's reduce kernels write the digits
    gate_up, the next qkv and the lm_head read; every logit within float32 rounding of the plain step, two steps."""
    decode_check(CPU, tmp_path, method)


@pytest.mark.cuda
def test_a_decode_step_with_producer_digits_equals_the_one_without_on_the_gpu(tmp_path) -> None:
    for method in ("int4", "int8"):
        decode_check(torch.device("cuda"), tmp_path / method, method)


def decode_check(device: torch.device, tmp_path, method: str) -> None:
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.loading.loader import LoadConfig, load_model
    from graph_executor.quant.apply import quantize_model
    from graph_executor.quant.specs import quantize_plan
    from tests.test_model_equivalence import make_hf_model

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=31).save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device=str(device), dtype="float32", max_context=32,
                                  progress=False, tile_packed=False)).model
    quantize_model(model, quantize_plan(method, 32, model.config), progress=False, keep_packed=True)
    plain, fed = FusedDecoder(model), FusedDecoder(model, producer_digits=True)
    layers = len(model.layers)
    assert all(d["o"] is not None and d["gate_up"] is not None and d["down"] is not None for d in fed.digits)
    assert all(fed.digits[i]["qkv"] is not None for i in range(1, layers)) and fed.digits[0]["qkv"] is None
    assert all(v is None for d in plain.digits for v in d.values()) and plain.lm_head_digits is None
    cache = model.kv_cache.clone()
    for position, token in ((3, 7), (4, 200)):
        t, p = torch.tensor([token], device=device), torch.tensor([position], device=device)
        want = torch.full((model.config.vocab_size,), float("nan"), device=device)
        plain.step(t, p, want)
        after = model.kv_cache.clone()
        model.kv_cache.copy_(cache)
        got = torch.full_like(want, float("nan"))
        fed.step(t, p, got)
        assert rel(model.kv_cache, after) < 1e-5  # the later layers' K and V from digits read, too
        assert rel(got, want) < 1e-5, rel(got, want)
        cache = model.kv_cache.clone()
