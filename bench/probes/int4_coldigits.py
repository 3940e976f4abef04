"""Experiment for issue 10: the split-K int4 / int8 decode GEMV with the activation's digits formed per word column.

ncu on the H200 (bench/results/2026-12-02-h200-experiments/ncu_gemv.md) put the shipped kernel
(kernels/gemv_splitk.py) at 28-47% of DRAM peak with ~45% of issue slots busy and stalls on barriers second only to
memory: each program builds its K slice's activation digits in a 1-D layout of its own (BLOCK_KW * 8 values: group
maxima by shuffles, digits packed by a reshape-and-sum) and then converts them to the codes tile's column layout
through shared memory (bar.sync), ~950 static SASS instructions a thread for 128 weights.

Here every value is computed in the layout of the codes tile's columns: word column kw's eight activations are eight
loads indexed by kw itself (the same index vector as the codes' columns), so their maxima, digits and packed words
are elementwise in that layout and broadcast to the tile's rows with no conversion. The threads that hold one column
for different rows compute its digits redundantly: arithmetic instead of shared memory and barriers. The group
(4 words of int4 = 32 weights, or the weight's smaller group) maximum and sum are a reshape over adjacent columns.

Same arithmetic as gemv_splitk._splitk_kernel (two int8 digits per activation, per group scale d sum(q (hi + lo /
256)) + offset sum(a)), same split-K fixup: the results equal the shipped kernel's up to float32 summation order.

    python -m bench.probes.int4_coldigits [--check] [--sass]

--sass compiles both kernels for sm_90 here (no GPU): registers, spills, instructions, barriers; --check (GPU, or
the interpreter on the CPU) compares both with a float64 reference on 7B-shaped random weights and, on a GPU, times
each projection's 32 layers in one graph, shipped config against the same config here.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv_splitk import (
    DEFAULT,
    SplitKConfig,
    SplitKScratch,
    _dp4a,
    _split,
    activation_slice,
    fixup,
)
from graph_executor.kernels.pdl import wait_for_prior
from graph_executor.quant.formats import INT4_ZERO, Int4Groups


@triton.jit
def _pack(b0, b1, b2, b3):
    """Four int32 values in -127..127 -> one int8x4 word (byte j from bj)."""
    return (b0 & 0xFF) | ((b1 & 0xFF) << 8) | ((b2 & 0xFF) << 16) | ((b3 & 0xFF) << 24)


@triton.jit
def _digits(a, inv):
    """a float32 -> (hi, lo) int32: a * inv ~= hi + lo / 256 (|hi|, |lo| <= 127)."""
    s = a * inv
    hi = tl.floor(s + 0.5)
    lo = tl.minimum(tl.maximum(tl.floor((s - hi) * 256.0 + 0.5), -127.0), 127.0)
    return hi.to(tl.int32), lo.to(tl.int32)


@triton.jit
def _coldigits_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, part_ptr, count_ptr, N, K,
                      eps, MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_KW: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr):
    """int4 codes, MODE as gemv_splitk._splitk_kernel's. Word column kw holds weights 8 kw .. 8 kw + 7 (byte j: 2j
    in the low nibble, 2j + 1 in the high one)."""
    wait_for_prior(PDL)
    WPG: tl.constexpr = GROUP // 8  # words per weight group
    NG: tl.constexpr = BLOCK_KW // WPG
    QW: tl.constexpr = 4 if WPG > 4 else WPG  # words per activation group (32 weights, or the weight's group)
    NQ: tl.constexpr = BLOCK_KW // QW
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    KW = tl.multiple_of(K // 8, WPG)
    kws = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    col_ok = kws < KW
    w = tl.load(codes_ptr + rows[:, None].to(tl.int64) * KW + kws[None, :], mask=row_ok[:, None] & col_ok[None, :],
                other=0)  # int32 [BLOCK_N, BLOCK_KW]
    # the eight activations of each word column, in the columns' layout; ss: the slice's sum of squares (MODE 0)
    a0, s0 = activation_slice(a_ptr, nw_ptr, kws * 8 + 0, col_ok, K, MODE)
    a1, s1 = activation_slice(a_ptr, nw_ptr, kws * 8 + 1, col_ok, K, MODE)
    a2, s2 = activation_slice(a_ptr, nw_ptr, kws * 8 + 2, col_ok, K, MODE)
    a3, s3 = activation_slice(a_ptr, nw_ptr, kws * 8 + 3, col_ok, K, MODE)
    a4, s4 = activation_slice(a_ptr, nw_ptr, kws * 8 + 4, col_ok, K, MODE)
    a5, s5 = activation_slice(a_ptr, nw_ptr, kws * 8 + 5, col_ok, K, MODE)
    a6, s6 = activation_slice(a_ptr, nw_ptr, kws * 8 + 6, col_ok, K, MODE)
    a7, s7 = activation_slice(a_ptr, nw_ptr, kws * 8 + 7, col_ok, K, MODE)
    ss = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7
    m = tl.maximum(tl.maximum(tl.maximum(tl.abs(a0), tl.abs(a1)), tl.maximum(tl.abs(a2), tl.abs(a3))),
                   tl.maximum(tl.maximum(tl.abs(a4), tl.abs(a5)), tl.maximum(tl.abs(a6), tl.abs(a7))))
    amax = tl.max(tl.reshape(m, [NQ, QW]), axis=1)  # [NQ]
    inv = tl.reshape(tl.broadcast_to((tl.where(amax > 0, 127.0 / amax, 0.0))[:, None], [NQ, QW]), [BLOCK_KW])
    h0, l0 = _digits(a0, inv)
    h1, l1 = _digits(a1, inv)
    h2, l2 = _digits(a2, inv)
    h3, l3 = _digits(a3, inv)
    h4, l4 = _digits(a4, inv)
    h5, l5 = _digits(a5, inv)
    h6, l6 = _digits(a6, inv)
    h7, l7 = _digits(a7, inv)
    d_even_hi, d_odd_hi = _pack(h0, h2, h4, h6), _pack(h1, h3, h5, h7)
    d_even_lo, d_odd_lo = _pack(l0, l2, l4, l6), _pack(l1, l3, l5, l7)
    q_even = w & 0x0F0F0F0F
    q_odd = (w >> 4) & 0x0F0F0F0F
    dot = _dp4a(q_odd, d_odd_hi[None, :], _dp4a(q_even, d_even_hi[None, :], tl.zeros_like(w), False, EMULATE), False,
                EMULATE)
    dot = _dp4a(q_odd, d_odd_lo[None, :], _dp4a(q_even, d_even_lo[None, :], dot * 256, False, EMULATE), False,
                EMULATE)
    qsum = tl.sum(tl.reshape(dot, [BLOCK_N, NQ, QW]), axis=2).to(tl.float32) * (amax / 32512.0)[None, :]
    if NQ != NG:
        qsum = tl.sum(tl.reshape(qsum, [BLOCK_N, NG, NQ // NG]), axis=2)
    g = pid_k * NG + tl.arange(0, NG)
    gmask = row_ok[:, None] & (g < K // GROUP)[None, :]
    at = rows[:, None].to(tl.int64) * (K // GROUP) + g[None, :]
    s = tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32)  # [BLOCK_N, NG]
    a_sum = tl.sum(tl.reshape(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7, [NG, WPG]), axis=1)  # [NG], exact
    if HAS_OFFSET:
        o = tl.load(offset_ptr + at, mask=gmask, other=0.0).to(tl.float32)
        terms = s * qsum + o * a_sum[None, :]
    else:
        terms = s * (qsum - ZERO * a_sum[None, :])
    partial = tl.sum(terms, axis=1)
    fixup(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, count_ptr, scale_ptr, b_ptr, out_ptr, N, K, eps,
          MODE, HAS_BIAS, False, SPLIT, SPLIT_P2, BLOCK_N)


def gemv_residual(w: Int4Groups, a: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                  cfg: SplitKConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ a [K] (gemv_splitk.gemv_residual's contract, int4 only)."""
    n, k = w.shape
    split = _split(w, cfg)
    _coldigits_kernel[(triton.cdiv(n, cfg.block_n), split)](
        w.codes.view(torch.int32), w.scale, w.offset if w.offset is not None else w.scale, a, a, x, x,
        scratch.partial, scratch.count, n, k, 0.0, MODE=1, HAS_OFFSET=w.offset is not None,
        ZERO=0.0 if w.offset is not None else float(INT4_ZERO), HAS_BIAS=False, SPLIT=split,
        SPLIT_P2=triton.next_power_of_2(split), GROUP=w.group, BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw,
        EMULATE=not w.codes.is_cuda, num_warps=cfg.num_warps, num_stages=1, PDL=False)
    return x


SASS_TYPES = dict(codes_ptr="*i32", scale_ptr="*fp16", offset_ptr="*fp16", a_ptr="*fp16", nw_ptr="*fp16",
                  b_ptr="*fp16", out_ptr="*fp16", part_ptr="*fp32", count_ptr="*i32", N="i32", K="i32", eps="fp32")


def sass(configs: list[tuple[int, int, int]]) -> None:
    from bench.probes.sass_usage import SPLITK_TYPES, compile_for, usage
    from graph_executor.kernels.gemv_splitk import _splitk_kernel

    print("| kernel | config | registers | spills B | SASS | per weight | BAR | SHFL | STS + LDS | IDP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bn, bkw, warps in configs:
        common = dict(MODE=1, HAS_OFFSET=True, ZERO=0.0, HAS_BIAS=False, SPLIT=8, SPLIT_P2=8, GROUP=32, BLOCK_N=bn,
                      BLOCK_KW=bkw, PDL=True)
        for name, kernel, types, consts in (
                ("shipped", _splitk_kernel, SPLITK_TYPES, dict(common, INT4=True, EMULATE=False, EARLY=False)),
                ("columns", _coldigits_kernel, SASS_TYPES, dict(common, EMULATE=False))):
            u = usage(compile_for(kernel, types, consts, warps))
            op = u.opcodes.get
            weights = bn * bkw * 8 / (32 * warps)
            print(f"| {name} | {bn}x{bkw}/{warps}w | {u.registers} | {u.stack} | {u.instructions} | "
                  f"{u.instructions / weights:.2f} | {op('BAR', 0)} | {op('SHFL', 0)} | {op('STS', 0) + op('LDS', 0)} | "
                  f"{op('IDP', 0)} |", flush=True)


def check(device: torch.device, reps: int) -> None:
    from bench.floors import time_gpu
    from bench.probes.lowbit_gemv import SHAPES
    from graph_executor.fused_decoder import INT4_PLAN
    from graph_executor.kernels import gemv_splitk
    from graph_executor.quant.formats import quantize_int4

    g = torch.Generator(device=device).manual_seed(0)
    for name in ("o", "down", "qkv", "gate_up") if device.type == "cuda" else ("o",):
        n, k = SHAPES[name]
        if device.type != "cuda":
            n, k = 64, 512
        cfg = getattr(INT4_PLAN, name)
        layers = 32 if device.type == "cuda" else 1
        ws = [quantize_int4(torch.randn(n, k, device=device, generator=g, dtype=torch.float16) * 0.02)
              for _ in range(layers)]
        a = torch.randn(k, device=device, generator=g, dtype=torch.float16)
        r = torch.randn(n, device=device, generator=g, dtype=torch.float16)
        scratch = SplitKScratch.allocate([ws[0]], [cfg], device)
        ref = r.double() + ws[0].dequantize().double() @ a.double()
        got_old = gemv_splitk.gemv_residual(ws[0], a, r.clone(), scratch, cfg)
        got_new = gemv_residual(ws[0], a, r.clone(), scratch, cfg)
        rel = lambda t: float((t.double() - ref).norm() / ref.norm())  # noqa: E731
        line = f"{name:8s} {n}x{k} rel err shipped {rel(got_old):.2e} columns {rel(got_new):.2e}"
        if device.type == "cuda":
            times = []
            for fn in (gemv_splitk.gemv_residual, gemv_residual):
                x = r.clone()
                for wi in ws:
                    fn(wi, a, x, scratch, cfg)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for wi in ws:
                        fn(wi, a, x, scratch, cfg)
                times.append(time_gpu(graph.replay, device) * 1e3)
            nbytes = sum(wi.nbytes for wi in ws)
            line += (f"  32 layers: shipped {times[0]:.3f} ms ({nbytes / times[0] / 1e9:.2f} TB/s), columns "
                     f"{times[1]:.3f} ms ({nbytes / times[1] / 1e9:.2f} TB/s), {times[1] / times[0]:.3f}x")
        print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sass", action="store_true", help="compile both for sm_90 here and compare the builds")
    ap.add_argument("--check", action="store_true", help="float64 reference check (and timing on a GPU)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.sass:
        sass([(32, 64, 4), (64, 64, 4), (64, 32, 4), (128, 32, 4)])
    if args.check:
        check(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.reps)


if __name__ == "__main__":
    main()
