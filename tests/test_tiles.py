"""Packed weights stored tile-major (quant/tiles.py, `Int4Groups.tiled`): the same values, read by every kernel that
reads packed weights to the same bits as row-major (Triton interpreter on the CPU; `cuda` on a GPU)."""

import pytest
import torch

from graph_executor.kernels import gemm_lowbit, gemv_splitk
from graph_executor.quant import rows
from graph_executor.quant.formats import Int4Groups, Int8Groups, quantize_int4, quantize_int8
from graph_executor.quant.tiles import decode_tiles, tiles_for
from tests.test_gemv_splitk import rel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUANTIZERS = {"int4": quantize_int4, "int8": quantize_int8}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit under the interpreter; on a GPU within float32 rounding: the compiler lays a tile-major load out
    differently, and with it the order of a program's sums (LLaMA-2-7B int4 step logits ~2e-2 apart on ~1e2, as
    between two block configs)."""
    if a.device.type == "cpu":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_decode_tiles_follow_the_plans_blocks_and_narrow_where_a_row_needs_it():
    def packed(kind: str, n: int, k: int) -> Int4Groups | Int8Groups:
        return QUANTIZERS[kind](torch.zeros(n, k), 32)

    assert decode_tiles(packed("int4", 64, 4096)) == (32, 128)
    assert decode_tiles(packed("int4", 64, 11008)) == (32, 32)  # LLaMA-2-7B's down_proj: 1,376 words a row
    assert decode_tiles(packed("int8", 64, 11008)) == (32, 64)  # 2,752 words
    assert decode_tiles(packed("int4", 64, 96)) == (32, 4)  # one group a tile
    assert decode_tiles(packed("int4", 48, 4096)) is None  # rows not whole blocks of 32
    assert tiles_for(packed("int4", 128, 4096), 64, 256) == (64, 256)  # other blocks (bench.probes.tiled_int4)
    assert tiles_for(packed("int8", 64, 11008), 32, 256) == (32, 64)
    assert tiles_for(packed("int4", 96, 4096), 64, 64) is None


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_tiled_storage_round_trips_and_dequantizes_to_the_same_values(kind):
    w = QUANTIZERS[kind](torch.randn(64, 256), 32)
    t = w.tiled((32, 16))
    assert t.tiles == (32, 16) and t.shape == w.shape and t.nbytes == w.nbytes
    assert not torch.equal(t.codes, w.codes)  # stored differently
    back = t.row_major()
    assert back.tiles is None and torch.equal(back.codes, w.codes) and torch.equal(back.scale, w.scale)
    assert (back.offset is None) == (w.offset is None) and (w.offset is None or torch.equal(back.offset, w.offset))
    assert torch.equal(t.dequantize(), w.dequantize())
    with pytest.raises(ValueError, match="already tiled"):
        t.tiled((32, 16))
    with pytest.raises(ValueError, match="not whole tiles"):
        w.tiled((48, 16))
    with pytest.raises(ValueError, match="before tiling"):
        rows.part(t, (slice(0, 32),))
    with pytest.raises(ValueError, match="before tiling"):
        rows.row_slice(t, 0, 32)
    with pytest.raises(ValueError, match="before tiling"):
        rows.select_rows(t, torch.tensor([0, 3]))


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("n, k", [(128, 256), (64, 96)])
def test_every_packed_kernel_reads_tiled_weights_to_the_row_major_bits(kind, n, k):
    """The prefill GEMM (low-bit tiles; and its split-K), the dequantizing pass, the embedding gather and the decode
    GEMV: tile-major storage (`decode_tiles`: one whole tile a GEMV program for K = 256, narrower tiles read
    through `tile_offsets` otherwise) against the row-major weight (`same`)."""
    torch.manual_seed(n + k)
    w = QUANTIZERS[kind](torch.randn(n, k, device=DEVICE), 32)
    t = w.tiled(decode_tiles(w))
    x = torch.randn(12, k, device=DEVICE)
    outs = [torch.zeros(12, n, device=DEVICE) for _ in range(2)]
    for weight, out in zip((w, t), outs):
        gemm_lowbit.gemm(x, weight, out)
    assert same(*outs)
    dense = [torch.zeros(n, k, device=DEVICE) for _ in range(2)]
    for weight, out in zip((w, t), dense):
        gemm_lowbit.dequantize(weight, out)
    assert torch.equal(*dense) and torch.equal(dense[0], w.dequantize())  # no sums: exact everywhere
    ids = torch.tensor([0, 5, n - 1], device=DEVICE)
    gathered = [torch.zeros(3, k, device=DEVICE) for _ in range(2)]
    for weight, out in zip((w, t), gathered):
        gemm_lowbit.embedding(weight, ids, out)
    assert torch.equal(*gathered)
    cfg = gemv_splitk.SplitKConfig(32, 32 if k == 256 and kind == "int4" else 64, 4, reduce_kernel=True)
    a = torch.randn(k, device=DEVICE)
    residual = torch.randn(n, device=DEVICE)
    results = [residual.clone() for _ in range(2)]
    for weight, out in zip((w, t), results):
        scratch = gemv_splitk.SplitKScratch.zeros(gemv_splitk.scratch_floats(w, cfg), n // 32, DEVICE)
        gemv_splitk.gemv_residual(weight, a, out, scratch, cfg)
    assert same(*results)
    want = residual.double().cpu() + w.dequantize(torch.float64).cpu() @ a.double().cpu()
    # relative to the largest output (test_gemv_splitk's measure): on the card an output near zero is ~2e-3 from
    # float64 on ~4e1 (the same for row-major)
    assert rel(results[0], want) < 1e-4
