"""Experiment for issue 10: an int4 GEMV that multiplies with `dp4a` (4 byte products per instruction) on
activations quantized to int8 per group of 32, as llama.cpp's MMVQ kernels do, against the shipped
float-unpacking kernel (`graph_executor/kernels/gemv_lowbit.py`).

Why: the shipped int4 GEMV spends ~9 instructions per weight (SASS of the 4x1024 config: nibble extraction,
convert, multiply, a reduction per group), so it is issue-bound at ~1.3 TB/s. Here a 32-bit word of codes
(8 weights) costs two masks, a shift and two dp4a: < 1 instruction per weight, so the kernel should be bound
by memory (prediction: >= 3 TB/s on an H200, i.e. LLaMA-2-7B int4 decode near 1.3 ms).

The activation is quantized inside each program (per group of 32: d = max|a| / 127, q = round(a / d)): the
result differs from the float computation by the activation's rounding (~0.3% per element), which is what the
correctness check bounds; against the same quantized activation computed in float64 it is exact.

    python -m bench.probes.int4_dp4a [--layers 32]
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

H, I = 4096, 11008  # LLaMA-2-7B
SHAPES = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + ROUND - ROUND rounds a float32 |x| < 2**22 to the nearest integer


@triton.jit
def _dp4a(a, b, c):
    """sum of 4 byte products, unsigned bytes of a times signed bytes of b, plus c (int32)."""
    return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _int4_dp4a_residual(words_ptr, scale_ptr, offset_ptr, a_ptr, x_ptr, N, K, BLOCK_N: tl.constexpr,
                        BLOCK_G: tl.constexpr):
    """x [N] += W @ a for Int4Groups with offsets, group 32: words [N, K / 8] int32 (8 codes each)."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    wi = tl.arange(0, 4)  # word of a group
    bi = tl.arange(0, 4)  # byte of a word
    pi = tl.arange(0, 2)  # low / high nibble
    acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
    for g0 in range(0, K // 32, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        g_ok = g < K // 32
        # weight k = 32 g + 8 w + 2 b + p sits in nibble p of byte b of word w of group g
        k = (g[:, None, None, None] * 32 + wi[None, :, None, None] * 8 + bi[None, None, :, None] * 2
             + pi[None, None, None, :])
        a = tl.load(a_ptr + k, mask=g_ok[:, None, None, None], other=0.0).to(tl.float32)  # [G, 4, 4, 2]
        amax = tl.max(tl.reshape(tl.abs(a), [BLOCK_G, 32]), axis=1)  # [G]
        d = amax / 127.0
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        q = ((a * inv[:, None, None, None] + ROUND) - ROUND).to(tl.int32)  # -127..127
        q_sum = tl.sum(tl.reshape(q, [BLOCK_G, 32]), axis=1).to(tl.float32)  # [G]
        packed = tl.sum((q & 0xFF) << (8 * bi)[None, None, :, None], axis=2)  # [G, 4, 2]: 4 bytes per word
        a_lo, a_hi = tl.split(packed)  # [G, 4]: the activation bytes for the low / high nibbles
        w = tl.load(words_ptr + rows[:, None, None] * (K // 8) + (g[:, None] * 4 + wi[None, :])[None, :, :],
                    mask=row_ok[:, None, None] & g_ok[None, :, None], other=0)  # [BN, G, 4] int32
        lo = w & 0x0F0F0F0F
        hi = (w >> 4) & 0x0F0F0F0F
        zero = tl.zeros(w.shape, dtype=tl.int32)
        dot = _dp4a(lo, tl.broadcast_to(a_lo[None, :, :], w.shape),
                    _dp4a(hi, tl.broadcast_to(a_hi[None, :, :], w.shape), zero))
        i_sum = tl.sum(dot, axis=2).to(tl.float32)  # [BN, G]
        at = rows[:, None] * (K // 32) + g[None, :]
        mask = row_ok[:, None] & g_ok[None, :]
        s = tl.load(scale_ptr + at, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(offset_ptr + at, mask=mask, other=0.0).to(tl.float32)
        acc += s * (d[None, :] * i_sum) + o * (d * q_sum)[None, :]
    residual = tl.load(x_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + rows, (residual + tl.sum(acc, axis=1)).to(x_ptr.dtype.element_ty), mask=row_ok)


def int4_dp4a_residual(w: Int4Groups, a: torch.Tensor, x: torch.Tensor, block_n: int = 4, block_g: int = 32,
                       num_warps: int = 4) -> torch.Tensor:
    n, k = w.shape
    if w.group != 32 or w.offset is None:
        raise ValueError("the dp4a probe takes Int4Groups with offsets and group 32")
    _int4_dp4a_residual[(triton.cdiv(n, block_n),)](w.codes.view(torch.int32), w.scale, w.offset, a, x, n, k,
                                                    BLOCK_N=block_n, BLOCK_G=block_g, num_warps=num_warps)
    return x


def quantized_activation(a: torch.Tensor) -> torch.Tensor:
    """The activation as the kernel sees it: per group of 32, round(a / d) * d with d = max|a| / 127."""
    g = a.float().view(-1, 32)
    amax = g.abs().amax(1, keepdim=True)
    q = torch.where(amax > 0, g * (127.0 / amax), 0.0).round()
    return (q * (amax / 127.0)).view(-1)


def check(dev: torch.device) -> None:
    gen = torch.Generator(device=dev).manual_seed(1)
    for n, k in ((37, 96), (4096, 4096), (4096, 11008)):
        w = quantize_int4(torch.randn(n, k, device=dev, generator=gen) * 0.02)
        a = torch.randn(k, device=dev, dtype=torch.float16, generator=gen)
        x = torch.randn(n, device=dev, dtype=torch.float32, generator=gen)
        out = int4_dp4a_residual(w, a, x.clone())
        wd = w.dequantize().double()
        exact = x.double() + wd @ quantized_activation(a).double()
        float_ref = x.double() + wd @ a.double()
        e1 = float((out.double() - exact).abs().max() / exact.abs().max())
        e2 = float((out.double() - float_ref).norm() / (float_ref - x.double()).norm())
        print(f"check {n}x{k}: vs quantized activation {e1:.1e} (float32 accumulation), "
              f"vs float activation {e2:.1e} (the activation's rounding)", flush=True)
        assert e1 < 1e-3 and e2 < 2e-2  # e1: an FFMA-contracted a * inv may round a .5 tie the other way


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("int4_dp4a: needs a CUDA GPU")
    dev = torch.device("cuda")
    check(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    a_all = torch.randn(I, device=dev, dtype=torch.float16, generator=gen)
    r = torch.randn(2 * I, device=dev, dtype=torch.float16, generator=gen)
    shipped = GemvConfig(4, 1024, 4, 3)
    for name, (n, k) in SHAPES.items():
        ws = [quantize_int4(torch.randn(n, k, device=dev, dtype=torch.float16, generator=gen) * 0.02)
              for _ in range(args.layers)]
        nbytes = sum(w.nbytes for w in ws)
        a, x = a_all[:k], r[:n]
        results = {}
        variants = {"shipped 4x1024": lambda w: gemv_lowbit.gemv_residual(w, a, x, cfg=shipped),
                    "shipped 16x512": lambda w: gemv_lowbit.gemv_residual(w, a, x, cfg=GemvConfig(16, 512, 4, 3))}
        for bn, bg, nw in ((8, 16, 4), (16, 16, 8), (16, 8, 4), (32, 8, 4), (32, 16, 8), (64, 8, 8), (64, 16, 8)):
            variants[f"dp4a {bn}x{bg * 32} w{nw}"] = (lambda bn, bg, nw: lambda w: int4_dp4a_residual(
                w, a, x, bn, bg, nw))(bn, bg, nw)
        for label, op in variants.items():
            try:
                for w in ws:
                    op(w)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for w in ws:
                        op(w)
                ms = time_gpu(graph.replay, dev) * 1e3
                results[label] = ms
                print(f"{name:8s} {label:22s} {ms:.3f} ms  {nbytes / ms / 1e9:.2f} TB/s", flush=True)
            except Exception as e:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                print(f"{name:8s} {label:22s} failed: {repr(e)[:160]}", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
