"""kernels/dequant_matmul.py: a long prompt's projection over a packed weight dequantized block by block equals the
whole-dequantize path, every element, for each format, with bias, residual accumulate, and blocks that do not
divide N; on a GPU also with the blocks overlapped on a side stream and inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from graph_executor.kernels import dequant_matmul, gemm_lowbit
from graph_executor.kernels.dequant_matmul import ChunkConfig
from graph_executor.quant.formats import quantize_fp8, quantize_int4, quantize_int8

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUANTIZE = {"int4": lambda w: quantize_int4(w, 32), "int8": lambda w: quantize_int8(w, 32), "fp8": quantize_fp8}


def _case(fmt: str, t: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = QUANTIZE[fmt]((torch.randn(n, k, generator=g) * 0.05).to(DEVICE))
    x = torch.randn(t, k, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    base = torch.randn(t, n, generator=g).to(DEVICE, dtype)
    return w, x, bias, base


def _whole(w, x, bias, base, accumulate: bool) -> torch.Tensor:
    """The path before: the whole weight dequantized, then one mm (float64 here: the reference)."""
    dense = gemm_lowbit.dequantize(w, torch.empty(w.shape, dtype=x.dtype, device=x.device)).double()
    y = x.double() @ dense.T
    return base.double() + y if accumulate else y + bias.double()


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_blocks_equal_the_whole_dequantized_weight(fmt: str, accumulate: bool) -> None:
    if fmt == "fp8" and DEVICE.type == "cpu" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 on this torch")
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    w, x, bias, base = _case(fmt, 37, 200, 96, dtype, seed=3)
    want = _whole(w, x, bias, base, accumulate)
    for cfg in (ChunkConfig(64, False), ChunkConfig(200, False), ChunkConfig(1000, False), ChunkConfig(48, True)):
        out = base.clone() if accumulate else torch.full_like(base, float("nan"))
        dequant_matmul.matmul(x, w, out, bias=None if accumulate else bias, accumulate=accumulate, cfg=cfg)
        tol = 2e-3 if dtype == torch.float16 else 1e-5
        err = ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max()
        assert not out.isnan().any() and err < tol, (cfg, float(err))  # every element written, and right


def test_bad_chunk_rows_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        ChunkConfig(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_overlapped_blocks_in_a_cuda_graph_equal_the_serial_ones() -> None:
    """The side stream's fork and join under capture: replays give the serial blocks' bits, with fresh inputs."""
    w, x, bias, base = _case("int4", 130, 4096 + 96, 512, torch.float16, seed=5)
    serial = torch.empty(130, w.shape[0], device=DEVICE, dtype=torch.float16)
    out = torch.empty_like(serial)
    side = torch.cuda.Stream()
    cfg = ChunkConfig(1024, True)
    dequant_matmul.matmul(x, w, out, bias=bias, cfg=cfg, side=side)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dequant_matmul.matmul(x, w, out, bias=bias, cfg=cfg, side=side)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, x.dtype))
        out.fill_(float("nan"))
        graph.replay()
        dequant_matmul.matmul(x, w, serial, bias=bias, cfg=ChunkConfig(1024, False))
        torch.cuda.synchronize()
        assert torch.equal(out, serial)
