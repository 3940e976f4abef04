"""bench.probes.read_ceiling's kernels under the Triton interpreter: each program reads exactly its bytes (the
probe's timings are only as good as the bytes its kernels touch)."""

import functools
import operator

import torch

from bench.probes import read_ceiling


def _xor(values: torch.Tensor) -> int:
    return functools.reduce(operator.xor, values.flatten().tolist(), 0)


def test_each_read_program_xors_its_block_and_the_masked_tail():
    words = torch.randint(-2**31, 2**31 - 1, (5000,), dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int32)
    read_ceiling._read_kernel[(3,)](words, out, 5000, BLOCK=2048, PDL=False)
    assert out[:3].tolist() == [_xor(words[i * 2048:(i + 1) * 2048]) for i in range(3)]


def test_the_tile_major_loads_read_the_same_tile_as_the_row_major_ones():
    n, k, block_n, block_kw = 64, 2048, 32, 64
    kw, groups, ng = k // 8, k // 32, block_kw // 4
    codes = torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32)
    scale, offset = torch.rand(n, groups).half(), torch.rand(n, groups).half()
    grid = (n // block_n, kw // block_kw)

    def tile_major(t: torch.Tensor, width: int) -> torch.Tensor:  # [n, c] -> tiles [n / block_n, c / width] flat
        return t.view(grid[0], block_n, grid[1], width).permute(0, 2, 1, 3).contiguous().flatten()

    outs = []
    for tiled in (False, True):
        out = torch.zeros(grid[0] * grid[1])
        args = (tile_major(codes, block_kw), tile_major(scale, ng), tile_major(offset, ng)) if tiled \
            else (codes, scale, offset)
        read_ceiling._tile_kernel[grid](*args, out, kw, groups, BLOCK_N=block_n, BLOCK_KW=block_kw, TILED=tiled,
                                        PDL=False)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    tile = codes[:block_n, block_kw:2 * block_kw]
    so = (scale[:block_n, ng:2 * ng].float() * offset[:block_n, ng:2 * ng].float()).sum()
    assert torch.isclose(outs[0][1], torch.tensor(float(_xor(tile))) + so)
