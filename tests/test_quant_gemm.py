"""The prefill GEMM and the embedding gather over packed low-bit weights (graph_executor/kernels/gemm_lowbit.py),
against float64 matmuls of the formats' own `dequantize()` and against its rows. Kernels run under
TRITON_INTERPRET=1 where there is no GPU (small shapes, float32 and float16 activations: the interpreter's bfloat16
dot is wrong); the `cuda` tests take 7B shapes, float16 and bfloat16 and CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from graph_executor.kernels import gemm_lowbit  # noqa: E402
from graph_executor.kernels.gemm_lowbit import EmbeddingConfig, GemmConfig  # noqa: E402
from graph_executor.kernels.gemv_splitk import SplitKScratch  # noqa: E402
from graph_executor.quant.formats import (  # noqa: E402
    Int4Groups,
    Int8Groups,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# format-offset-group-scale dtype; every case's K below is a multiple of its group but not of its BLOCK_K
CASES = ["int4-offset-g32-f16", "int4-sym-g16-f32", "int4-offset-g128-f32", "int8-sym-g32-f16",
         "int8-offset-g16-f32", "int8-sym-g128-f16", "fp8"]


def packed_case(case: str, n: int, k: int, seed: int):
    """Random codes and per-group scales (and offsets) of both signs and mixed magnitudes, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    if case == "fp8":
        return quantize_fp8(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)).to(DEVICE)
    kind, offset, group, sd = case.split("-")
    group, sd = int(group[1:]), torch.float16 if sd == "f16" else torch.float32
    ng = k // group
    scale = ((torch.rand(n, ng, generator=gen) + 0.1) * 0.05 * torch.randn(n, 1, generator=gen).sign()).to(sd)
    off = (torch.randn(n, ng, generator=gen) * 0.1).to(sd) if offset == "offset" else None
    if kind == "int4":
        codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        return Int4Groups(codes, scale, off, group).to(DEVICE)
    codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return Int8Groups(codes, scale, off, group).to(DEVICE)


def k_for(case: str) -> int:
    return 384 if "g128" in case else 96  # 3 groups of 128 / 6 of 16 / 3 of 32


def cpu_config(case: str) -> GemmConfig:
    """Small tiles (the interpreter is slow), K split over two programs of one step each, the second ragged (whole
    groups)."""
    return GemmConfig(block_n=16, block_t=16, block_k=256 if "g128" in case else 64, split=2, num_stages=1)


def reference(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 x @ W^T (+ bias), W the format's float32 dequantization."""
    ref = x.cpu().double() @ w.to("cpu").dequantize(torch.float32).double().T
    return ref if bias is None else ref + bias.cpu().double()


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Every element within tol of the float64 reference, relative to max(|ref_i|, rms(ref)) (the RMS floor keeps
    sums that cancel to near zero from asking more than the accumulation gives); NaN never passes."""
    out = out.cpu().double()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * float(ref.pow(2).mean().sqrt()))


def wide_out(t: int, n: int, dtype: torch.dtype, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A [t, n + 13] buffer of `fill` and its [t, n] row-slice view at column 5 (row stride n + 13)."""
    buf = torch.full((t, n + 13), fill, device=DEVICE, dtype=dtype)
    return buf, buf[:, 5:5 + n]


def assert_margins(buf: torch.Tensor, n: int, fill: float) -> None:
    """The columns around the [:, 5:5 + n] view kept their fill."""
    margins = torch.cat([buf[:, :5], buf[:, 5 + n:]], dim=1)
    torch.testing.assert_close(margins, torch.full_like(margins, fill), rtol=0, atol=0, equal_nan=True,
                               msg="gemm wrote outside its output view")


# -------------------------------------------------------------------------------------------------------- gemm

@pytest.mark.parametrize("tokens", [1, 3, 17])  # 17: two BLOCK_T = 16 token blocks, the second nearly empty
@pytest.mark.parametrize("case", CASES)
def test_gemm_matches_float64_matmul(case, tokens) -> None:
    n, k = 37, k_for(case)  # N not a multiple of BLOCK_N = 16
    seed = sum(map(ord, case)) + tokens
    w = packed_case(case, n, k, seed)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed + 1))
    buf, out = wide_out(tokens, n, torch.float32, float("nan"))
    cfg = cpu_config(case)
    scratch = SplitKScratch.zeros(*gemm_lowbit.scratch_size(tokens, n, k, cfg), DEVICE)
    assert gemm_lowbit.gemm(x.to(DEVICE), w, out, cfg=cfg, scratch=scratch) is out
    assert_matches(out, reference(x, w), 1e-5)
    assert_margins(buf, n, float("nan"))
    assert not scratch.count.any()  # the last program of each tile reset its counter


@pytest.mark.parametrize("case", CASES)
def test_dequantize_gives_the_formats_values(case) -> None:
    """The dense weights a long prompt's GEMM reads: bit for bit the format's float32 dequantization, and that
    rounded once in float16."""
    n, k = 37, k_for(case)
    w = packed_case(case, n, k, seed=sum(map(ord, case)))
    want = w.to("cpu").dequantize(torch.float32)
    for dtype in (torch.float32, torch.float16):
        out = torch.full((n, k), float("nan"), device=DEVICE, dtype=dtype)
        assert gemm_lowbit.dequantize(w, out, block_r=16, block_k=64) is out
        assert torch.equal(out.cpu(), want.to(dtype))


@pytest.mark.parametrize("epilogue", ["plain", "bias", "accumulate"])
def test_long_prompts_multiply_dequantized_weights(epilogue) -> None:
    """kernels/projections.matmul from DEQUANTIZE_ROWS.int4 rows (the dense GEMM over dequantized weights) and below
    (the low-bit GEMM): the same product either way."""
    from graph_executor.kernels import projections

    n, k = 21, 96
    w = packed_case("int4-offset-g32-f16", n, k, seed=11)
    gen = torch.Generator().manual_seed(12)
    for tokens in (projections.DEQUANTIZE_ROWS.int4 - 1, projections.DEQUANTIZE_ROWS.int4):
        x, base, bias = (torch.randn(tokens, k, generator=gen), torch.randn(tokens, n, generator=gen),
                         torch.randn(n, generator=gen))
        out = base.clone().to(DEVICE)
        ref = reference(x, w, bias if epilogue == "bias" else None)
        projections.matmul(x.to(DEVICE), w, out, bias=bias.to(DEVICE) if epilogue == "bias" else None,
                           accumulate=epilogue == "accumulate")
        assert_matches(out, ref + base.double() if epilogue == "accumulate" else ref, 1e-5)


@pytest.mark.parametrize("case", ["int4-offset-g32-f16", "int8-sym-g32-f16", "fp8"])
def test_dequantize_rows_per_format(case) -> None:
    """projections.DequantizeRows: each format switches to the dequantized weights at its own row count; below it
    the low-bit GEMM runs with the scratch prefill_scratch sized for that count (none allocated in the call)."""
    from graph_executor.kernels import projections

    n, k = 21, 96
    w = packed_case(case, n, k, seed=13)
    rows = projections.DequantizeRows(int4=9, int8=17, fp8=33)
    at = rows.for_weight(w)
    assert at == {"int4": 9, "int8": 17, "fp8": 33}[case.split("-")[0]]
    scratch = projections.prefill_scratch([w], 64, DEVICE, rows)
    assert scratch is not None
    gen = torch.Generator().manual_seed(14)
    for tokens in (at - 1, at):
        x = torch.randn(tokens, k, generator=gen)
        out = torch.full((tokens, n), float("nan"), device=DEVICE)
        projections.matmul(x.to(DEVICE), w, out, scratch=scratch, dequantize_rows=rows)
        assert_matches(out, reference(x, w), 1e-5)


@pytest.mark.parametrize("epilogue", ["bias", "accumulate"])
@pytest.mark.parametrize("case", ["int4-offset-g32-f16", "int4-sym-g16-f32", "int8-offset-g16-f32", "fp8"])
def test_gemm_bias_and_accumulate(case, epilogue) -> None:
    """bias: the qkv projection's out = x @ W^T + b; accumulate: o_proj / down_proj's residual add, in place."""
    n, k, tokens = 21, k_for(case), 5
    gen = torch.Generator().manual_seed(sum(map(ord, case + epilogue)))
    w = packed_case(case, n, k, seed=7)
    x, base = torch.randn(tokens, k, generator=gen), torch.randn(tokens, n, generator=gen)
    buf, out = wide_out(tokens, n, torch.float32, -3.0)
    if epilogue == "bias":
        bias = torch.randn(n, generator=gen)
        gemm_lowbit.gemm(x.to(DEVICE), w, out, bias=bias.to(DEVICE), cfg=cpu_config(case))
        ref = reference(x, w, bias)
    else:
        out.copy_(base)
        gemm_lowbit.gemm(x.to(DEVICE), w, out, accumulate=True, cfg=cpu_config(case))
        ref = base.double() + reference(x, w)
    assert_matches(out, ref, 1e-5)
    assert_margins(buf, n, -3.0)


@pytest.mark.parametrize("case", ["int4-offset-g32-f16", "int8-sym-g32-f16", "fp8"])
def test_a_reduce_kernel_gives_the_fixups_bits(case) -> None:
    """GemmConfig(reduce_kernel=True): the split partials added by `_gemm_reduce_kernel` give the fixup's bits, with a
    bias and accumulating (FP8: its row scale), two token blocks; the counters stay zero."""
    n, k, tokens = 21, k_for(case), 17
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    w = packed_case(case, n, k, seed=9)
    x, base, bias = (torch.randn(tokens, k, generator=gen).to(DEVICE), torch.randn(tokens, n, generator=gen).to(DEVICE),
                     torch.randn(n, generator=gen).to(DEVICE))
    results = []
    for reduce_kernel in (False, True):
        cfg = dataclasses.replace(cpu_config(case), reduce_kernel=reduce_kernel)
        scratch = SplitKScratch.zeros(*gemm_lowbit.scratch_size(tokens, n, k, cfg), DEVICE)
        out = torch.empty(tokens, n, device=DEVICE)
        gemm_lowbit.gemm(x, w, out, bias=bias, cfg=cfg, scratch=scratch)
        acc = base.clone()
        gemm_lowbit.gemm(x, w, acc, accumulate=True, cfg=cfg, scratch=scratch)
        results.append((out, acc))
        assert not scratch.count.any()
    for fixed_up, reduced in zip(*results):
        assert torch.equal(fixed_up, reduced)


# the shapes of default_config's choices (64 rows, 16..64 tokens, BLOCK_K 128, split 1..8) and a 3-way split
TILES = [GemmConfig(64, 64, 128, 1), GemmConfig(64, 16, 128, 8), GemmConfig(64, 32, 128, 2), GemmConfig(16, 32, 32, 3)]


@pytest.mark.parametrize("tile", range(len(TILES)))
def test_gemm_default_tile_configs(tile) -> None:
    """Tiles of the shipped shapes (group 128 above BLOCK_K for some, below for others), T = 40; a split larger
    than K's steps runs as fewer programs."""
    case = ["int4-offset-g128-f32", "int8-sym-g32-f16", "fp8", "int4-sym-g16-f32"][tile]
    n, k, tokens = 70, 256, 40
    w = packed_case(case, n, k, seed=tile)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tile + 1))
    out = torch.full((tokens, n), float("nan"), device=DEVICE)
    gemm_lowbit.gemm(x.to(DEVICE), w, out, cfg=TILES[tile])
    assert_matches(out, reference(x, w), 1e-5)


def test_gemm_default_config() -> None:
    w = packed_case("int4-sym-g16-f32", 45, 96, seed=13)
    x = torch.randn(33, 96, generator=torch.Generator().manual_seed(14))
    out = torch.full((33, 45), float("nan"), device=DEVICE)
    gemm_lowbit.gemm(x.to(DEVICE), w, out)
    assert_matches(out, reference(x, w), 1e-5)


@pytest.mark.parametrize("case", ["int4-sym-g16-f32", "int8-offset-g16-f32", "fp8"])
def test_gemm_float16_activations(case) -> None:
    """float16 x and out (the model's dtype): the weight tile is rounded to float16 once, the output once."""
    n, k, tokens = 37, k_for(case), 3
    w = packed_case(case, n, k, seed=3)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(4)).half()
    out = torch.full((tokens, n), float("nan"), device=DEVICE, dtype=torch.float16)
    gemm_lowbit.gemm(x.to(DEVICE), w, out, cfg=cpu_config(case))
    assert_matches(out, reference(x, w), 2e-3)


@pytest.mark.parametrize("f16_math", [True, False])
@pytest.mark.parametrize("case", ["int4-offset-g32-f16", "int4-sym-g16-f16", "int8-sym-g32-f16",
                                  "int8-offset-g16-f16"])
def test_gemm_float16_math_over_float16_scales(case, f16_math) -> None:
    """float16 x and float16 scales: each code becomes float16 exactly (the 0x6400 magic number, int8's shifted by
    128) and s q + o is one float16 FMA (GemmConfig.f16_math), or the float32 form: both within float16's
    rounding of the float64 reference, every element."""
    n, k, tokens = 37, k_for(case), 5
    w = packed_case(case, n, k, seed=23)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(24)).half()
    out = torch.full((tokens, n), float("nan"), device=DEVICE, dtype=torch.float16)
    gemm_lowbit.gemm(x.to(DEVICE), w, out, cfg=dataclasses.replace(cpu_config(case), f16_math=f16_math))
    assert_matches(out, reference(x, w), 2e-3)


@pytest.mark.parametrize("case", ["int4-offset-g128-f32", "int8-sym-g128-f16"])
def test_gemm_block_k_below_the_group(case) -> None:
    """BLOCK_K = 32 < group = 128: every step lies inside one group (and picks that group's scale)."""
    n, k, tokens = 19, 384, 2
    w = packed_case(case, n, k, seed=11)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(12))
    out = torch.full((tokens, n), float("nan"), device=DEVICE)
    gemm_lowbit.gemm(x.to(DEVICE), w, out, cfg=GemmConfig(block_n=16, block_t=16, block_k=32, split=4, num_stages=1))
    assert_matches(out, reference(x, w), 1e-5)


def test_default_config_fills_the_gpu_without_padding_tokens() -> None:
    for tokens in (1, 3, 16, 17, 64, 100, 127):
        for n, k in ((64, 64), (4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)):
            cfg = gemm_lowbit.default_config(tokens, n, k)
            assert cfg.block_t == 16 or cfg.block_t < 2 * tokens  # at most T rounded up to a power of two
            programs = triton.cdiv(n, cfg.block_n) * triton.cdiv(tokens, cfg.block_t) * cfg.split
            target = gemm_lowbit.TARGET_PROGRAMS[cfg.block_t]
            assert cfg.split == 1 or programs <= target
            assert cfg.split <= max(1, triton.cdiv(k, cfg.block_k))
            # one more split would pass the target, the cap, or K's steps
            assert (2 * programs > target or cfg.split == gemm_lowbit.MAX_SPLIT
                    or 2 * cfg.split > triton.cdiv(k, cfg.block_k))
    # LLaMA-2-7B's qkv, o, gate_up, down (H200 sweep, bench/probes/lowbit_gemm_swap.py)
    shapes = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))
    assert [gemm_lowbit.default_config(16, n, k).split for n, k in shapes] == [8, 8, 4, 8]
    assert [gemm_lowbit.default_config(64, n, k).split for n, k in shapes] == [2, 4, 1, 4]


# --------------------------------------------------------------------------------------------------- embedding

@pytest.mark.parametrize("case", CASES)
def test_embedding_gathers_dequantized_rows(case) -> None:
    vocab, k = 29, k_for(case)
    w = packed_case(case, vocab, k, seed=sum(map(ord, case)))
    ids = torch.tensor([0, vocab - 1, 5, 5, 17, 0], device=DEVICE)  # first and last row, repeats
    out = torch.full((ids.numel(), k), float("nan"), device=DEVICE)
    cfg = EmbeddingConfig(block_t=4, block_k=256)  # 6 tokens: a ragged token block; K = 96 a ragged K block
    assert gemm_lowbit.embedding(w, ids, out, cfg) is out
    assert torch.equal(out.cpu(), w.to("cpu").dequantize(torch.float32)[ids.cpu()])  # bit-exact in float32


def test_embedding_decode_step_float16_into_a_row_view() -> None:
    """T = 1 (decode), float16 out written into a row of a wider buffer; formed in float32, rounded once."""
    w = packed_case("int4-offset-g32-f16", 50, 128, seed=1)
    buf = torch.full((1, 200), 7.0, device=DEVICE, dtype=torch.float16)
    ids = torch.tensor([49], device=DEVICE)
    gemm_lowbit.embedding(w, ids, buf[:, 40:168])
    assert torch.equal(buf[0, 40:168].cpu(), w.to("cpu").dequantize(torch.float16)[49])
    assert (buf[0, :40] == 7).all() and (buf[0, 168:] == 7).all()


def test_embedding_out_of_range_id_gives_zeros() -> None:
    w = packed_case("int8-sym-g32-f16", 8, 64, seed=2)
    out = torch.full((3, 64), float("nan"), device=DEVICE)
    gemm_lowbit.embedding(w, torch.tensor([8, 3, -1], device=DEVICE), out)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert torch.equal(out[1].cpu(), w.to("cpu").dequantize()[3])


# --------------------------------------------------------------------------------------------------- bad input

def test_gemm_rejects_bad_input() -> None:
    w = packed_case("int4-offset-g32-f16", 16, 64, seed=9)
    x, out = torch.zeros(2, 64, device=DEVICE), torch.zeros(2, 16, device=DEVICE)
    bad = [
        ("x", {"x": torch.zeros(2, 32, device=DEVICE)}),  # K mismatch
        ("x", {"x": torch.zeros(2, 64, device=DEVICE, dtype=torch.int32)}),
        ("x", {"x": torch.zeros(64, 2, device=DEVICE).T}),  # not unit stride along K
        ("x", {"x": torch.zeros(64, device=DEVICE)}),  # 1-D
        ("out", {"out": torch.zeros(2, 17, device=DEVICE)}),
        ("out", {"out": torch.zeros(3, 16, device=DEVICE)}),
        ("out", {"out": torch.zeros(2, 16, device=DEVICE, dtype=torch.float16)}),  # dtype != x's
        ("bias", {"bias": torch.zeros(15, device=DEVICE)}),
    ]
    for name, kwargs in bad:
        with pytest.raises(ValueError, match=f"^{name}: "):
            gemm_lowbit.gemm(**({"x": x, "w": w, "out": out} | kwargs))
    with pytest.raises(ValueError, match="^w: expected Int4Groups"):
        gemm_lowbit.gemm(x, torch.zeros(16, 64, device=DEVICE), out)
    with pytest.raises(ValueError, match="block_t 24"):
        GemmConfig(block_t=24)
    with pytest.raises(ValueError, match="^scratch: "):
        gemm_lowbit.gemm(x, w, out, cfg=GemmConfig(16, 16, 32, 2), scratch=SplitKScratch.zeros(16, 1, DEVICE))
    with pytest.raises(ValueError, match="EmbeddingConfig"):
        EmbeddingConfig(block_k=96)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="^x: .* on meta"):
            gemm_lowbit.gemm(x.to("meta"), w, out)


def test_embedding_rejects_bad_input() -> None:
    w = packed_case("fp8", 16, 64, seed=9)
    ids, out = torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.zeros(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="^ids"):
        gemm_lowbit.embedding(w, ids.float(), out)
    with pytest.raises(ValueError, match="^ids"):
        gemm_lowbit.embedding(w, ids[:, None], out)
    with pytest.raises(ValueError, match="^out"):
        gemm_lowbit.embedding(w, ids, torch.zeros(3, 64, device=DEVICE))
    with pytest.raises(ValueError, match="^out"):
        gemm_lowbit.embedding(w, ids, torch.zeros(2, 64, device=DEVICE, dtype=torch.int8))
    with pytest.raises(ValueError, match="^w: expected"):
        gemm_lowbit.embedding(torch.zeros(16, 64, device=DEVICE), ids, out)


# ------------------------------------------------------------------------------------------- GPU, 7B shapes

def gpu_weight(fmt: str, n: int, k: int, seed: int):
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)) * 0.02
    if fmt == "fp8":
        return quantize_fp8(w)
    return (quantize_int4 if fmt == "int4" else quantize_int8)(w, 32)


def gpu_check(out: torch.Tensor, x: torch.Tensor, w, base: torch.Tensor | None = None) -> None:
    """Every element within 1e-2 of the float64 reference, relative to max(|ref_i|, rms(ref))."""
    ref = x.double() @ w.dequantize(torch.float32).double().T
    if base is not None:
        ref += base.double()
    err = (out.double() - ref).abs() / torch.maximum(ref.abs(), ref.pow(2).mean().sqrt())
    assert torch.isfinite(out).all() and err.max() <= 1e-2, f"relative error {float(err.max()):.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gemm_7b_shapes_float16(n, k, fmt) -> None:
    w = gpu_weight(fmt, n, k, seed=n + k)
    for tokens in (1, 16, 100, 512):
        x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
        out = torch.full((tokens, n), float("nan"), device="cuda", dtype=torch.float16)
        gpu_check(gemm_lowbit.gemm(x, w, out), x, w)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_gemm_bfloat16_accumulate_and_bias(fmt) -> None:
    n, k, tokens = 4096, 4096, 100
    w = gpu_weight(fmt, n, k, seed=1)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    out = base.clone()
    gpu_check(gemm_lowbit.gemm(x, w, out, accumulate=True), x, w, base)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    gpu_check(gemm_lowbit.gemm(x, w, out, bias=bias), x, w, bias.expand(tokens, n))


@pytest.mark.cuda
@pytest.mark.parametrize("group", [128, 256])
def test_gemm_groups_above_block_k_on_gpu(group) -> None:
    """Groups larger than some default tiles' BLOCK_K (64): steps inside one group."""
    n, k = 4096, 4096
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(group)) * 0.02
    for packed in (quantize_int4(w, group), quantize_int8(w, group)):
        for tokens in (1, 100, 512):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
            out = torch.full((tokens, n), float("nan"), device="cuda", dtype=torch.float16)
            gpu_check(gemm_lowbit.gemm(x, packed, out), x, packed)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["int4-offset-g32-f16", "int8-sym-g128-f16", "fp8"])
def test_gemm_float32_activations_on_gpu(case) -> None:
    """float32 x asks for float32 products (no tf32): float32 accumulation accuracy, as on the CPU."""
    n, k, tokens = 1000, 1024, 37
    w = packed_case(case, n, k, seed=6)
    x = torch.randn(tokens, k, device="cuda")
    out = torch.full((tokens, n), float("nan"), device="cuda")
    assert_matches(gemm_lowbit.gemm(x, w, out), reference(x, w), 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["int4-sym-g16-f32", "int8-offset-g16-f32", "fp8"])
def test_gemm_replays_in_a_cuda_graph(case) -> None:
    """Captured once with a strided out, replayed on new x: no host sync, no allocation in the launch."""
    n, k, tokens = 4096, 1024, 64
    w = packed_case(case, n, k, seed=5)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
    buf = torch.zeros(tokens, 3 * n, device="cuda", dtype=torch.float16)
    out = buf[:, n:2 * n]
    scratch = SplitKScratch.zeros(*gemm_lowbit.scratch_size(tokens, n, k, gemm_lowbit.default_config(tokens, n, k)),
                                  DEVICE)
    gemm_lowbit.gemm(x, w, out, scratch=scratch)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemm_lowbit.gemm(x, w, out, scratch=scratch)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    gpu_check(out, x, w)
    assert (buf[:, :n] == 0).all() and (buf[:, 2 * n:] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
def test_embedding_7b_table(fmt, dtype) -> None:
    vocab, k = 32000, 4096
    w = gpu_weight(fmt, vocab, k, seed=2)
    ids = torch.tensor([0, vocab - 1, 123, 123, 31999, 7], device="cuda")
    for t in (1, ids.numel()):
        out = torch.full((t, k), float("nan"), device="cuda", dtype=dtype)
        gemm_lowbit.embedding(w, ids[:t], out)
        assert torch.equal(out, w.dequantize(dtype)[ids[:t]])  # formed in float32, rounded once
