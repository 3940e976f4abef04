"""The split-K dense GEMVs (graph_executor/kernels/gemv_dense_splitk.py) against float64 matmuls, every output element
checked: the three fusions, K not a multiple of the K slice, N not a multiple of BLOCK_N, a single slice (the only
program does the fixup), a QKV bias, float32, float16 and bfloat16 weights and activations, a zero row; the scratch is
left clean and a second call gives the same bits; the dispatch in projections.py and the decoder's scratch sizing;
a whole decode step with split-K o and down against the fp16 kernels' step; bad input. On CPU the kernel runs in the
Triton interpreter; the `cuda` test runs the compiled kernel on LLaMA-2-7B shapes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graph_executor.kernels import gemv_dense_splitk, projections
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.kernels.projections import ProjectionConfig
from tests.test_gemv_fp8 import (  # |out - ref| <= tol * max(|ref_i|, rms(ref)), every element; the reduce check
    check_elements,
    fixup_and_reduce_kernel_agree,
)

CASES = [  # n, k, config, dtype (weights and activations)
    (37, 300, DenseSplitKConfig(16, 128, 2), torch.float32),  # 3 slices, the last 44 wide; 3 row blocks, the last 5
    (40, 200, DenseSplitKConfig(16, 256, 2), torch.float32),  # one slice: no partner program
    (5, 96, DenseSplitKConfig(8, 32, 1), torch.float32),  # fewer rows than a block
    (48, 520, DenseSplitKConfig(32, 256, 4), torch.float16),  # the model's dtype: output rounded once to float16
    (33, 130, DenseSplitKConfig(16, 64, 2), torch.bfloat16),
]
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # the output's own rounding, and a margin
ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the Triton interpreter, which is on "
                            "only where there is no GPU; the cuda test runs these cases")


def inputs(n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A weight [N, K] with rows of very different magnitudes and one zero row, and the calls' vectors."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.05
    w[n // 2] = 0
    v = {"x": torch.randn(k, generator=g), "nw": torch.rand(k, generator=g) + 0.5, "bias": torch.randn(n, generator=g),
         "r": torch.randn(n, generator=g), "gate_up": torch.randn(2 * k, generator=g)}
    v["x"][: k // 4] *= 30  # a few large activations next to small ones
    return w.to(dtype), {name: t.to(dtype) for name, t in v.items()}


def check(device: torch.device, n: int, k: int, cfg: DenseSplitKConfig, dtype: torch.dtype, seed: int) -> None:
    w, v = inputs(n, k, dtype, seed)
    dense = w.double()
    d = {name: t.double() for name, t in v.items()}  # the reference reads the same (rounded) inputs
    w = w.to(device)
    on = {name: t.to(device) for name, t in v.items()}
    scratch = gemv_dense_splitk.allocate_scratch(w, cfg)
    eps, tol = 1e-5, TOL[dtype]

    out = torch.full((n,), float("nan"), device=device, dtype=dtype)
    gemv_dense_splitk.rmsnorm_gemv(w, on["x"], on["nw"], eps, out, scratch, bias=on["bias"], cfg=cfg)
    ref = dense @ (d["x"] * d["nw"]) / torch.sqrt((d["x"] * d["x"]).mean() + eps) + d["bias"]
    check_elements(out, ref, tol)
    again = torch.empty_like(out)
    gemv_dense_splitk.rmsnorm_gemv(w, on["x"], on["nw"], eps, again, scratch, bias=on["bias"], cfg=cfg)
    assert torch.equal(again, out)  # deterministic, and the counters were reset
    logits = torch.empty(n, device=device, dtype=torch.float32)  # the lm_head writes float32 logits
    gemv_dense_splitk.rmsnorm_gemv(w, on["x"], on["nw"], eps, logits, scratch, cfg=cfg)
    check_elements(logits, ref - d["bias"], tol)

    got = gemv_dense_splitk.gemv_residual(w, on["x"], on["r"].clone(), scratch, cfg)
    check_elements(got, d["r"] + dense @ d["x"], tol)

    got = gemv_dense_splitk.silu_gemv_residual(w, on["gate_up"], on["r"].clone(), scratch, cfg)
    g, u = d["gate_up"][:k], d["gate_up"][k:]
    check_elements(got, d["r"] + dense @ (g * torch.sigmoid(g) * u), tol)
    assert int(scratch.count.abs().sum()) == 0


@ON_CPU
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2].block_n}x{c[2].block_k}-{c[3]}")
def test_dense_splitk_gemv_matches_float64(case) -> None:
    check(torch.device("cpu"), *case, seed=3)


def identical_with_a_reduce_kernel(device: torch.device) -> None:
    """DenseSplitKConfig(reduce_kernel=True): the partials added by a second kernel give the fixup's bits."""
    for i, (n, k, cfg, dtype) in enumerate(CASES):
        w, v = inputs(n, k, dtype, seed=60 + i)
        fixup_and_reduce_kernel_agree(gemv_dense_splitk, w.to(device), {name: t.to(device) for name, t in v.items()},
                                      cfg, dtype)


@ON_CPU
def test_a_reduce_kernel_gives_the_fixups_bits() -> None:
    identical_with_a_reduce_kernel(torch.device("cpu"))


@pytest.mark.cuda
def test_a_reduce_kernel_gives_the_fixups_bits_on_the_gpu() -> None:
    identical_with_a_reduce_kernel(torch.device("cuda"))


@pytest.mark.cuda
def test_dense_splitk_gemv_on_the_gpu_matches_float64() -> None:
    h, i = 4096, 11008  # LLaMA-2-7B's o and down, the projections the split is for, and a wide one
    real = [(h, h, DenseSplitKConfig(16, 512, 4)), (h, i, DenseSplitKConfig(16, 1024, 4)),
            (h, i, DenseSplitKConfig(32, 512, 8)), (3 * h, h, DenseSplitKConfig(32, 1024, 8))]
    for index, (n, k, cfg, dtype) in enumerate(CASES + [(n, k, c, torch.float16) for n, k, c in real]):
        check(torch.device("cuda"), n, k, cfg, dtype, seed=10 + index)


@ON_CPU
def test_projections_dispatch_dense_weights_by_their_config() -> None:
    """projections.py: a DenseSplitKConfig takes the split-K kernel (with its own scratch when given none), a
    GemvConfig the fp16 kernels; both agree with float64, and the decoder's scratch sizing counts the split-K slots
    only."""
    n, k = 37, 300
    w, v = inputs(n, k, torch.float32, seed=5)
    ref = v["r"].double() + w.double() @ v["x"].double()
    split, plain = ProjectionConfig(dense=DenseSplitKConfig(16, 128, 2)), ProjectionConfig(dense=GemvConfig(16, 128))
    check_elements(projections.gemv_residual(w, v["x"], v["r"].clone(), cfg=split), ref, TOL[torch.float32])
    check_elements(projections.gemv_residual(w, v["x"], v["r"].clone(), cfg=plain), ref, TOL[torch.float32])
    scratch = SplitKScratch.zeros(*projections.decode_scratch_size(w, split), w.device)
    check_elements(projections.gemv_residual(w, v["x"], v["r"].clone(), cfg=split, scratch=scratch), ref,
                   TOL[torch.float32])
    assert projections.decode_scratch_size(w, split) == gemv_dense_splitk.scratch_size(w, split.dense) != (0, 0)
    assert projections.decode_scratch_size(w, plain) == (0, 0)


@ON_CPU
def test_a_decode_step_with_split_k_qkv_o_and_down_matches_the_fp16_kernels_step(tmp_path) -> None:
    """The fused decoder with qkv (its bias in the fixup), o_proj and down_proj on the split-K kernels (the shared
    scratch sized over them) gives
    the logits of the decoder on gemv.py's kernels, over a few steps of a tiny model (GQA, QKV bias)."""

    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.kernels.gemv import GEMV_PLAN
    from tests.test_model_equivalence import load_hf_model

    model = load_hf_model(tmp_path, transformers.Qwen2Config, dict(num_key_value_heads=2), 21, max_context=64)
    # hidden 64, intermediate 96: qkv and o in 2 K slices, down in 3 (the last one 32 wide of 64), 4 row blocks each
    plan = type(GEMV_PLAN)(qkv=DenseSplitKConfig(16, 32, 2), o=DenseSplitKConfig(16, 32, 2), gate_up=GEMV_PLAN.gate_up,
                              down=DenseSplitKConfig(16, 64, 2), lm_head=GEMV_PLAN.lm_head)
    split, plain = FusedDecoder(model, plan=plan), FusedDecoder(model, plan=GEMV_PLAN)
    assert split.scratch is not None and plain.scratch is None
    vocab = model.config.vocab_size
    for position, token in enumerate([3, 17, 5, 9]):
        t, p = torch.tensor([token]), torch.tensor([position])
        got, want = torch.empty(vocab), torch.empty(vocab)
        split.step(t, p, got)
        plain.step(t, p, want)  # writes the same K/V row again: the same values
        check_elements(got, want.double(), 1e-4)


def test_bad_input_is_refused_in_one_line() -> None:
    w = torch.zeros(8, 16)
    cfg = DenseSplitKConfig(8, 16, 1)
    scratch = gemv_dense_splitk.allocate_scratch(w, cfg)
    with pytest.raises(ValueError, match="power of two"):
        DenseSplitKConfig(12, 16, 1)
    with pytest.raises(ValueError, match="2-D float16/bfloat16/float32"):
        gemv_dense_splitk.gemv_residual(torch.zeros(8, 16, dtype=torch.int8), torch.zeros(16), torch.zeros(8), scratch,
                                        cfg)
    with pytest.raises(ValueError, match="x: expected a contiguous \\[8\\]"):
        gemv_dense_splitk.gemv_residual(w, torch.zeros(16), torch.zeros(9), scratch, cfg)
    with pytest.raises(ValueError, match="scratch too small"):
        gemv_dense_splitk.gemv_residual(w, torch.zeros(16), torch.zeros(8), SplitKScratch.zeros(1, 1, w.device), cfg)


def test_the_decode_plan_is_the_one_measured_on_the_nearest_hidden_size_below() -> None:
    """decode_plan.plan_for: 7B's plan (split-K down) from hidden 4096 up, 1B's (split-K qkv, gate_up and down) from
    2048, SmolLM2's (split-K down; qkv, o and gate_up in one chunk of K) below; o_proj and lm_head stay on gemv.py's
    kernels everywhere (7B's and 1B's o reading its residual early), gate_up but on 1B's; every split-K projection's
    partials are added by the second kernel (measured)."""
    from graph_executor.kernels import decode_plan
    from graph_executor.kernels.gemv import GEMV_PLAN, GemvConfig

    seven, one, small = decode_plan.plan_for(4096), decode_plan.plan_for(2048), decode_plan.plan_for(576)
    assert decode_plan.plan_for(8192) == seven == decode_plan.DEFAULT_PLAN and decode_plan.plan_for(3584) == one
    assert decode_plan.plan_for(896) == small == decode_plan.plan_for(1) == decode_plan.plan_for(1024)
    # between 1025 and 2047 (Qwen2-1.5B): SmolLM2's plan of before the one-chunk configs (K would not fit one chunk)
    assert decode_plan.plan_for(1536) == decode_plan.plan_for(1025) == dataclasses.replace(
        GEMV_PLAN, o=dataclasses.replace(GEMV_PLAN.o, residual_early=True),
        down=DenseSplitKConfig(32, 256, 8, reduce_kernel=True))
    assert seven.down == DenseSplitKConfig(16, 1024, 8, reduce_kernel=True) and isinstance(seven.qkv, GemvConfig)
    assert one.qkv == DenseSplitKConfig(16, 256, 4, reduce_kernel=True)
    assert one.down == DenseSplitKConfig(32, 512, 8, reduce_kernel=True)
    assert one.gate_up == DenseSplitKConfig(16, 256, 4, reduce_kernel=True) and seven.gate_up == GEMV_PLAN.gate_up
    assert small.down == DenseSplitKConfig(32, 256, 8, reduce_kernel=True) and isinstance(small.qkv, GemvConfig)
    for plan in (seven, one):  # o_proj reads its residual right after its wait there (measured), not on SmolLM2
        assert (plan.o, plan.lm_head) == (dataclasses.replace(GEMV_PLAN.o, residual_early=True), GEMV_PLAN.lm_head)
    assert (small.qkv, small.o, small.gate_up, small.lm_head) == (
        GemvConfig(16, 1024, 8), GemvConfig(2, 1024, 4), GemvConfig(8, 1024, 4), GEMV_PLAN.lm_head)
    with pytest.raises(ValueError, match="hidden_size"):
        decode_plan.plan_for(0)


def test_the_step_options_are_the_ones_measured_on_the_nearest_hidden_size_below(tmp_path) -> None:
    """decode_plan.options_for: RoPE inside attention everywhere; the attention's keys and values loaded before its
    wait below 7B's (measured on the card: a loss on 7B, a gain on 1B); the early weights and the attention's
    in-kernel split combine below 1B's only, and so are the decode graphs per context bucket; the early V loads
    nowhere; FusedDecoder takes them unless told."""
    import transformers

    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.kernels import decode_plan
    from tests.test_model_equivalence import load_hf_model

    seven, one, small = decode_plan.options_for(4096), decode_plan.options_for(2048), decode_plan.options_for(576)
    assert decode_plan.options_for(8192) == seven == decode_plan.StepOptions(fuse_rope=True, early_weights=False)
    assert decode_plan.options_for(3584) == one == decode_plan.StepOptions(fuse_rope=True, early_weights=False,
                                                                           kv_early=True)
    assert decode_plan.options_for(1) == small == decode_plan.StepOptions(fuse_rope=True, early_weights=True,
                                                                          split_combine=True, defer_down=True,
                                                                          kv_early=True, context_graphs=True)
    with pytest.raises(ValueError, match="hidden_size"):
        decode_plan.options_for(0)
    model = load_hf_model(tmp_path, transformers.LlamaConfig, {}, 3, max_context=32)
    chosen = FusedDecoder(model)
    assert (chosen.fuse_rope, chosen.early_weights) == (True, True)
    configs = [getattr(chosen.plan["qkv"], f.name) for f in dataclasses.fields(chosen.plan["qkv"])]
    assert all(c.early for c in configs), "every format's config of a projection loads early"
    assert chosen.attention.fused_reduce and not chosen.attention.v_early
    assert chosen.defer_down, "a small model's down_proj partials are left for the next kernels"
    assert chosen.attention.kv_early, "a small model's attention loads its keys and values before its wait"
    told = FusedDecoder(model, fuse_rope=False, early_weights=False, split_combine=False, v_early=True)
    assert (told.fuse_rope, told.early_weights) == (False, False) and not told.plan["down"].dense.early
    assert not told.attention.fused_reduce and told.attention.v_early
    assert not told.attention.kv_early, "without RoPE inside the options' kv_early does not apply"
    assert not FusedDecoder(model, split_size=128).attention.kv_early, "nor with splits of more than one block"
    wide = load_hf_model(tmp_path / "wide", transformers.LlamaConfig, dict(hidden_size=256, num_attention_heads=2,
                                                                           num_key_value_heads=2), 3, max_context=32)
    assert wide.config.head_dim > 64 and FusedDecoder(wide).fuse_rope
    assert not FusedDecoder(wide).attention.kv_early, "nor for heads wider than measured"
