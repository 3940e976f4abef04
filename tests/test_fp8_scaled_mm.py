"""kernels/fp8_scaled_mm.py: FP8 prefill projections on `torch._scaled_mm` with the activations quantized per token
row (W8A8): the per-row quantization's error bound, the product against a float64 matmul of the quantized operands
(every element, bias, residual add, odd shapes), bad input, and a whole prefill step with it against the default path
(the Triton kernels under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from graph_executor.kernels import fp8_scaled_mm, projections
from graph_executor.quant.formats import Fp8Rows, quantize_fp8, quantize_int8

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
# the product's own rounding: bfloat16 on CUDA (row-wise scaling's output type), float32 on CPU
PRODUCT_TOL = 2 ** -7 if DEVICE.type == "cuda" else 1e-5


def test_rows_quantize_within_e4m3s_rounding_and_zero_rows_stay_zero() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 200, generator=g) * torch.logspace(-3, 3, 9)[:, None]  # rows of very different sizes
    x[4] = 0.0
    codes, scale = fp8_scaled_mm.quantize_rows(x.to(DEVICE))
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (9, 1) and torch.isfinite(scale).all()
    back = codes.float() * scale  # [T, K]
    err = (back.cpu() - x).abs()
    # 3 mantissa bits: half an ulp is 2^-4 of a value; below e4m3's normal range the spacing is 2^-9 of the scale
    assert (err <= x.abs() * 2 ** -4 + scale.cpu() * 2 ** -9 * 1.0001).all()
    assert (back[4] == 0).all()
    assert (codes.float().abs().amax(dim=1)[torch.arange(9) != 4] == fp8_scaled_mm.E4M3_MAX).all()


def _case(t: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = quantize_fp8((torch.randn(n, k, generator=g) * 0.05).to(DEVICE))
    x = torch.randn(t, k, generator=g).to(DEVICE, DTYPE)
    bias = torch.randn(n, generator=g).to(DEVICE, DTYPE)
    base = torch.randn(t, n, generator=g).to(DEVICE, DTYPE)
    return w, x, bias, base


def _quantized_reference(x: torch.Tensor, w: Fp8Rows) -> torch.Tensor:
    """float64 (rows as the kernel quantizes them) @ (the weight as stored)^T."""
    codes, scale = fp8_scaled_mm.quantize_rows(x)
    xq = codes.double() * scale.double()
    return xq @ (w.codes.double() * w.scale.double()[:, None]).T


@pytest.mark.parametrize("t,n,k", [(16, 64, 128), (37, 96, 160), (130, 48, 64)])
@pytest.mark.parametrize("mode", ["plain", "bias", "accumulate"])
def test_the_product_equals_a_float64_matmul_of_the_quantized_operands(t: int, n: int, k: int, mode: str) -> None:
    w, x, bias, base = _case(t, n, k, seed=t + n)
    want = _quantized_reference(x, w)
    if mode == "bias":
        want = want + bias.double()
    if mode == "accumulate":
        want = want + base.double()
    out = base.clone() if mode == "accumulate" else torch.full_like(base, float("nan"))
    got = fp8_scaled_mm.matmul(x, w, out, bias=bias if mode == "bias" else None, accumulate=mode == "accumulate")
    assert got is out and not out.isnan().any()  # every element written
    scale = want.abs().amax()
    assert float((out.double() - want).abs().max() / scale) < PRODUCT_TOL
    # and against the unquantized activations: the W8A8 rounding, a few 1e-2 of the largest output at most
    exact = x.double() @ (w.codes.double() * w.scale.double()[:, None]).T
    if mode == "plain":
        assert float((out.double() - exact).abs().max() / exact.abs().amax()) < 0.08


def test_bad_input_is_a_clear_error() -> None:
    w, x, bias, base = _case(8, 32, 64, seed=2)
    with pytest.raises(TypeError, match="an Fp8Rows weight, got Int8Groups"):
        fp8_scaled_mm.matmul(x, quantize_int8(torch.randn(32, 64).to(DEVICE), 32), base)
    with pytest.raises(ValueError, match=r"x \[T, 64\] and out \[T, 32\]"):
        fp8_scaled_mm.matmul(x[:, :32], w, base)


def test_projections_take_it_only_for_fp8_weights_from_the_threshold() -> None:
    """projections.matmul: fp8_scaled_mm_rows None keeps the low-bit GEMM; from the threshold an FP8 weight's rows are
    quantized (the result is the W8A8 one, not the W8A16 one); other weights never are."""
    w, x, bias, base = _case(16, 64, 128, seed=4)
    w8a16 = projections.matmul(x, w, torch.empty_like(base))
    w8a8 = fp8_scaled_mm.matmul(x, w, torch.empty_like(base))
    assert not torch.equal(w8a16, w8a8)  # the two paths differ, so the checks below tell them apart
    assert torch.equal(projections.matmul(x, w, torch.empty_like(base), fp8_scaled_mm_rows=17), w8a16)
    assert torch.equal(projections.matmul(x, w, torch.empty_like(base), fp8_scaled_mm_rows=16), w8a8)
    i8 = quantize_int8(torch.randn(64, 128).to(DEVICE), 32)
    assert torch.equal(projections.matmul(x, i8, torch.empty_like(base), fp8_scaled_mm_rows=1),
                       projections.matmul(x, i8, torch.empty_like(base)))


def test_a_prefill_step_with_it_stays_near_the_default_path(tmp_path) -> None:
    """FusedPrefill(fp8_scaled_mm_rows=1) on an --quantize fp8 model: every logit within the W8A8 rounding of the
    default (W8A16) path's, and not equal to it (the path was taken)."""
    import transformers

    from graph_executor.fused_prefill import FusedPrefill
    from graph_executor.loading.loader import LoadConfig, load_model
    from graph_executor.quant.apply import quantize_model
    from graph_executor.quant.specs import quantize_plan
    from tests.test_model_equivalence import BASE, make_hf_model

    make_hf_model(transformers.LlamaConfig, dict(num_key_value_heads=2), seed=31).save_pretrained(tmp_path)
    model = load_model(LoadConfig(model=str(tmp_path), device=str(DEVICE), dtype="float32", max_context=32,
                                  progress=False)).model
    quantize_model(model, quantize_plan("fp8", 32, model.config), progress=False, keep_packed=True)
    ids = torch.randint(0, BASE["vocab_size"], (12,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    runs = []
    for rows in (None, 1):
        logits = torch.full((BASE["vocab_size"],), float("nan"), device=DEVICE)
        FusedPrefill(model, 16, fp8_scaled_mm_rows=rows).run(ids, torch.arange(12, device=DEVICE),
                                                             torch.tensor([11], device=DEVICE), logits)
        runs.append(logits.double().cpu())
    default, w8a8 = runs
    assert not w8a8.isnan().any() and not torch.equal(default, w8a8)
    assert float((w8a8 - default).abs().max() / default.abs().max()) < 0.1
    # the reference step with the same W8A8 projections (LlamaModel.fp8_activations: what bench.quality scores)
    # gives the fused step's logits, as the W8A16 reference gives the default step's
    t = ids.shape[0]
    model.fp8_activations = True
    reference = model(ids, torch.arange(t, device=DEVICE), torch.tensor([t - 1], device=DEVICE), t)[0].double().cpu()
    model.fp8_activations = False
    plain = model(ids, torch.arange(t, device=DEVICE), torch.tensor([t - 1], device=DEVICE), t)[0].double().cpu()
    assert float((reference - w8a8).abs().max() / w8a8.abs().max()) < 1e-4
    assert float((plain - default).abs().max() / default.abs().max()) < 1e-4 and not torch.equal(reference, plain)


def test_the_quality_reports_w8a8_flag_needs_a_gpu() -> None:
    from bench.quality import QualityConfig, parse_args

    if DEVICE.type == "cpu":
        with pytest.raises(SystemExit):
            parse_args(["--device", "cpu", "--fp8-activations"])
    assert QualityConfig(fp8_activations=True).fp8_activations
