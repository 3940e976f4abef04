"""The integer tensor-core prefill GEMM over packed int4 / int8 weights (graph_executor/kernels/gemm_digits.py)
against float64 matmuls of the formats' own dequantized values, every output checked: symmetric and offset
formats, groups of 32 / 64 / 128, ragged N, T and K (K not whole loop steps), split K, bias, the residual add,
tile-major storage and the three activation dtypes. Triton interpreter on the CPU; the same cases on a GPU."""

import pytest
import torch

from graph_executor.kernels import gemm_digits
from graph_executor.kernels.gemm_digits import DigitsConfig, DigitsScratch
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.quant.formats import Int4Groups, Int8Groups, quantize_int4, quantize_int8
from graph_executor.quant.tiles import tiles_for

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def packed(kind: str, n: int, k: int, group: int, seed: int) -> Int4Groups | Int8Groups:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(DEVICE)
    if kind == "int4":
        return quantize_int4(w, group)
    if kind == "int4-sym":  # scale (q - 8): the -8 scale offset the kernel adds
        q = quantize_int4(w, group)
        return Int4Groups(q.codes, q.scale, None, group)
    if kind == "int8":
        return quantize_int8(w, group)
    q = quantize_int8(w, group)  # with an offset (GGUF Q5_1-like)
    return Int8Groups(q.codes, q.scale, (torch.rand(q.scale.shape, generator=g) - 0.5).half().to(DEVICE), group)


def reference(x: torch.Tensor, w, bias: torch.Tensor | None, start: torch.Tensor | None) -> torch.Tensor:
    want = x.double().cpu() @ w.dequantize(torch.float64).cpu().t()
    if bias is not None:
        want += bias.double().cpu()
    if start is not None:
        want += start.double().cpu()
    return want


def check(out: torch.Tensor, want: torch.Tensor, x: torch.Tensor, w) -> None:
    """Within the two digits' bound, |x - d (hi + lo / 256)| <= d / 256 an element (d = max|x| / 127 over its token's
    group; d / 512 but where the low digit saturates at 127), carried through |W|, plus float32 sums and out's
    rounding."""
    group = w.group
    xg = x.double().cpu().view(x.shape[0], -1, group)
    step = (xg.abs().amax(-1, keepdim=True) / 127 / 256).expand_as(xg).reshape(x.shape)  # [T, K]
    wa = w.dequantize(torch.float64).cpu().abs()
    # a whole bfloat16 ulp: the interpreter's float32 -> bfloat16 cast truncates
    rounding = {torch.float32: 2**-23, torch.float16: 2**-11, torch.bfloat16: 2**-7}[out.dtype]
    bound = step @ wa.t() + 1e-6 * (x.double().cpu().abs() @ wa.t()) + rounding * want.abs()
    err = (out.double().cpu() - want).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0 or x.abs().max() == 0  # the digits are not exact: a float path would differ


CASES = [  # kind, N, K, group, T, cfg
    ("int4", 80, 224, 32, 5, DigitsConfig(64, 16, 4, 1)),  # ragged N, K of 7 groups: a partial loop step
    ("int4-sym", 64, 256, 32, 37, DigitsConfig(32, 16, 2, 3)),  # split K, T over two token blocks
    ("int8", 48, 192, 64, 16, DigitsConfig(16, 16, 1, 2)),
    ("int8-offset", 64, 384, 128, 3, DigitsConfig(64, 32, 2, 2)),
    ("int4", 64, 512, 64, 20, DigitsConfig(32, 32, 4, 4)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-g{c[3]}-t{c[4]}")
def test_gemm_digits_matches_float64(case) -> None:
    kind, n, k, group, t, cfg = case
    w = packed(kind, n, k, group, seed=n + k)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, k, generator=g)
    x[:, : k // 3] *= 20  # groups of very different sizes: each its own d
    x = x.to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    out = torch.full((t, n), float("nan"), device=DEVICE)
    gemm_digits.gemm(x, w, out, cfg=cfg)
    check(out, reference(x, w, None, None), x, w)
    start = torch.randn(t, n, generator=g).to(DEVICE)
    out = start.clone()
    gemm_digits.gemm(x, w, out, bias=bias, accumulate=True, cfg=cfg)
    check(out, reference(x, w, bias, start), x, w)
    out2 = torch.empty(t, n, device=DEVICE)
    scratch = SplitKScratch.zeros(gemm_digits.scratch_floats(t, n, k, group, cfg), 0, DEVICE)
    gemm_digits.gemm(x, w, out2, bias=bias, cfg=cfg, scratch=scratch,
                     digit_scratch=DigitsScratch.allocate(t + 4, k, group, DEVICE))
    check(out2, reference(x, w, bias, None), x, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rows_and_tile_major_weights(dtype) -> None:
    """float16 / bfloat16 activations and outputs; the weight stored tile-major (quant/tiles.py) gives the row-major
    call's output (the same loads, other addresses)."""
    w = packed("int4", 64, 1024, 32, seed=4)
    x = torch.randn(9, 1024, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    outs = []
    for weight in (w, w.tiled(tiles_for(w, 32, 128))):
        out = torch.empty(9, 64, device=DEVICE, dtype=dtype)
        gemm_digits.gemm(x, weight, out, cfg=DigitsConfig(32, 16, 4, 2))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    check(outs[0], reference(x, w, None, None), x, w)


def test_digits_hold_each_group_within_d_over_512() -> None:
    """x ~= d (hi + lo / 256) per token and group, d = max|x| / 127 over the group, within d / 256 (d / 512 where
    the low digit does not saturate); xs is the group's exact sum."""
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(6)) * torch.logspace(-3, 2, 128)
    x = x.to(DEVICE)
    s = gemm_digits.digits(x, 32, DigitsScratch.allocate(3, 128, 32, DEVICE))
    back = (s.hi.double() + s.lo.double() / 256).cpu().view(3, 4, 32) * (256 * s.dd.double().cpu())[:, :, None]
    xg = x.double().cpu().view(3, 4, 32)
    err, d = (back - xg).abs(), xg.abs().amax(-1, keepdim=True) / 127
    assert bool((err <= d / 256 * 1.0001).all())
    assert float((err <= d / 512 * 1.0001).double().mean()) > 0.97  # saturation is the exception
    assert torch.allclose(s.xs.double().cpu(), xg.sum(-1), rtol=1e-6, atol=1e-6)


def test_bad_input_is_one_line() -> None:
    w = packed("int4", 64, 256, 32, seed=1)
    x = torch.randn(4, 256, device=DEVICE)
    with pytest.raises(ValueError, match="groups of 32, 64 or 128"):
        gemm_digits.gemm(x, quantize_int4(torch.randn(64, 256, device=DEVICE), 16), torch.empty(4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="x: expected"):
        gemm_digits.gemm(x[:, :128], w, torch.empty(4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="out: expected"):
        gemm_digits.gemm(x, w, torch.empty(4, 64, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="scratch"):
        gemm_digits.gemm(x, w, torch.empty(4, 64, device=DEVICE), cfg=DigitsConfig(32, 16, 1, 4),
                         scratch=SplitKScratch.zeros(1, 0, DEVICE))
    with pytest.raises(ValueError, match="DigitsConfig"):
        DigitsConfig(48)
