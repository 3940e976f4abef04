"""The split-K FP8 GEMVs (graph_executor/kernels/gemv_fp8.py) against float64 matmuls over the dequantized weights,
every output element checked: the three fusions, K not a multiple of the K slice, N not a multiple of BLOCK_N, a
single slice (the only program does the fixup), a QKV bias, float32 and float16 activations, a zero row; the
scratch is left clean and a second call gives the same bits; every finite e4m3 code converts exactly; the dispatch
in projections.py (new path, old fp16 path, scratch sizing); bad input. On CPU the kernel runs in the Triton
interpreter; the `cuda` test runs the compiled kernel, on LLaMA-2-7B shapes with the decoder's plan too."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graph_executor.fused_decoder import FP8_GEMV_PLAN, FP8_PLAN
from graph_executor.kernels import gemv_fp8, projections
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_fp8 import Fp8Config
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.kernels.projections import ProjectionConfig
from graph_executor.quant.formats import Fp8Rows, quantize_fp8

CASES = [  # n, k, config, activation dtype
    (37, 300, Fp8Config(16, 128, 2), torch.float32),  # 3 slices, the last 44 wide; 3 row blocks, the last 5 rows
    (40, 200, Fp8Config(16, 256, 2), torch.float32),  # one slice: no partner program
    (5, 96, Fp8Config(8, 32, 1), torch.float32),  # fewer rows than a block
    (48, 520, Fp8Config(32, 256, 4), torch.float16),  # the model's dtype: output rounded once to float16
]
TOL = 1e-3


def fp8_weight(n: int, k: int, device: torch.device, seed: int) -> Fp8Rows:
    """Rows of very different magnitudes (the per-row scale matters) and one zero row (scale 1, codes 0)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 0.05
    dense[n // 2] = 0
    return quantize_fp8(dense).to(device)


def dequantized(w: Fp8Rows) -> torch.Tensor:
    """[N, K] float64, exactly code * scale."""
    return w.codes.cpu().float().double() * w.scale.cpu().double()[:, None]


def check_elements(out: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    """Every element: |out - ref| <= tol * max(|ref_i|, rms(ref)) (the RMS floor keeps elements that cancel to
    near zero from demanding more than float32 accumulation gives; test_quant.py checks the same way)."""
    out = out.cpu().double()
    assert torch.isfinite(out).all()
    err = (out - ref).abs() / torch.maximum(ref.abs(), ref.pow(2).mean().sqrt())
    assert err.max() <= tol, f"element {int(err.argmax())}: relative error {float(err.max()):.2e}"


def vectors(n: int, k: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = {"x": torch.randn(k, generator=g), "nw": torch.rand(k, generator=g) + 0.5, "bias": torch.randn(n, generator=g),
         "r": torch.randn(n, generator=g), "gate_up": torch.randn(2 * k, generator=g)}
    v["x"][: k // 4] *= 30  # a few large activations next to small ones
    return {name: t.to(dtype) for name, t in v.items()}


def check(device: torch.device, n: int, k: int, cfg: Fp8Config, dtype: torch.dtype, seed: int) -> None:
    w = fp8_weight(n, k, device, seed)
    dense = dequantized(w)
    v = vectors(n, k, dtype, seed + 1)
    d = {name: t.double() for name, t in v.items()}  # the reference reads the same (rounded) inputs
    on = {name: t.to(device) for name, t in v.items()}
    scratch = gemv_fp8.allocate_scratch(w, cfg)
    eps = 1e-5

    out = torch.full((n,), float("nan"), device=device, dtype=dtype)
    gemv_fp8.rmsnorm_gemv(w, on["x"], on["nw"], eps, out, scratch, bias=on["bias"], cfg=cfg)
    ref = dense @ (d["x"] * d["nw"]) / torch.sqrt((d["x"] * d["x"]).mean() + eps) + d["bias"]
    check_elements(out, ref)
    again = torch.empty_like(out)
    gemv_fp8.rmsnorm_gemv(w, on["x"], on["nw"], eps, again, scratch, bias=on["bias"], cfg=cfg)
    assert torch.equal(again, out)  # deterministic, and the counters were reset
    no_bias = gemv_fp8.rmsnorm_gemv(w, on["x"], on["nw"], eps, torch.empty_like(out), scratch, cfg=cfg)
    check_elements(no_bias, ref - d["bias"])

    got = gemv_fp8.gemv_residual(w, on["x"], on["r"].clone(), scratch, cfg)
    check_elements(got, d["r"] + dense @ d["x"])

    got = gemv_fp8.silu_gemv_residual(w, on["gate_up"], on["r"].clone(), scratch, cfg)
    g, u = d["gate_up"][:k], d["gate_up"][k:]
    check_elements(got, d["r"] + dense @ (g * torch.sigmoid(g) * u))
    assert int(scratch.count.abs().sum()) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the Triton interpreter, which is on only "
                    "where there is no GPU; the cuda test runs these cases")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2].block_n}x{c[2].block_k}-{c[3]}")
def test_fp8_gemv_matches_float64(case) -> None:
    check(torch.device("cpu"), *case, seed=3)


def fixup_and_reduce_kernel_agree(module, w, on: dict[str, torch.Tensor], cfg, dtype: torch.dtype) -> None:
    """`module` (gemv_fp8 or gemv_dense_splitk) over weight w and the vectors `on` with cfg, then with
    cfg.reduce_kernel: the partials added by gemv_splitk's `_reduce_kernel` give the fixup's bits in each fusion
    (the row scale, 1 / rms, the bias, the residual), and the counters stay zero."""
    results = []
    for reduce_kernel in (False, True):
        c = dataclasses.replace(cfg, reduce_kernel=reduce_kernel)
        scratch = module.allocate_scratch(w, c)
        out = torch.full((w.shape[0],), float("nan"), device=on["x"].device, dtype=dtype)
        module.rmsnorm_gemv(w, on["x"], on["nw"], 1e-5, out, scratch, bias=on["bias"], cfg=c)
        results.append((out, module.gemv_residual(w, on["x"], on["r"].clone(), scratch, c),
                        module.silu_gemv_residual(w, on["gate_up"], on["r"].clone(), scratch, c)))
        assert int(scratch.count.abs().sum()) == 0
    for fixed_up, reduced in zip(*results):
        assert torch.equal(fixed_up, reduced), (tuple(w.shape), cfg)


def identical_with_a_reduce_kernel(device: torch.device) -> None:
    """Fp8Config(reduce_kernel=True) against the fixup, every case."""
    for i, (n, k, cfg, dtype) in enumerate(CASES):
        on = {name: t.to(device) for name, t in vectors(n, k, dtype, seed=50 + i).items()}
        fixup_and_reduce_kernel_agree(gemv_fp8, fp8_weight(n, k, device, seed=40 + i), on, cfg, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the Triton interpreter, which is on only "
                    "where there is no GPU; the cuda test runs the same")
def test_a_reduce_kernel_gives_the_fixups_bits() -> None:
    identical_with_a_reduce_kernel(torch.device("cpu"))


@pytest.mark.cuda
def test_a_reduce_kernel_gives_the_fixups_bits_on_the_gpu() -> None:
    identical_with_a_reduce_kernel(torch.device("cuda"))


@pytest.mark.cuda
def test_fp8_gemv_on_the_gpu_matches_float64() -> None:
    h, i = 4096, 11008  # LLaMA-2-7B, with the decoder's plan
    # the sweep's best split-K configs (the decoder runs qkv and o through the fp16 kernels: faster there)
    real = [(3 * h, h, Fp8Config(32, 512, 4)), (h, h, Fp8Config(64, 512, 8)), (2 * i, h, FP8_PLAN.gate_up),
            (h, i, FP8_PLAN.down)]
    for index, (n, k, cfg, dtype) in enumerate(CASES + [(n, k, c, torch.float16) for n, k, c in real]):
        check(torch.device("cuda"), n, k, cfg, dtype, seed=10 + index)


def test_every_finite_e4m3_code_converts_exactly() -> None:
    """Row i holds code i alone (K = 1, scale 1): x = 0 + W @ [1] reads each of the 254 finite codes (subnormals,
    both zeros, +-448) back exactly, in the interpreter (CPU) as in the compiled kernel."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~codes.float().isnan()][:, None].contiguous()  # [254, 1]
    w = Fp8Rows(codes.to(device), torch.ones(codes.shape[0], device=device))
    cfg = Fp8Config(16, 32, 1)
    x = torch.zeros(codes.shape[0], device=device)
    gemv_fp8.gemv_residual(w, torch.ones(1, device=device), x, gemv_fp8.allocate_scratch(w, cfg), cfg)
    assert torch.equal(x.cpu(), codes.float()[:, 0])


def test_projections_dispatch_fp8_to_the_split_k_kernels_and_keep_the_old_path() -> None:
    """projections.py: an Fp8Config takes the split-K kernel (with its own scratch when given none), a GemvConfig
    the fp16 kernels (the old path); both agree with float64, and the decoder's scratch sizing counts FP8 slots."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, k = 37, 300
    w = fp8_weight(n, k, device, seed=21)
    dense = dequantized(w)
    v = {name: t.to(device) for name, t in vectors(n, k, torch.float32, seed=22).items()}
    d = {name: t.cpu().double() for name, t in v.items()}
    ref = d["r"] + dense @ d["x"]
    new, old = ProjectionConfig(fp8=Fp8Config(16, 128, 2)), ProjectionConfig(fp8=GemvConfig(8, 64, 2, 1))
    check_elements(projections.gemv_residual(w, v["x"], v["r"].clone(), cfg=new), ref)
    check_elements(projections.gemv_residual(w, v["x"], v["r"].clone(), cfg=old), ref)
    assert projections.decode_scratch_size(w, new) == gemv_fp8.scratch_size(w, new.fp8) == (3 * n + 3 * 3, 3)
    assert projections.decode_scratch_size(w, old) == (0, 0)
    assert projections.decode_scratch_size(torch.zeros(n, k), new) == (0, 0)
    assert isinstance(FP8_PLAN.lm_head, Fp8Config) and isinstance(FP8_GEMV_PLAN.o, GemvConfig)  # mixed plan


def test_fp8_gemv_rejects_bad_input() -> None:
    cpu = torch.device("cpu")
    w = fp8_weight(64, 256, cpu, seed=0)
    cfg = Fp8Config(32, 128, 1)
    scratch = gemv_fp8.allocate_scratch(w, cfg)
    x = torch.zeros(64)
    with pytest.raises(ValueError, match="expected a contiguous"):
        gemv_fp8.gemv_residual(w, torch.zeros(128), x, scratch, cfg)
    with pytest.raises(ValueError, match="expected a contiguous"):
        gemv_fp8.silu_gemv_residual(w, torch.zeros(256), x, scratch, cfg)  # needs [gate, up]: 2K
    with pytest.raises(ValueError, match="scratch too small"):
        gemv_fp8.gemv_residual(w, torch.zeros(256), x, scratch, Fp8Config(16, 64, 1))
    with pytest.raises(ValueError, match="scratch too small"):
        gemv_fp8.gemv_residual(w, torch.zeros(256), x, SplitKScratch.zeros(1, 1, cpu), cfg)
    with pytest.raises(ValueError, match="expected Fp8Rows"):
        gemv_fp8.gemv_residual(torch.zeros(64, 256), torch.zeros(256), x, scratch, cfg)
    with pytest.raises(ValueError, match="expected an Fp8Config"):
        gemv_fp8.gemv_residual(w, torch.zeros(256), x, scratch, GemvConfig())
    with pytest.raises(ValueError, match="power of two"):
        Fp8Config(24, 128, 4)
    with pytest.raises(ValueError, match="power of two"):
        Fp8Config(32, 0, 4)
    with pytest.raises(ValueError, match="unknown mode"):
        gemv_fp8.precompile(64, 256, cfg, 7, torch.float16, torch.float16)
