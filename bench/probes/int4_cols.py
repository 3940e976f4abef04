"""Experiment for issue 10: an int4 GEMV over a column-major copy of the packed codes. Today's kernels read
Int4Groups rows ([N, K/2] bytes) and reduce along K across threads; here the codes are [K/8, N] int32 words
(word kw of column n holds weights 8kw..8kw+7 of row n, low nibble first) and the scales [K/group, N], so that
a thread owns a few output rows and walks K alone: every load is 16 contiguous bytes across N, the K sum stays
in the thread's registers, and the activation is the same for every thread (a broadcast load).

K is split over the grid (SPLIT programs per block of rows, so that N = 4096 still gives enough programs);
each writes its partial sums to a float32 scratch [SPLIT, N], and the last program of a row block (a counter
per block, reset by that program) adds the partials in order into the residual: x += W @ a, deterministic.

    python -m bench.probes.int4_cols
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.floors import time_gpu
from bench.probes import float_lowbit_gemv as gemv_lowbit
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.quant.formats import Int4Groups, quantize_int4

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
# (BLOCK_N, words per iteration, SPLIT, num_warps)
CONFIGS = [(128, 4, 4, 1), (128, 4, 8, 1), (128, 4, 16, 1), (256, 4, 4, 2), (256, 4, 8, 2), (256, 4, 16, 2),
           (128, 8, 8, 1), (256, 8, 8, 2), (512, 4, 8, 4), (512, 4, 16, 4), (128, 4, 32, 1), (256, 4, 32, 2),
           (64, 4, 16, 1), (64, 4, 32, 1)]


@triton.jit
def _cols_kernel(wt_ptr, st_ptr, ot_ptr, a_ptr, x_ptr, part_ptr, count_ptr, N, K, KW_SPLIT, SPLIT: tl.constexpr,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    WPG: tl.constexpr = GROUP // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    KW = K // 8
    acc = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
    kw_begin = pid_k * KW_SPLIT
    for kw0 in range(kw_begin, kw_begin + KW_SPLIT, BLOCK_KW):
        kws = kw0 + tl.arange(0, BLOCK_KW)  # [BLOCK_KW] word rows
        kok = kws < KW
        w = tl.load(wt_ptr + kws[:, None].to(tl.int64) * N + cols[None, :], mask=kok[:, None] & col_ok[None, :],
                    other=0)  # int32 [BLOCK_KW, BLOCK_N]
        fa = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
        asum = tl.zeros([BLOCK_KW], dtype=tl.float32)
        for i in tl.static_range(8):
            ai = tl.load(a_ptr + kws * 8 + i, mask=kok, other=0.0).to(tl.float32)  # [BLOCK_KW]
            if 4 * i > 19:
                nib = (w >> (4 * i - 19)) & (0xF << 19)
            else:
                nib = (w << (19 - 4 * i)) & (0xF << 19)
            fa += (nib | 0x3F800000).to(tl.float32, bitcast=True) * ai[:, None]  # (1 + q/16) a
            asum += ai
        g = kws // WPG  # [BLOCK_KW] the group of each word row
        at = g[:, None].to(tl.int64) * N + cols[None, :]
        m = kok[:, None] & col_ok[None, :]
        s = tl.load(st_ptr + at, mask=m, other=0.0).to(tl.float32)
        o = tl.load(ot_ptr + at, mask=m, other=0.0).to(tl.float32)
        # per word: sum (s q + o) a = 16 s (sum (1 + q/16) a - sum a) + o sum a
        acc += (16.0 * s) * (fa - asum[:, None]) + o * asum[:, None]
    partial = tl.sum(acc, axis=0)  # [BLOCK_N]
    tl.store(part_ptr + pid_k * N + cols, partial, mask=col_ok)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
    if done == SPLIT - 1:
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s_ in tl.static_range(SPLIT):
            total += tl.load(part_ptr + s_ * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg")
        res = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + cols, (res + total).to(x_ptr.dtype.element_ty), mask=col_ok)
        tl.atomic_xchg(count_ptr + pid_n, 0)


class ColsWeight:
    """An Int4Groups weight re-laid column-major for the kernel above (asymmetric groups only)."""

    def __init__(self, w: Int4Groups) -> None:
        n, k = w.shape
        self.n, self.k, self.group = n, k, w.group
        self.wt = w.codes.view(torch.int32).t().contiguous()  # [K/8, N]
        self.st = w.scale.t().contiguous()  # [K/group, N]
        self.ot = w.offset.t().contiguous()
        self.nbytes = w.nbytes


def cols_gemv(w: ColsWeight, a: torch.Tensor, x: torch.Tensor, cfg: tuple, scratch: dict) -> torch.Tensor:
    block_n, block_kw, split, warps = cfg
    kw = w.k // 8
    kw_split = triton.cdiv(triton.cdiv(kw, split), block_kw) * block_kw
    split = triton.cdiv(kw, kw_split)
    nblocks = triton.cdiv(w.n, block_n)
    key = (w.n, split, nblocks)
    if key not in scratch:
        scratch[key] = (torch.empty(split, w.n, device=x.device, dtype=torch.float32),
                        torch.zeros(nblocks, device=x.device, dtype=torch.int32))
    part, count = scratch[key]
    _cols_kernel[(nblocks, split)](w.wt, w.st, w.ot, a, x, part, count, w.n, w.k, kw_split, SPLIT=split,
                                   GROUP=w.group, BLOCK_N=block_n, BLOCK_KW=block_kw, num_warps=warps, num_stages=3)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--configs", default=None, help="semicolon list of BLOCK_N,BLOCK_KW,SPLIT,warps")
    ap.add_argument("--shapes", default="o,gate_up,down")
    args = ap.parse_args()
    configs = CONFIGS if args.configs is None else [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name(), flush=True)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        packed = [quantize_int4(torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02)
                  for _ in range(args.layers)]
        weights = [ColsWeight(w) for w in packed]
        a = torch.randn(k, device=dev, dtype=torch.float16, generator=g)
        x0 = torch.randn(n, device=dev, dtype=torch.float16, generator=g)
        ref = x0.double() + packed[0].dequantize(torch.float64) @ a.double()
        scratch: dict = {}
        nbytes = sum(w.nbytes for w in packed)
        best = None
        for c in configs:
            x = x0.clone()
            cols_gemv(weights[0], a, x, c, scratch)
            err = ((x.double() - ref).abs().max() / ref.abs().max()).item()
            assert err < 2e-3, f"{name} {c}: cols kernel differs from float64 by {err:.2e}"
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for w in weights:
                    cols_gemv(w, a, x, c, scratch)
            ms = time_gpu(graph.replay, dev) * 1e3
            print(f"  {name} cols {c}: {ms:.3f} ms ({nbytes / ms / 1e9:.2f} TB/s) err {err:.1e}", flush=True)
            if best is None or ms < best[0]:
                best = (ms, c)
        x = x0.clone()
        graph = torch.cuda.CUDAGraph()
        cfg = GemvConfig(16, 512, 4, 3)
        gemv_lowbit.gemv_residual(packed[0], a, x, cfg)
        with torch.cuda.graph(graph):
            for w in packed:
                gemv_lowbit.gemv_residual(w, a, x, cfg)
        shipped = time_gpu(graph.replay, dev) * 1e3
        print(f"{name:8s} cols best {best[0]:.3f} ms ({nbytes / best[0] / 1e9:.2f} TB/s) with {best[1]}; shipped "
              f"(16, 512, 4) {shipped:.3f} ms ({nbytes / shipped / 1e9:.2f} TB/s)", flush=True)
        del packed, weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
