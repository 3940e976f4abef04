"""The two-digit FP8 prefill GEMM (`kernels/fp8_prefill.py`) against float64, every element: the digits reconstruct
each activation within their bound, the GEMM's error stays within what that bound lets through, and one digit alone
would not (so the bound can catch a dropped digit). `torch._scaled_mm` runs on the CPU too; the card's run is
`bench.probes.fp8_prefill` and the cuda test below."""

import pytest
import torch

from graph_executor.kernels import fp8_prefill
from graph_executor.quant.formats import quantize_fp8

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def activations(t: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of very different magnitudes, and within a row elements over 5 decades (a prompt's hidden states have a
    few large channels): the digits' relative and subnormal regimes both occur."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * 10 ** (torch.rand(t, k, generator=g) * 5 - 3)  # 1e-3 .. 1e2
    return (x * 10 ** (torch.rand(t, 1, generator=g) * 2 - 1)).to(dtype)  # rows x 0.1 .. 10: within float16


EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}  # half an ulp, relative


def digit_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-element bound of |s (h + l) - x| in float64: 2**-8 of the element, or 2**-10 s where h is subnormal
    (e4m3's subnormal step is 2**-9 s; l rounds the rest to the nearest step)."""
    xd = x.double()
    s = (xd.abs().amax(dim=1, keepdim=True) / 448).clamp_min(fp8_prefill.TINY)
    return torch.maximum(xd.abs() * 2.0 ** -8, s * 2.0 ** -10)


def dense(w) -> torch.Tensor:
    """An Fp8Rows' weights in float64 on the CPU, [N, K]."""
    return (w.codes.double() * w.scale.double()[:, None]).cpu()


def check_within_bound(out: torch.Tensor, x: torch.Tensor, wd: torch.Tensor, ref: torch.Tensor,
                       gemm_dtype: torch.dtype) -> None:
    """Every element of out within the digits' error through W, plus each digit's product rounded to the GEMM's
    dtype, their sum to out's, and float32 sums."""
    x, out = x.cpu(), out.cpu()
    products = x.double().abs() @ wd.abs().t()
    rounding = products * EPS[gemm_dtype] + (ref.abs() + products) * EPS[out.dtype] + products * 2.0 ** -18
    bound = digit_bound(x) @ wd.abs().t() + rounding
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{gemm_dtype}: worst element at {float((err / bound).max()):.2f} of its bound"


def test_two_digits_reconstruct_every_activation_within_their_bound():
    x = activations(9, 300, seed=1)
    x[4] = 0  # a row of zeros: digits 0, no NaN
    digits, scales = fp8_prefill.split_digits(x)
    assert digits.dtype == torch.float8_e4m3fn and tuple(digits.shape) == (18, 300) and tuple(scales.shape) == (18, 1)
    h, low = digits[:9].double(), digits[9:].double()
    assert torch.equal(scales[:9], scales[9:])
    s = scales[:9].double()
    bound = digit_bound(x)
    err = (s * (h + low) - x.double()).abs()
    assert torch.isfinite(err).all() and (err <= bound).all(), float((err / bound).max())
    assert (s * h - x.double()).abs().gt(bound).any()  # one digit alone is outside it
    assert (h[4] == 0).all() and (low[4] == 0).all()


@pytest.mark.parametrize("dtype,gemm_dtype,bias,accumulate", [
    (torch.float32, None, False, False),
    (torch.float16, None, True, False),
    (torch.float16, None, False, True),
    (torch.bfloat16, None, True, False),
    (torch.float16, torch.bfloat16, False, False),  # the GEMM's output in bfloat16, as some builds require
])
def test_matmul_matches_float64_within_the_digits_bound(dtype, gemm_dtype, bias, accumulate):
    t, n, k = 13, 37, 200
    x = activations(t, k, seed=2, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    w = quantize_fp8(torch.randn(n, k, generator=g) * 0.05)
    wd = dense(w)  # [N, K]
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    start = torch.randn(t, n, generator=g).to(dtype)
    out = start.clone() if accumulate else torch.full((t, n), float("nan"), dtype=dtype)
    got = fp8_prefill.matmul(x, w, out, bias=b, accumulate=accumulate, gemm_dtype=gemm_dtype)
    assert got is out and torch.isfinite(out).all()  # every element written
    ref = x.double() @ wd.t() + (start.double() if accumulate else 0) + (b.double() if bias else 0)
    check_within_bound(out, x, wd, ref, gemm_dtype or dtype)


def test_one_digit_would_fail_the_matmul_bound():
    """The bound above is tight enough to see a dropped digit: the product of h alone exceeds it."""
    t, n, k = 13, 37, 200
    x = activations(t, k, seed=2)
    w = quantize_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05)
    wd = dense(w)
    digits, scales = fp8_prefill.split_digits(x)
    one = (scales[:t].double() * digits[:t].double()) @ wd.t()
    bound = digit_bound(x) @ wd.abs().t() + (x.double().abs() @ wd.abs().t()) * 2.0 ** -18
    assert ((one - x.double() @ wd.t()).abs() > bound).any()


def test_bad_shapes_are_refused_in_one_line():
    w = quantize_fp8(torch.randn(8, 16))
    with pytest.raises(ValueError, match="do not fit"):
        fp8_prefill.matmul(torch.randn(4, 12), w, torch.empty(4, 8))
    with pytest.raises(ValueError, match="do not fit"):
        fp8_prefill.matmul(torch.randn(4, 16), w, torch.empty(4, 9))
    with pytest.raises(ValueError, match="2-D float16"):
        fp8_prefill.split_digits(torch.zeros(4, 16, dtype=torch.int32))


@CUDA
@pytest.mark.cuda
def test_matmul_on_the_gpu_matches_float64():
    """The card's `_scaled_mm` (row scales; out in float16 where the build takes it, else bfloat16) against float64 on a
    7B-like K, every element within the digits' bound."""
    t, n, k = 64, 256, 4096
    x = activations(t, k, seed=5, dtype=torch.float16).cuda()
    w = quantize_fp8(torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.02).to("cuda")
    out = torch.empty(t, n, dtype=torch.float16, device="cuda")
    try:
        fp8_prefill.matmul(x, w, out)
        gemm = torch.float16
    except RuntimeError:
        gemm = torch.bfloat16
        fp8_prefill.matmul(x, w, out, gemm_dtype=gemm)
    torch.cuda.synchronize()
    wd = dense(w)
    check_within_bound(out, x, wd, x.cpu().double() @ wd.t(), gemm)
