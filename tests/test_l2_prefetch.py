"""Weights prefetched into L2 by the decode attention kernel (kernels/l2_prefetch.py): the plan on any machine, and on
a GPU (sm_90+) that a step with the prefetch gives the same bits as without (a prefetch reads weights only and
returns nothing)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from graph_executor.kernels import l2_prefetch  # noqa: E402
from graph_executor.kernels.decode_attention import DecodeAttention  # noqa: E402
from graph_executor.kernels.l2_prefetch import CHUNK_BYTES, MAX_REGIONS, plan  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass(frozen=True)
class Packed:  # a packed weight's shape of fields: tensors and plain numbers
    codes: torch.Tensor
    scales: torch.Tensor
    group: int


def test_the_plan_takes_whole_chunks_in_order_up_to_the_budget() -> None:
    a = torch.zeros(3 * CHUNK_BYTES // 2 + 100, dtype=torch.float16)  # 3 chunks and a tail
    b = torch.zeros(10 * CHUNK_BYTES, dtype=torch.uint8)
    got = plan([a, b], 5 * CHUNK_BYTES + 7)
    assert [(t.data_ptr(), t.dtype, n) for t, n in got.regions] == [(a.data_ptr(), torch.uint8, 3),
                                                                    (b.data_ptr(), torch.uint8, 2)]
    assert got.nbytes == 5 * CHUNK_BYTES and got.regions[0][0].numel() == a.numel() * 2
    assert plan([a, b], CHUNK_BYTES - 1) is None and plan([], 1 << 30) is None
    with pytest.raises(ValueError, match="budget_bytes"):
        plan([a], -1)


def test_the_plan_reads_a_packed_weights_tensors_and_stops_at_max_regions() -> None:
    packed = Packed(torch.zeros(2 * CHUNK_BYTES, dtype=torch.uint8), torch.zeros(CHUNK_BYTES, dtype=torch.float16), 32)
    assert l2_prefetch.weight_storages(packed) == [packed.codes, packed.scales]
    dense = [torch.zeros(CHUNK_BYTES, dtype=torch.uint8) for _ in range(MAX_REGIONS + 2)]
    got = plan([packed, *dense], 1 << 30)
    assert [n for _, n in got.regions] == [2, 2] + [1] * (MAX_REGIONS - 2)
    with pytest.raises(TypeError, match="cannot prefetch"):
        l2_prefetch.weight_storages(3)


def test_the_plan_skips_storage_the_instruction_cannot_take() -> None:
    base = torch.zeros(4 * CHUNK_BYTES + 8, dtype=torch.uint8)
    unaligned = base[8:]  # 8 bytes past a 16-byte boundary
    strided = torch.zeros(2 * CHUNK_BYTES, 2, dtype=torch.uint8)[:, 0]
    good = torch.zeros(CHUNK_BYTES, dtype=torch.uint8)
    got = plan([unaligned, strided, good], 1 << 30)
    assert [(t.data_ptr(), n) for t, n in got.regions] == [(good.data_ptr(), 1)]


def test_kernel_args_fill_every_pair() -> None:
    a, dummy = torch.zeros(2 * CHUNK_BYTES, dtype=torch.uint8), torch.zeros(1)
    args, regions = l2_prefetch.kernel_args(plan([a], 1 << 30), dummy)
    assert regions == 1 and len(args) == 2 * MAX_REGIONS
    assert args[1] == 2 and all(arg is dummy for arg in args[2::2]) and args[3::2] == [0] * (MAX_REGIONS - 1)
    assert l2_prefetch.kernel_args(None, dummy) == ([dummy, 0] * MAX_REGIONS, 0)


def test_a_tail_prefetch_rides_only_on_gemv_py_kernels() -> None:
    """projections.on_gemv_kernels: dense weights on a GemvConfig; any other slot refuses a tail prefetch."""
    from graph_executor.kernels import projections
    from graph_executor.kernels.gemv import GemvConfig
    from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig
    from graph_executor.kernels.projections import ProjectionConfig
    from graph_executor.quant.formats import quantize_int8

    w = torch.randn(64, 32, device=DEVICE)
    pf = plan([torch.zeros(CHUNK_BYTES, dtype=torch.uint8, device=DEVICE)], 1 << 20)
    splitk = ProjectionConfig(dense=DenseSplitKConfig(16, 32, 4))
    assert projections.on_gemv_kernels(w, ProjectionConfig(dense=GemvConfig()))
    assert not projections.on_gemv_kernels(w, splitk)
    packed = quantize_int8(w.to(torch.float16), 32)
    assert not projections.on_gemv_kernels(packed, ProjectionConfig())
    with pytest.raises(ValueError, match="tail L2 prefetch"):
        projections.gemv_residual(w, torch.zeros(32, device=DEVICE), torch.zeros(64, device=DEVICE), splitk,
                                  prefetch=pf)
    with pytest.raises(ValueError, match="tail L2 prefetch"):
        projections.rmsnorm_gemv(packed, torch.zeros(32, device=DEVICE), torch.ones(32, device=DEVICE), 1e-5,
                                 torch.zeros(64, device=DEVICE), prefetch=pf)


def test_a_verify_steps_attention_takes_no_prefetch() -> None:
    attention = DecodeAttention(4, 2, 64, 64, DEVICE, max_tokens=3)
    with pytest.raises(ValueError, match="one-query kernel"):
        attention(torch.zeros(3, 4, 64, device=DEVICE), torch.zeros(2, 64, 64, device=DEVICE),
                  torch.zeros(2, 64, 64, device=DEVICE), torch.tensor([1, 2, 3], device=DEVICE),
                  torch.zeros(3, 4, 64, device=DEVICE),
                  prefetch=plan([torch.zeros(CHUNK_BYTES, dtype=torch.uint8, device=DEVICE)], 1 << 20))


def load_tiny(tmp_path, dtype: str, **sizes: int):
    import transformers

    from tests.test_model_equivalence import load_hf_model

    return load_hf_model(tmp_path, transformers.Qwen2Config, dict(num_key_value_heads=2, **sizes), 29, str(DEVICE),
                         dtype, max_context=64)


def test_a_decoder_asks_for_no_prefetch_where_the_device_has_none(tmp_path) -> None:
    """On the CPU (and before sm_90) a budget plans nothing: the interpreter never meets the inline PTX."""
    from graph_executor.fused_decoder import FusedDecoder

    if l2_prefetch.supported(DEVICE):
        pytest.skip("this device has the instruction (the cuda test below covers it)")
    model = load_tiny(tmp_path, "float32")
    decoder = FusedDecoder(model, l2_prefetch_mb=16, tail_prefetch_mb=16)
    assert decoder.prefetch == [None] * len(model.layers)
    assert all(value is None for tail in decoder.tail for value in tail.values())
    logits = torch.full((model.config.vocab_size,), float("nan"))
    decoder.step(torch.tensor([3]), torch.tensor([0]), logits)
    assert torch.isfinite(logits).all()


@pytest.mark.cuda
def test_a_step_with_the_prefetch_gives_the_same_bits(tmp_path) -> None:
    """fp16 small Qwen2 (GQA, QKV bias; a layer's next weights ~5 MiB): logits and KV cache after a step with each
    layer's next weights prefetched by the attention (64 MiB: all of them; 1 MiB: gate_up cut short) and by the
    GEMVs' tails equal those without, bit for bit; RoPE inside and not."""
    from graph_executor.fused_decoder import FusedDecoder

    if not l2_prefetch.supported(DEVICE):
        pytest.skip("needs sm_90+ (cp.async.bulk.prefetch.L2)")
    model = load_tiny(tmp_path, "float16", hidden_size=512, intermediate_size=1536)
    model(torch.arange(9, device=DEVICE), torch.arange(9, device=DEVICE), torch.tensor([8], device=DEVICE), 9)
    before = model.kv_cache.clone()
    token, position = torch.tensor([5], device=DEVICE), torch.tensor([9], device=DEVICE)
    for fuse_rope in (False, True):
        results = []
        for mb, tail_mb in ((0, 0), (64, 0), (1, 0), (0, 1), (64, 64)):
            decoder = FusedDecoder(model, fuse_rope=fuse_rope, l2_prefetch_mb=mb, tail_prefetch_mb=tail_mb)
            assert all(p is not None for p in decoder.prefetch) == (mb > 0)
            if mb == 1:
                assert decoder.prefetch[0].nbytes == 1 << 20 and len(decoder.prefetch[0].regions) == 2
            # this size's plan (decode_plan.plan_for(512)): gemv.py's kernels but for down's split-K
            tails = [{name for name, pf in tail.items() if pf is not None} for tail in decoder.tail]
            assert tails == [{"qkv", "o", "gate_up"} if tail_mb else set()] * len(model.layers)
            model.kv_cache.copy_(before)
            logits = torch.full((model.config.vocab_size,), float("nan"), device=DEVICE)
            decoder.step(token, position, logits)
            torch.cuda.synchronize()
            results.append((logits, model.kv_cache.clone()))
        for logits, cache in results[1:]:
            assert torch.equal(logits, results[0][0]) and torch.equal(cache, results[0][1])
