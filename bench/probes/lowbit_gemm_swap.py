"""Probe: a swapped-operand, split-K low-bit GEMM for short prompts, against the shipped low-bit GEMM
(graph_executor/kernels/gemm_lowbit.py), torch.mm on fp16 weights and the dequantize-then-torch.mm path.

Why (bench/NOTES.md, issue 10): at T = 10..64 prompt tokens the shipped GEMM takes the activation as the left
operand of `tl.dot` ([BLOCK_M tokens, BLOCK_K] x [BLOCK_K, BLOCK_N]), so the dequantized weights are the right
operand, which a Hopper tensor core (wgmma) must read from shared memory, and a short prompt pads BLOCK_M. Here the
weights are the left operand ([BLOCK_N rows, BLOCK_K] x x^T [BLOCK_K, BLOCK_T]): the rows fill the tensor core's
M, the few tokens its N (8..64), and a split of K over SPLIT programs (partials to a float32 scratch, the last
program of a tile adds them in order: the decode GEMVs' fixup) fills 132 SMs even for N = 4096.

Weight unpacking variants (UNPACK):
  0: each weight's code and its group's scale gathered per element, value formed in float32, rounded once;
  1: the shipped `_weight_tile` (codes interleaved, scales broadcast over a [rows, groups, group] reshape);
  2: BLOCK_K = one group: the dot runs on the exact codes (q - zero, small integers, exact in fp16/bf16) and the
     group's scale multiplies the float32 product, + offset * sum(x over the group) (no per-weight float math).

Outcome (H200, bench/results/2026-11-30-h200-lowbit-gemm-swap): UNPACK 1 was best in every case, 0, 2, 3 and 4 no
better; the swapped, split kernel with UNPACK 1 is what gemm_lowbit.gemm now ships, so the "shipped" column of a run
after that change times it with its default config (the committed logs' "shipped" is the earlier kernel).

    python -m bench.probes.lowbit_gemm_swap [--tokens 16,32,64,128] [--formats int4,int8] [--shapes ...] [--check]
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from graph_executor.kernels import gemm_lowbit
from graph_executor.kernels.gemm_lowbit import _epilogue, _weight_tile, _weights
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.quant.formats import Fp8Rows, Int4Groups, quantize_fp8, quantize_int4, quantize_int8


@dataclass(frozen=True)
class SwapConfig:
    block_n: int = 64
    block_t: int = 16
    block_k: int = 128
    split: int = 1
    unpack: int = 0
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, cols, K, FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr,
          ZERO: tl.constexpr, GROUP: tl.constexpr, DTYPE: tl.constexpr):
    """UNPACK 0: [BLOCK_N, BLOCK_K] weights in DTYPE, each code and scale gathered per element, float32 math."""
    m = row_ok[:, None] & (cols < K)[None, :]
    if FORMAT == 2:
        w = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=m, other=0.0).to(DTYPE)
    else:
        if FORMAT == 0:
            b = tl.load(codes_ptr + rows[:, None] * (K // 2) + (cols // 2)[None, :], mask=m, other=0)
            q = (b >> ((cols & 1) * 4).to(tl.uint8)[None, :]) & 0xF
        else:
            q = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=m, other=0)
        at = rows[:, None] * (K // GROUP) + (cols // GROUP)[None, :]
        s = tl.load(scale_ptr + at, mask=m, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = s * q.to(tl.float32) + tl.load(offset_ptr + at, mask=m, other=0.0).to(tl.float32)
        else:
            w = s * (q.to(tl.float32) - ZERO)
        w = w.to(DTYPE)
    return w


@triton.jit
def _swap_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K, K_SPLIT,
                 SPLIT, stride_xm, stride_om, FORMAT: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr,
                 GROUP: tl.constexpr, STEP_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                 UNPACK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tokens < M
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + tokens[None, :] * stride_xm + cols[:, None], mask=tok_ok[None, :] & (cols < K)[:, None],
                     other=0.0)  # [BLOCK_K, BLOCK_T] (unused by UNPACK >= 3 on int4: the compiler drops it)
        if UNPACK == 2:  # BLOCK_K == GROUP: exact codes on the tensor cores, the group's scale on the product
            m = row_ok[:, None] & (cols < K)[None, :]
            if FORMAT == 0:
                b = tl.load(codes_ptr + rows[:, None] * (K // 2) + (cols // 2)[None, :], mask=m, other=0)
                q = ((b >> ((cols & 1) * 4).to(tl.uint8)[None, :]) & 0xF).to(dtype)
            else:
                q = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=m, other=0).to(dtype)
            if not HAS_OFFSET:
                q = q - ZERO
            g = rows * (K // GROUP) + k0 // GROUP
            s = tl.load(scale_ptr + g, mask=row_ok, other=0.0).to(tl.float32)
            acc += s[:, None] * tl.dot(q, xt)
            if HAS_OFFSET:
                o = tl.load(offset_ptr + g, mask=row_ok, other=0.0).to(tl.float32)
                acc += o[:, None] * tl.sum(xt.to(tl.float32), axis=0)[None, :]
        elif UNPACK >= 3 and FORMAT == 0:  # even/odd halves: no interleave, the activation read at 2j and 2j + 1
            half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b = tl.load(codes_ptr + rows[:, None] * (K // 2) + half[None, :],
                        mask=row_ok[:, None] & (half < K // 2)[None, :], other=0)  # [BLOCK_N, BLOCK_K / 2]
            NG: tl.constexpr = BLOCK_K // STEP_GROUP
            groups = k0 // GROUP + tl.arange(0, NG)
            gat = rows[:, None] * (K // GROUP) + groups[None, :]
            gm = row_ok[:, None] & (groups < K // GROUP)[None, :]
            MATH: tl.constexpr = tl.float32 if UNPACK == 3 else dtype
            s = tl.load(scale_ptr + gat, mask=gm, other=0.0).to(MATH)[:, :, None]
            lo = tl.reshape((b & 0xF).to(MATH), [BLOCK_N, NG, STEP_GROUP // 2])
            hi = tl.reshape((b >> 4).to(MATH), [BLOCK_N, NG, STEP_GROUP // 2])
            if HAS_OFFSET:
                o = tl.load(offset_ptr + gat, mask=gm, other=0.0).to(MATH)[:, :, None]
                lo = s * lo + o
                hi = s * hi + o
            else:
                lo = s * (lo - ZERO)
                hi = s * (hi - ZERO)
            lo = tl.reshape(lo, [BLOCK_N, BLOCK_K // 2]).to(dtype)
            hi = tl.reshape(hi, [BLOCK_N, BLOCK_K // 2]).to(dtype)
            ev = k0 + 2 * tl.arange(0, BLOCK_K // 2)
            xm = tok_ok[None, :] & (ev < K)[:, None]
            x_ev = tl.load(x_ptr + tokens[None, :] * stride_xm + ev[:, None], mask=xm, other=0.0)
            x_od = tl.load(x_ptr + tokens[None, :] * stride_xm + ev[:, None] + 1, mask=xm, other=0.0)
            acc = tl.dot(lo, x_ev, acc)
            acc = tl.dot(hi, x_od, acc)
        else:
            if UNPACK == 1 or UNPACK >= 3:
                w = _weight_tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, k0, K, FORMAT, HAS_OFFSET, ZERO,
                                 GROUP, STEP_GROUP, BLOCK_N, BLOCK_K, dtype)
            else:
                w = _tile(codes_ptr, scale_ptr, offset_ptr, rows, row_ok, cols, K, FORMAT, HAS_OFFSET, ZERO, GROUP,
                          dtype)
            acc = tl.dot(w, xt, acc)
    at = out_ptr + tokens[None, :] * stride_om + rows[:, None]
    mask = row_ok[:, None] & tok_ok[None, :]
    if SPLIT > 1:
        grid_n = tl.num_programs(0)
        m_pad = tl.num_programs(1) * BLOCK_T
        n_pad = grid_n * BLOCK_N
        tile = part_ptr + (pid_k * m_pad + tokens[None, :]).to(tl.int64) * n_pad + rows[:, None]
        tl.store(tile, acc)  # padded tokens and rows past N: the scratch is sized for whole tiles
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid_t * grid_n + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)
            for i in range(SPLIT):
                acc += tl.load(tile + (i - pid_k) * m_pad * n_pad, cache_modifier=".cg")
            _epilogue(acc, at, mask, rows, row_ok, scale_ptr, b_ptr, FORMAT, HAS_BIAS, ACCUMULATE)
            tl.atomic_xchg(count_ptr + pid_t * grid_n + pid_n, 0)
    else:
        _epilogue(acc, at, mask, rows, row_ok, scale_ptr, b_ptr, FORMAT, HAS_BIAS, ACCUMULATE)


def scratch_for(n: int, t: int, cfg: SwapConfig) -> tuple[int, int]:
    grid_n, grid_t = triton.cdiv(n, cfg.block_n), triton.cdiv(t, cfg.block_t)
    return cfg.split * grid_t * cfg.block_t * grid_n * cfg.block_n, grid_n * grid_t


def swap_gemm(x, w, out, scratch: SplitKScratch, cfg: SwapConfig, bias=None, accumulate=False):
    n, k = w.shape
    t = x.shape[0]
    group = getattr(w, "group", 1)
    if cfg.unpack == 2 and (cfg.block_k != group or isinstance(w, Fp8Rows)):
        raise ValueError("unpack 2 needs block_k == group and a grouped format")
    k_split = triton.cdiv(triton.cdiv(k, cfg.split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_split)
    ptrs, fmt = _weights(w, cfg.block_k)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(t, cfg.block_t), split)
    _swap_kernel[grid](x, *ptrs, bias if bias is not None else out, out, scratch.partial, scratch.count, t, n, k,
                       k_split, split, x.stride(0), out.stride(0), **fmt, HAS_BIAS=bias is not None,
                       ACCUMULATE=accumulate, UNPACK=cfg.unpack, BLOCK_N=cfg.block_n, BLOCK_T=cfg.block_t,
                       BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _quantize(fmt, w):
    if fmt == "int4s":  # symmetric (Q4_0's convention): the same codes and scales, no offset
        a = quantize_int4(w, 32)
        return Int4Groups(a.codes, a.scale, None, 32)
    return {"int4": lambda: quantize_int4(w, 32), "int8": lambda: quantize_int8(w, 32), "fp8": lambda: quantize_fp8(w)}[fmt]()


def _check(device) -> None:
    """Every variant against float64 on small odd shapes (runs under the interpreter too)."""
    g = torch.Generator(device=device).manual_seed(1)
    dt = torch.float16 if device.type == "cuda" else torch.float32
    worst = 0.0
    for fmt, (n, k, t), unpack, split, acc_mode in itertools.product(
            ("int4", "int4s", "int8", "fp8"), ((72, 96, 5), (40, 160, 19)), (0, 1, 2, 3, 4), (1, 3), (False, True)):
        if fmt == "fp8" and (unpack == 2 or device.type != "cuda"):
            continue
        w = _quantize(fmt, torch.randn(n, k, device=device, generator=g))
        x = torch.randn(t, k, device=device, generator=g).to(dt)
        bias = None if acc_mode else torch.randn(n, device=device, generator=g).to(dt)
        out0 = torch.randn(t, n, device=device, generator=g).to(dt)
        ref = x.double() @ w.dequantize(torch.float32).double().T
        ref = ref + (out0.double() if acc_mode else bias.double())
        cfg = SwapConfig(block_n=16 if device.type != "cuda" else 64, block_t=16, block_k=32, split=split,
                         unpack=unpack)
        f, c = scratch_for(n, t, cfg)
        sc = SplitKScratch.zeros(f, c, device)
        out = out0.clone()
        swap_gemm(x, w, out, sc, cfg, bias=bias, accumulate=acc_mode)
        err = float(((out.double() - ref).abs() / ref.abs().clamp_min(ref.pow(2).mean().sqrt())).max())
        assert err < 3e-3, (fmt, n, k, t, unpack, split, acc_mode, err)
        assert int(sc.count.abs().sum()) == 0, "counters not reset"
        worst = max(worst, err)
    print(f"check: every variant within {worst:.1e} of float64", flush=True)


H, I = 4096, 11008
SHAPES = {"qkv": (3 * H, H, False), "o": (H, H, True), "gate_up": (2 * I, H, False), "down": (H, I, True)}


UNPACKS = (1, 3, 4)


def _sweep_configs(t: int, group: int) -> list[SwapConfig]:
    bt = max(16, min(64, triton.next_power_of_2(t)))
    out = []
    for bk, split, unpack in itertools.product((64, 128, 256), (1, 2, 4, 8), UNPACKS):
        out.append(SwapConfig(64, bt, bk, split, unpack))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16,32,64,128")
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--check", action="store_true", help="only the correctness check")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--unpacks", default="1,3,4")
    args = ap.parse_args()
    global UNPACKS
    UNPACKS = tuple(int(u) for u in args.unpacks.split(","))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check(dev)
    if args.check or dev.type != "cuda":
        return
    from bench.floors import time_gpu

    res = {"card": torch.cuda.get_device_name(), "rows": []}
    g = torch.Generator(device=dev).manual_seed(0)
    big = SplitKScratch.zeros(64 * 1024 * 1024, 65536, dev)
    print(f"{res['card']}: ms per projection (weights from HBM); swap = best swapped split-K config", flush=True)
    print(f"{'shape':8s} {'T':>4s} {'fmt':5s} {'fp16 mm':>8s} {'shipped':>8s} {'deq+mm':>8s} {'swap':>8s} "
          f"{'w TB/s':>7s}  best / next configs", flush=True)
    for name in args.shapes.split(","):
        n, k, accumulate = SHAPES[name]
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02
        copies16 = max(1, min(16, -(-256 * 1024**2 // (n * k * 2))))
        w16s = [w16] + [w16 + 0.001 * i for i in range(1, copies16)]
        for fmt in args.formats.split(","):
            w = _quantize(fmt, w16)
            copies = max(1, min(32, -(-256 * 1024**2 // w.nbytes)))
            ws = [w] + [_quantize(fmt, w16 + 0.001 * i) for i in range(1, copies)]
            for t in [int(s) for s in args.tokens.split(",")]:
                x = torch.randn(t, k, device=dev, dtype=torch.float16, generator=g)
                out = torch.zeros(t, n, device=dev, dtype=torch.float16)
                dense = torch.empty(n, k, device=dev, dtype=torch.float16)

                def timed(make, ws=ws) -> float:
                    ops = [make(wi) for wi in ws]
                    for op in ops:
                        op()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for op in ops:
                            op()
                    return time_gpu(graph.replay, dev, repeats=args.reps) * 1e3 / len(ops)

                ops16 = [lambda wi=wi: torch.mm(x, wi.t(), out=out) for wi in w16s]
                for op in ops16:
                    op()
                gr = torch.cuda.CUDAGraph()
                with torch.cuda.graph(gr):
                    for op in ops16:
                        op()
                mm16 = time_gpu(gr.replay, dev, repeats=args.reps) * 1e3 / len(ops16)
                shipped = timed(lambda wi: (lambda: gemm_lowbit.gemm(x, wi, out, accumulate=accumulate)))
                deq = timed(lambda wi: (lambda: torch.mm(x, gemm_lowbit.dequantize(wi, dense).t(), out=out)))
                ref = x.double() @ w.dequantize(torch.float32).double().T
                results = []
                for cfg in _sweep_configs(t, getattr(w, "group", 1)):
                    try:
                        o2 = torch.zeros_like(out)
                        swap_gemm(x, w, o2, big, cfg, accumulate=accumulate)
                        err = float(((o2.double() - ref).abs().max() / ref.abs().max()))
                        if err > 1e-2:
                            raise AssertionError(f"error {err:.1e}")
                        ms = timed(lambda wi, cfg=cfg: (lambda: swap_gemm(x, wi, out, big, cfg, accumulate=accumulate)))
                        results.append((ms, cfg))
                        res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": asdict(cfg), "ms": ms})
                    except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                        res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": asdict(cfg),
                                            "error": repr(e)[:200]})
                results.sort(key=lambda r: r[0])
                best = results[0][0] if results else float("nan")
                tops = "; ".join(f"{m:.4f} {c.block_n}/{c.block_t}/{c.block_k}/s{c.split}/u{c.unpack}"
                                 for m, c in results[:3])
                print(f"{name:8s} {t:4d} {fmt:5s} {mm16:8.4f} {shipped:8.4f} {deq:8.4f} {best:8.4f} "
                      f"{w.nbytes / best / 1e9:7.2f}  {tops}", flush=True)
                res["rows"].append({"shape": name, "T": t, "fmt": fmt, "fp16_mm": mm16, "shipped": shipped,
                                    "dequant_mm": deq, "best": best})
            del ws, w
        del w16s
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lowbit_gemm_swap.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
