"""Experiment for issue 10: is the shipped int4 GEMV (graph_executor/kernels/gemv_lowbit.py) bound by instruction
issue or by the memory pipeline? Three kernels compute x += W @ a over 32 layers' weights in one CUDA graph:

- shipped: the kernel the decoder runs today (~8 SASS instructions per weight, 8-byte loads: K // 2 is only
  known to be a multiple of 8).
- loadonly: the same tiles read as int32 words and xor-ed together (one instruction per 8 weights): the ceiling
  of the memory pipeline for a loop of this shape; its result is meaningless and only kept alive.
- words: codes read as int32 words, [BLOCK_N, groups, words per group] tiles (a group's 16 bytes in one
  thread: one 16-byte load, a thread-local group sum). Nibble i of a word becomes the float 1 + q / 16 with one
  shift and one LOP3 (the nibble or'ed into the mantissa of 1.0, no int->float convert), then one FFMA with
  the activation: sum(q a) = 16 (sum((1 + q/16) a) - sum(a)). ~3 instructions per weight.

    python -m bench.probes.int4_words [--layers 32]
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

SHAPES = {"o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
CONFIGS = [(16, 512, 4), (32, 512, 4), (32, 256, 4), (64, 256, 4), (32, 512, 8), (64, 512, 8), (16, 1024, 4),
           (8, 1024, 4), (64, 128, 4), (128, 256, 8)]


@triton.jit
def _words_kernel(w_ptr, scale_ptr, offset_ptr, a_ptr, x_ptr, N, K, LOAD_ONLY: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    WPG: tl.constexpr = GROUP // 8  # int32 words per group
    NG: tl.constexpr = BLOCK_K // GROUP
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    KW = tl.multiple_of(K // 8, WPG)  # a row is whole groups: its words start 16-byte aligned (group 32)
    gw = tl.arange(0, NG)[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG] word offsets in a chunk
    acc = tl.zeros([BLOCK_N, NG], dtype=tl.float32)
    bits = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        words = k0 // 8 + gw  # [NG, WPG]
        wok = words < KW
        w = tl.load(w_ptr + rows[:, None, None] * KW + words[None, :, :],
                    mask=row_ok[:, None, None] & wok[None, :, :], other=0)  # int32 [BLOCK_N, NG, WPG]
        if LOAD_ONLY:
            bits ^= w
        else:
            fa = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
            asum = tl.zeros([NG, WPG], dtype=tl.float32)
            for i in tl.static_range(8):
                ai = tl.load(a_ptr + words * 8 + i, mask=wok, other=0.0).to(tl.float32)  # [NG, WPG]
                if 4 * i > 19:
                    nib = (w >> (4 * i - 19)) & (0xF << 19)
                else:
                    nib = (w << (19 - 4 * i)) & (0xF << 19)
                f = (nib | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q / 16
                fa += f * ai[None, :, :]
                asum += ai
            g_fa = tl.sum(fa, axis=2)  # [BLOCK_N, NG]
            g_a = tl.sum(asum, axis=1)[None, :]  # [1, NG]
            groups = k0 // GROUP + tl.arange(0, NG)
            gmask = row_ok[:, None] & (groups < K // GROUP)[None, :]
            at = rows[:, None] * (K // GROUP) + groups[None, :]
            s = tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32)
            o = tl.load(offset_ptr + at, mask=gmask, other=0.0).to(tl.float32)
            acc += (16.0 * s) * (g_fa - g_a) + o * g_a
    if LOAD_ONLY:
        acc += tl.sum(bits, axis=2).to(tl.float32)
    res = tl.load(x_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + rows, (res + tl.sum(acc, axis=1)).to(x_ptr.dtype.element_ty), mask=row_ok)


def words(w: Int4Groups, a: torch.Tensor, x: torch.Tensor, cfg: GemvConfig, load_only: bool = False) -> torch.Tensor:
    n, k = w.shape
    assert w.offset is not None and k % cfg.block_k == 0 or k % w.group == 0
    _words_kernel[(triton.cdiv(n, cfg.block_n),)](w.codes.view(torch.int32), w.scale, w.offset, a, x, n, k,
                                                  LOAD_ONLY=load_only, GROUP=w.group, BLOCK_N=cfg.block_n,
                                                  BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
                                                  num_stages=cfg.num_stages)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name(), flush=True)
    kernels = {"shipped": gemv_lowbit.gemv_residual, "loadonly": lambda w, a, x, c: words(w, a, x, c, True),
               "words": words}
    for name, (n, k) in SHAPES.items():
        weights = [quantize_int4(torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02)
                   for _ in range(args.layers)]
        a = torch.randn(k, device=dev, dtype=torch.float16, generator=g)
        x0 = torch.randn(n, device=dev, dtype=torch.float16, generator=g)
        ref = x0.double() + weights[0].dequantize(torch.float64) @ a.double()
        got = words(weights[0], a, x0.clone(), GemvConfig(32, 512, 4, 3)).double()
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-3, f"{name}: words kernel differs from float64 by {err:.2e}"
        nbytes = sum(w.nbytes for w in weights)
        for kname, fn in kernels.items():
            best = None
            for c in CONFIGS:
                cfg = GemvConfig(c[0], c[1], c[2], 3)
                x = x0.clone()
                try:
                    for w in weights:
                        fn(w, a, x, cfg)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for w in weights:
                            fn(w, a, x, cfg)
                    ms = time_gpu(graph.replay, dev) * 1e3
                except Exception as e:  # noqa: BLE001 - a config this kernel cannot take
                    print(f"  {name} {kname} {c}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                print(f"  {name} {kname} {c}: {ms:.3f} ms ({nbytes / ms / 1e9:.2f} TB/s)")
                if best is None or ms < best[0]:
                    best = (ms, c)
            print(f"{name:8s} {kname:8s} best {best[0]:.3f} ms ({nbytes / best[0] / 1e9:.2f} TB/s) with {best[1]}"
                  f"  (words max rel. err vs float64 {err:.1e})", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
