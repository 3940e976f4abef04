"""Long-prompt projections over packed weights: out [T, N] = x [T, K] @ W^T through cuBLAS, the packed weight
dequantized a block of output rows at a time into a small buffer that stays in L2, never whole into HBM.

Why: from ~128 prompt rows the tensor cores' work outweighs the weights' read, and the low-bit Triton GEMM
(gemm_lowbit.gemm) reaches only 130-240 TFLOP/s there against cuBLAS's 420-720 (H200, bench/results/
2026-12-02-h200-gemm-large/: larger tiles did not close it). Dequantizing the whole projection to fp16 first and
calling cuBLAS is faster, but writes the fp16 weight to HBM and reads it back: on LLaMA-2-7B ~27 GB of traffic per
prefill, +5 ms of TTFT at 100 tokens. Here each block of `chunk_rows` rows (a few MiB of fp16) is dequantized into
one of two buffers, reused block after block so their lines stay in the 60 MB L2, and multiplied from there; with a
side stream the next block's dequantization runs while cuBLAS multiplies this one (double buffering: a buffer is
dequantized into again only after the multiply that read it is done). HBM sees the packed weight once.

CUDA-graph safe: the side stream forks from and joins the current stream, as graph capture requires; the buffers
come from the caching allocator (the graph's pool under capture).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graph_executor.kernels import gemm_lowbit
from graph_executor.quant.formats import PackedWeight


@dataclass(frozen=True)
class ChunkConfig:
    chunk_rows: int = 2048  # output rows dequantized per block (x K x 2 bytes: 16 MiB at K = 4096)
    overlap: bool = True  # dequantize the next block on a side stream while this one is multiplied (CUDA only)

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"ChunkConfig.chunk_rows must be >= 1, got {self.chunk_rows}")


DEFAULT = ChunkConfig()


def _multiply(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
              accumulate: bool) -> None:
    """out [T, n] (+)= x [T, K] @ w [n, K]^T (+ bias [n]); out may be a column block of a wider matrix (row stride
    N): cuBLAS takes it as it is (a leading dimension), no copy."""
    if accumulate:
        out.addmm_(x, w.t())
    elif bias is not None:
        torch.addmm(bias, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)


def matmul(x: torch.Tensor, w: PackedWeight, out: torch.Tensor, bias: torch.Tensor | None = None,
           accumulate: bool = False, cfg: ChunkConfig = DEFAULT, side: torch.cuda.Stream | None = None) -> torch.Tensor:
    """out [T, N] = x [T, K] @ W^T (+ bias [N]), or out += x @ W^T, W dequantized to x's dtype block by block (each
    weight formed as gemm_lowbit.dequantize forms it, so the result is the whole-dequantize path's). `side`: the
    stream that dequantizes while the current one multiplies (cfg.overlap on a CUDA device; None: one is made)."""
    n, k = w.shape
    rows = min(cfg.chunk_rows, n)
    starts = range(0, n, rows)
    overlap = cfg.overlap and x.is_cuda and len(starts) > 1
    buffers = [torch.empty(rows, k, dtype=x.dtype, device=x.device) for _ in range(2 if overlap else 1)]  # [rows, K]

    def block(i: int, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        stop = min(start + rows, n)
        dense = gemm_lowbit.dequantize(w.rows(start, stop), buffers[i % len(buffers)][:stop - start])
        return dense, out[:, start:stop], None if bias is None else bias[start:stop]

    if not overlap:
        for i, start in enumerate(starts):
            dense, out_block, bias_block = block(i, start)
            _multiply(x, dense, out_block, bias_block, accumulate)
        return out
    main = torch.cuda.current_stream(x.device)
    side = torch.cuda.Stream(x.device) if side is None else side
    side.wait_stream(main)  # the fork: the side stream starts after what the main stream has queued (x, out)
    dequantized = [torch.cuda.Event() for _ in starts]
    multiplied = [torch.cuda.Event() for _ in starts]
    for i, start in enumerate(starts):
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(multiplied[i - 2])  # its buffer's previous block has been read
            dense, out_block, bias_block = block(i, start)
            dequantized[i].record(side)
        main.wait_event(dequantized[i])
        _multiply(x, dense, out_block, bias_block, accumulate)
        multiplied[i].record(main)
    main.wait_stream(side)  # the join (capture needs it; and the buffers go back to the allocator on main's order)
    return out
