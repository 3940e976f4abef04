"""Packed low-bit weights (graph_executor/quant/formats.py) and their decode GEMVs (kernels/projections.py, which
sends them to the split-K kernels of kernels/gemv_splitk.py):
GGUF conversions against `gguf.quants.dequantize`, kernels against float64 matmuls, quantizers against their
error bounds. Kernels run under TRITON_INTERPRET=1 where there is no GPU (small shapes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from graph_executor.kernels import projections  # noqa: E402
from graph_executor.kernels.gemv_splitk import SplitKConfig  # noqa: E402
from graph_executor.kernels.projections import ProjectionConfig  # noqa: E402
from graph_executor.quant.formats import (  # noqa: E402
    Int4Groups,
    Int8Groups,
    from_gguf,
    from_reader_tensor,
    quantize_int4,
    quantize_int8,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# gguf.quants can write these (and the test does); the K-quants it can only read, so their blocks are built here.
WRITABLE = {T.Q4_0: (Int4Groups, 4.5), T.Q4_1: (Int4Groups, 5.0), T.Q5_0: (Int8Groups, 8.5),
            T.Q5_1: (Int8Groups, 9.0), T.Q8_0: (Int8Groups, 8.5)}
K_QUANTS = {T.Q4_K: (Int4Groups, 32), T.Q5_K: (Int8Groups, 32), T.Q6_K: (Int8Groups, 16)}


def gguf_weights(qtype: T, n: int, k: int, seed: int) -> np.ndarray:
    """uint8 [N, K / block * type_size]: GGUF blocks of type qtype for random weights."""
    rng = np.random.default_rng(seed)
    if qtype in WRITABLE:
        # rows of different magnitudes, as in a real layer
        w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.005, 0.1, (n, 1)).astype(np.float32)
        return quantize(w, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    nb = k // block
    b = rng.integers(0, 256, (n, nb, size), dtype=np.uint8)  # random codes and 6/8-bit sub-block scales

    def f16(lo: float, hi: float) -> np.ndarray:  # sane super-block scales, some in float16's subnormal range
        return rng.uniform(lo, hi, (n, nb)).astype(np.float16).view(np.uint8).reshape(n, nb, 2)

    if qtype == T.Q6_K:
        b[..., 208:210] = f16(1e-5, 2e-3)  # d (after ql[128], qh[64], scales[16])
    else:
        b[..., 0:2] = f16(1e-5, 2e-3)  # d
        b[..., 2:4] = f16(1e-5, 2e-3)  # dmin
    return b.reshape(n, nb * size)


def gguf_reference(data: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(np.asarray(dequantize(data, qtype), dtype=np.float32))


# ----------------------------------------------------------------------------------------- GGUF conversions

@pytest.mark.parametrize("qtype", sorted(WRITABLE, key=lambda t: t.name), ids=lambda t: t.name)
def test_gguf_type_converts_bit_exact(qtype) -> None:
    data = gguf_weights(qtype, 6, 256, seed=int(qtype))
    packed = from_gguf(data, qtype)
    kind, bits = WRITABLE[qtype]
    assert isinstance(packed, kind) and packed.shape == (6, 256) and packed.scale.dtype == torch.float16
    assert packed.bits_per_weight == bits  # the same bytes per weight as the GGUF block (Q5_*: 8 + 1/2 or 1)
    assert torch.equal(packed.dequantize(), gguf_reference(data, qtype))


@pytest.mark.parametrize("qtype", sorted(K_QUANTS, key=lambda t: t.name), ids=lambda t: t.name)
def test_k_quant_converts_bit_exact_with_float32_scales(qtype) -> None:
    data = gguf_weights(qtype, 5, 512, seed=int(qtype))
    packed = from_gguf(data, qtype, scale_dtype=torch.float32)
    kind, group = K_QUANTS[qtype]
    assert isinstance(packed, kind) and packed.group == group and packed.shape == (5, 512)
    assert torch.equal(packed.dequantize(), gguf_reference(data, qtype))


@pytest.mark.parametrize("qtype", sorted(K_QUANTS, key=lambda t: t.name), ids=lambda t: t.name)
def test_k_quant_float16_scales_round_once(qtype) -> None:
    """The float16 scale and offset are the float32 products rounded once: per weight, the error is at most
    half a float16 ulp of scale * q and of offset (2**-11 relative, 2**-25 absolute in the subnormal range)."""
    data = gguf_weights(qtype, 5, 512, seed=int(qtype) + 100)
    exact, packed = from_gguf(data, qtype, scale_dtype=torch.float32), from_gguf(data, qtype)
    ref = gguf_reference(data, qtype).double()
    q = (exact.unpack() if isinstance(exact, Int4Groups) else exact.codes).double().view(5, -1, exact.group)
    s = exact.scale.double()[..., None]
    o = exact.offset.double()[..., None] if exact.offset is not None else torch.zeros_like(s)
    bound = 2.0 ** -11 * ((s * q).abs() + o.abs()) + 2.0 ** -25 * (q.abs() + 1) + 2.0 ** -22 * ((s * q).abs() + o.abs())
    err = (packed.dequantize().double() - ref).abs().view_as(q)
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3e}"
    assert err.max() > 0  # the float16 products do round (else this test would not measure anything)


def test_from_reader_tensor_reads_a_gguf_file(tmp_path) -> None:
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    blocks = {"a": (T.Q4_1, gguf_weights(T.Q4_1, 3, 64, seed=1)), "b": (T.Q6_K, gguf_weights(T.Q6_K, 2, 256, seed=2))}
    for name, (qtype, data) in blocks.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(path).tensors:
        qtype, data = blocks[t.name]
        block, size = GGML_QUANT_SIZES[qtype]
        packed = from_reader_tensor(t, scale_dtype=torch.float32 if qtype in K_QUANTS else torch.float16)
        assert packed.shape == (data.shape[0], data.shape[1] // size * block)
        assert torch.equal(packed.dequantize(), gguf_reference(data, qtype))


def test_from_gguf_rejects_bad_input() -> None:
    data = gguf_weights(T.Q8_0, 2, 64, seed=3)
    with pytest.raises(ValueError, match="Q2_K"):
        from_gguf(np.zeros((2, 84), np.uint8), T.Q2_K)
    with pytest.raises(ValueError, match="bytes do not hold"):
        from_gguf(data, T.Q8_0, (2, 96))
    with pytest.raises(ValueError, match="multiple of the block"):
        from_gguf(data, T.Q8_0, (4, 48))
    with pytest.raises(ValueError, match="uint8"):
        from_gguf(data.view(np.int8), T.Q8_0)
    with pytest.raises(ValueError, match="unknown GGUF tensor type"):
        from_gguf(data, 9999)
    big = gguf_weights(T.Q4_K, 1, 256, seed=4)
    big[0, 0:2] = np.array([60000.0], np.float16).view(np.uint8)  # d * 63 overflows float16
    with pytest.raises(ValueError, match="float32"):
        from_gguf(big, T.Q4_K)
    assert torch.isfinite(from_gguf(big, T.Q4_K, scale_dtype=torch.float32).scale).all()


# ------------------------------------------------------------------------------------------------- kernels

def packed_case(name: str, n: int, seed: int) -> tuple[Int4Groups | Int8Groups, torch.Tensor]:
    """(packed weight on DEVICE, float64 reference weights [N, K]): for GGUF types the reference is the gguf
    package's own dequantization; for the quantizers the format's dequantization (checked against w above)."""
    if name.startswith("int"):
        bits, group = name.split("-g")
        k = 96  # not a multiple of BLOCK_K = 64 below
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
        packed = (quantize_int4 if bits == "int4" else quantize_int8)(w, int(group))
        return packed.to(DEVICE), packed.dequantize().double()
    qtype = T[name]
    k = 96 if qtype in WRITABLE else 768  # K-quants: 3 blocks of 256, a ragged second chunk of BLOCK_K = 512
    data = gguf_weights(qtype, n, k, seed)
    return from_gguf(data, qtype, device=DEVICE), gguf_reference(data, qtype).double()


CASES = ["int4-g32", "int4-g16", "int8-g32", "int8-g16", *(t.name for t in sorted(WRITABLE, key=lambda t: t.name)),
         *(t.name for t in sorted(K_QUANTS, key=lambda t: t.name))]


def check_elements(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Every element: |out - ref| <= tol * max(|ref_i|, rms(ref)) (the RMS floor keeps elements that cancel to
    near zero from demanding more than the float32 accumulation gives)."""
    assert torch.isfinite(out).all()
    out = out.cpu().double()
    floor = ref.pow(2).mean().sqrt()
    err = (out - ref).abs() / torch.maximum(ref.abs(), floor)
    assert err.max() <= tol, f"element {int(err.argmax())}: relative error {float(err.max()):.2e}"


def config_for(packed) -> ProjectionConfig:
    """Small split-K blocks: 16 rows (N = 37 is ragged), two slices of K with a ragged last one."""
    per_word = 8 if isinstance(packed, Int4Groups) else 4
    words = 64 // per_word if packed.shape[1] == 96 else 512 // per_word
    return ProjectionConfig(int4=SplitKConfig(16, words, 4), int8=SplitKConfig(16, words, 4))


@pytest.mark.parametrize("kernel", ["rmsnorm_bias", "residual", "swiglu_residual"])
@pytest.mark.parametrize("case", CASES)
def test_lowbit_gemv_matches_float64_matmul(case, kernel) -> None:
    n = 37  # not a multiple of BLOCK_N = 16
    seed = sum(map(ord, case + kernel))
    packed, w_ref = packed_case(case, n, seed)
    k = packed.shape[1]
    gen = torch.Generator().manual_seed(seed + 1)
    cfg = config_for(packed)
    if kernel == "rmsnorm_bias":
        x, nw, base = torch.randn(k, generator=gen), torch.randn(k, generator=gen), torch.randn(n, generator=gen)
        xd = x.double()
        act = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * nw.double()
        out = torch.full((n,), float("nan"), device=DEVICE)
        projections.rmsnorm_gemv(packed, x.to(DEVICE), nw.to(DEVICE), 1e-5, out, bias=base.to(DEVICE), cfg=cfg)
    else:
        base = torch.randn(n, generator=gen)  # the residual stream, updated in place
        a = torch.randn(2 * k if kernel == "swiglu_residual" else k, generator=gen)
        out = base.to(DEVICE).clone()
        if kernel == "swiglu_residual":
            projections.silu_gemv_residual(packed, a.to(DEVICE), out, cfg=cfg)
            act = torch.nn.functional.silu(a[:k].double()) * a[k:].double()
        else:
            projections.gemv_residual(packed, a.to(DEVICE), out, cfg=cfg)
            act = a.double()
    # the kernel's own arithmetic: against the format's dequantized weights. The activation is read as two int8
    # digits per group of 32 (error <= max|a| / 64516 per element): ~1e-5 of an output, up to ~1.5e-4 where
    # large offsets cancel (Q5_1)
    check_elements(out, base.double() + packed.to("cpu").dequantize().double() @ act, 3e-4)
    # the criterion: against the gguf package's weights (K-quants: float16 scale rounding, <= 2**-11)
    check_elements(out, base.double() + w_ref @ act, 1e-3)


@pytest.mark.parametrize("case", ["int4-g32", "Q8_0"])
def test_lowbit_rmsnorm_gemv_half_precision_io(case) -> None:
    """float16 activations, norm weight and output (the model's dtype); no bias."""
    packed, w_ref = packed_case(case, 21, seed=7)
    k = packed.shape[1]
    gen = torch.Generator().manual_seed(8)
    x, nw = torch.randn(k, generator=gen).half(), torch.randn(k, generator=gen).half()
    out = torch.full((21,), float("nan"), device=DEVICE, dtype=torch.float16)
    projections.rmsnorm_gemv(packed, x.to(DEVICE), nw.to(DEVICE), 1e-6, out, cfg=config_for(packed))
    xd = x.double()
    check_elements(out, w_ref @ (xd * torch.rsqrt(xd.pow(2).mean() + 1e-6) * nw.double()), 2e-3)  # fp16 output


# ---------------------------------------------------------------------------------------------- quantizers

def hard_weights(n: int, k: int, group: int, seed: int) -> torch.Tensor:
    """Groups spanning six decades of scale, one constant group, one all-zero group, one lone outlier."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // group, group, generator=gen)
    w *= 10.0 ** torch.empty(n, k // group, 1).uniform_(-4, 2, generator=gen)
    w[0, 0] = 0.3
    w[0, 1] = 0.0
    w[1, 0, 5] = 40.0
    w[2, 0] += 7.0  # a group far from zero: the offset, not the scale, carries its magnitude
    return w.view(n, k)


@pytest.mark.parametrize("group", [16, 32])
def test_quantize_int4_within_half_a_step(group) -> None:
    w = hard_weights(4, 128, group, seed=group)
    packed = quantize_int4(w, group)
    assert packed.codes.dtype == torch.uint8 and packed.shape == (4, 128) and packed.offset is not None
    g = w.double().view(4, -1, group)
    s, o = packed.scale.double(), packed.offset.double()
    err = (packed.dequantize().double().view_as(g) - g).abs()
    slack = 1e-6 * g.abs().amax(-1, keepdim=True)  # float32 rounding of the dequantization
    assert (err <= s[..., None] / 2 + slack).all(), f"max error / scale {float((err / s[..., None]).max()):.3f}"
    lo, hi = g.amin(-1), g.amax(-1)
    assert (o <= lo).all()  # rounded down, so the levels cover the group's minimum...
    # ...and the step is (max - min) / 15 up to two float16 roundings, not a symmetric or padded range
    assert (s <= ((hi - lo) + 2.0 ** -10 * lo.abs()) / 15 * (1 + 2.0 ** -10) + 2.0 ** -24).all()


@pytest.mark.parametrize("group", [16, 32])
def test_quantize_int8_within_half_a_step(group) -> None:
    w = hard_weights(4, 128, group, seed=group + 1)
    packed = quantize_int8(w, group)
    assert packed.codes.dtype == torch.int8 and packed.offset is None
    assert packed.codes.abs().max() <= 127
    g = w.double().view(4, -1, group)
    s = packed.scale.double()
    err = (packed.dequantize().double().view_as(g) - g).abs()
    slack = 1e-6 * g.abs().amax(-1, keepdim=True)
    assert (err <= s[..., None] / 2 + slack).all(), f"max error / scale {float((err / s[..., None]).max()):.3f}"
    assert (s <= g.abs().amax(-1) / 127 * (1 + 2.0 ** -10) + 2.0 ** -24).all()  # the full -127..127 range


def test_quantize_rejects_bad_input() -> None:
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="not a multiple of the group"):
        quantize_int4(w[:, :48], 32)
    with pytest.raises(ValueError, match="group 24"):
        quantize_int8(w, 24)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int4(w[0], 32)
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_int8(torch.where(w > 2, float("nan"), w), 32)
    with pytest.raises(ValueError, match="float16 range"):
        quantize_int4(w * 1e6, 32)


@pytest.mark.cuda
def test_quantizers_on_the_gpu_match_the_cpu() -> None:
    w = hard_weights(8, 256, 32, seed=11)
    for fn in (quantize_int4, quantize_int8):
        cpu, gpu = fn(w, 32), fn(w.cuda(), 32)
        assert gpu.codes.is_cuda
        assert torch.equal(gpu.codes.cpu(), cpu.codes) and torch.equal(gpu.scale.cpu(), cpu.scale)
