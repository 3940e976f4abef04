"""The split-K GEMVs (graph_executor/kernels/gemv_splitk.py) against float64 matmuls, every output checked:
int4 and int8, the three fusions, with and without offsets, groups of 16, 32 and 128, N and K not multiples of
the blocks, a QKV bias, activations with a large value in a group; the scratch is left clean and a second call
gives the same bits; bad input. On CPU the kernel runs in the Triton interpreter with dp4a emulated; the `cuda`
test runs the inline-PTX dp4a. (Every GGUF type through the same kernels: tests/test_quant.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from graph_executor.kernels import gemv_splitk
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch
from graph_executor.quant.formats import Int4Groups, Int8Groups, quantize_int4, quantize_int8

CASES = [  # bits, n, k, group, symmetric (int4: no offset; int8: quantize_int8's codes, else with an offset)
    (4, 40, 512, 32, False, SplitKConfig(32, 16, 4)),
    (4, 37, 320, 16, True, SplitKConfig(16, 16, 2)),
    (4, 32, 1024, 128, False, SplitKConfig(32, 64, 8)),
    (8, 40, 512, 32, True, SplitKConfig(32, 32, 4)),
    (8, 37, 320, 16, False, SplitKConfig(16, 16, 2)),
    (8, 33, 96, 32, False, SplitKConfig(8, 8, 1)),
]


def weight(bits: int, n: int, k: int, group: int, symmetric: bool, device: torch.device,
           seed: int) -> Int4Groups | Int8Groups:
    g = torch.Generator().manual_seed(seed)
    dense = (torch.randn(n, k, generator=g) * 0.02).to(device)
    if bits == 4:
        w = quantize_int4(dense, group)
        return Int4Groups(w.codes, w.scale, None, group) if symmetric else w
    w = quantize_int8(dense, group)
    if symmetric:
        return w
    offset = (torch.randn(n, k // group, generator=g) * 1e-3).to(device, w.scale.dtype)  # as Q5_1 / Q5_K carry
    return Int8Groups(w.codes, w.scale, offset, group)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max())


def check(device: torch.device, bits: int, n: int, k: int, group: int, symmetric: bool, cfg: SplitKConfig,
          seed: int) -> None:
    w = weight(bits, n, k, group, symmetric, device, seed)
    dense = w.dequantize(torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    x, nw, bias, r = (torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5, torch.randn(n, generator=g),
                      torch.randn(n, generator=g))
    x[: k // 4] *= 30  # a group with a large value next to small ones: the second int8 digit matters
    gate_up = torch.randn(2 * k, generator=g)
    scratch = SplitKScratch.allocate([w], [cfg], device)
    eps = 1e-5
    out = torch.full((n,), float("nan"), device=device)
    gemv_splitk.rmsnorm_gemv(w, x.to(device), nw.to(device), eps, out, scratch, bias=bias.to(device), cfg=cfg)
    xd = x.double()
    ref = (dense.cpu() @ (xd * nw.double())) / torch.sqrt((xd * xd).mean() + eps) + bias.double()
    assert rel(out, ref) < 1e-4
    again = torch.empty_like(out)
    gemv_splitk.rmsnorm_gemv(w, x.to(device), nw.to(device), eps, again, scratch, bias=bias.to(device), cfg=cfg)
    assert torch.equal(again, out)  # deterministic, and the counters were reset
    got = gemv_splitk.gemv_residual(w, x.to(device), r.clone().to(device), scratch, cfg)
    assert rel(got, r.double() + dense.cpu() @ xd) < 1e-4
    got = gemv_splitk.silu_gemv_residual(w, gate_up.to(device), r.clone().to(device), scratch, cfg)
    gd = gate_up.double()
    assert rel(got, r.double() + dense.cpu() @ (gd[:k] * torch.sigmoid(gd[:k]) * gd[k:])) < 1e-4
    assert int(scratch.count.abs().sum()) == 0


# On the CPU (the interpreter is slow), the cases that only these tests have: several K slices with ragged N and K
# for each width, and weight groups wider than the activation's (test_quant.py runs every GGUF type through the
# same kernels at groups of 16 and 32). The GPU test runs them all.
CPU_CASES = [CASES[1], CASES[2], CASES[4]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the Triton interpreter, which is on only "
                    "where there is no GPU; the cuda test runs these cases")
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"int{c[0]}-{c[1]}x{c[2]}-g{c[3]}{'-sym' if c[4] else ''}")
def test_splitk_gemv_matches_float64(case) -> None:
    check(torch.device("cpu"), *case, seed=3)


@pytest.mark.cuda
def test_splitk_gemv_on_the_gpu_matches_float64() -> None:
    for i, case in enumerate(CASES + [(4, 4096, 11008, 32, False, gemv_splitk.DEFAULT),
                                      (4, 12288, 4096, 32, True, gemv_splitk.DEFAULT),
                                      (8, 4096, 11008, 32, True, gemv_splitk.DEFAULT_INT8)]):
        check(torch.device("cuda"), *case, seed=10 + i)


def identical_with_a_reduce_kernel(device: torch.device, cases: list) -> None:
    """The partials added by `_reduce_kernel` (SplitKConfig.reduce_kernel) give the fixup's bits, every case and
    fusion (bias included), and leave the counters untouched."""
    for i, (bits, n, k, group, symmetric, cfg) in enumerate(cases):
        w = weight(bits, n, k, group, symmetric, device, seed=20 + i)
        g = torch.Generator().manual_seed(30 + i)
        x, nw, bias, r, gate_up = (torch.randn(k, generator=g).to(device), (torch.rand(k, generator=g) + 0.5).to(device),
                                   torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device),
                                   torch.randn(2 * k, generator=g).to(device))
        results = []
        for reduce_kernel in (False, True):
            c = dataclasses.replace(cfg, reduce_kernel=reduce_kernel)
            scratch = SplitKScratch.allocate([w], [c], device)
            out = torch.full((n,), float("nan"), device=device)
            gemv_splitk.rmsnorm_gemv(w, x, nw, 1e-5, out, scratch, bias=bias, cfg=c)
            results.append((out, gemv_splitk.gemv_residual(w, x, r.clone(), scratch, c),
                            gemv_splitk.silu_gemv_residual(w, gate_up, r.clone(), scratch, c)))
            assert int(scratch.count.abs().sum()) == 0
        for fixed_up, reduced in zip(*results):
            assert torch.equal(fixed_up, reduced), (bits, n, k, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors need the Triton interpreter, which is on only "
                    "where there is no GPU; the cuda test runs the same")
def test_a_reduce_kernel_gives_the_fixups_bits() -> None:
    identical_with_a_reduce_kernel(torch.device("cpu"), [CASES[1], CASES[4]])  # int4 and int8, 3 row blocks x 3 slices


@pytest.mark.cuda
def test_a_reduce_kernel_gives_the_fixups_bits_on_the_gpu() -> None:
    identical_with_a_reduce_kernel(torch.device("cuda"), CASES)


def test_splitk_gemv_rejects_bad_input() -> None:
    w = weight(4, 64, 256, 32, False, torch.device("cpu"), 0)
    scratch = SplitKScratch.allocate([w], [SplitKConfig(32, 8, 1)], torch.device("cpu"))
    x = torch.zeros(64)
    with pytest.raises(ValueError, match="expected a contiguous"):
        gemv_splitk.gemv_residual(w, torch.zeros(128), x, scratch, SplitKConfig(32, 8, 1))
    with pytest.raises(ValueError, match="does not hold whole groups"):
        gemv_splitk.gemv_residual(w, torch.zeros(256), x, scratch, SplitKConfig(32, 2, 1))
    with pytest.raises(ValueError, match="scratch too small"):
        gemv_splitk.gemv_residual(w, torch.zeros(256), x, scratch, SplitKConfig(16, 4, 1))
    with pytest.raises(ValueError, match="expected Int4Groups or Int8Groups"):
        gemv_splitk.gemv_residual(torch.zeros(64, 256), torch.zeros(256), x, scratch)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("k, tiles", [(2048, (32, 128)), (1280, (32, 32))])
def test_tile_major_int4_weights_give_the_row_major_bits(mode, k, tiles):
    """gemv_splitk's TILE_N / TILE_KW (bench.probes.tiled_int4): the same weights stored tile-major give the
    row-major call's output (bit for bit under the interpreter; on a GPU the sums' order follows the load's layout:
    both are checked against float64), read one whole tile a program (32 x 128 words) or through tile_offsets
    (32 x 32 tiles under 32 x 128-word programs, K's words not a multiple of 128)."""
    from bench.probes.tiled_int4 import launch, random_packed
    from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch, scratch_floats

    torch.manual_seed(mode)
    n, device = 64, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = random_packed(4, n, k, device)
    w = type(w)(w.codes, w.scale, (torch.rand(w.scale.shape, device=device) - 0.5).half() * 0.1, 32)  # either sign
    cfg = SplitKConfig(32, 128, 4, reduce_kernel=True, pdl=device.type == "cuda")
    a = torch.randn(2 * k if mode == 2 else k, device=device).half()
    nw = torch.rand(k, device=device).half()
    init = torch.randn(n, device=device).half()
    outs = []
    for weight in (w, w.tiled(tiles)):
        scratch = SplitKScratch.zeros(scratch_floats(w, cfg), 2, device)
        out = init.clone()
        launch(weight, a, nw, out, mode, scratch, cfg)
        outs.append(out)
    if device.type == "cpu":
        assert torch.equal(outs[0], outs[1])
    ref = w.dequantize(torch.float64)
    x = a.double()
    if mode == 0:
        x = x / torch.sqrt((x * x).mean() + 1e-5) * nw.double()
    if mode == 2:
        x = torch.nn.functional.silu(x[:k]) * x[k:]
    want = ref @ x + (init.double() if mode else 0)
    for out in outs:
        torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)
