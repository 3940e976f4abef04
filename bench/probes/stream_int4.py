"""Probe: a streaming packed decode GEMV against the shipped split-K one (gemv_splitk with its reduce kernel).

Why: the split-K GEMVs' programs each load one block (all loads in flight at once), then spend their life on the
dp4a math and the partials, so the card holds far fewer bytes in flight than it could: their loads alone read at
2.1-3.5 TB/s and one-shot plain reads of the same bytes at 2.8-4.1 (bench/probes/read_ceiling.py). Here a program
owns whole output rows and walks K (or, with fewer programs than row blocks, several row blocks one after another)
in a single software-pipelined loop (`tl.range(num_stages=STAGES)`: cp.async stages, STAGES - 1 steps of codes,
scales and offsets in flight while a step is multiplied), so there are no partial sums, no second kernel and no
fixup; the activation's two int8 digits are formed per step as gemv_splitk forms them (same arithmetic).

    python -m bench.probes.stream_int4 [--configs 32x128x4x3,...] [--projections qkv,o] [--layers 32] [--check]

A config is BLOCK_N x STEP_KW (32-bit words of codes a step) x warps x stages [x programs: 0 = one row block each].
Each projection in its step's mode, `layers` distinct weights a graph, PDL, against the shipped plan's config; the
outputs against the split-K kernel's (relative error) and, with --check, one layer's against float64.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.act_digits import digit_words, digits
from graph_executor.kernels.gemv_splitk import _dp4a, activation_slice, tile_offsets
from graph_executor.kernels.pdl import launch_options, wait_for_prior
from graph_executor.quant.formats import INT4_ZERO, Int4Groups, Int8Groups


@triton.jit
def _stream_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, N, K, eps, n_iter, G,
                   MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, STEP_KW: tl.constexpr, INT4: tl.constexpr,
                   EMULATE: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr, TILE_N: tl.constexpr,
                   TILE_KW: tl.constexpr):
    """Program p takes row blocks p, p + G, ... (G programs); for each it walks K in steps of STEP_KW words,
    iteration `it` of the flat loop being step it % NK of its (it // NK)-th block. MODEs as gemv_splitk."""
    wait_for_prior(PDL)
    EPW: tl.constexpr = 8 if INT4 else 4
    WPG: tl.constexpr = GROUP // EPW
    NG: tl.constexpr = STEP_KW // WPG
    QGROUP: tl.constexpr = 32 if GROUP > 32 else GROUP
    NQ: tl.constexpr = STEP_KW * EPW // QGROUP
    KW = tl.multiple_of(K // EPW, WPG)
    NK = tl.cdiv(KW, STEP_KW)
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    ssum = tl.zeros([1], dtype=tl.float32)
    for it in tl.range(0, n_iter, num_stages=STAGES):
        rb = pid + (it // NK) * G
        kc = it % NK
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N  # a block past the last (rb >= NB) has no row below N
        kws = kc * STEP_KW + tl.arange(0, STEP_KW)
        g = kc * NG + tl.arange(0, NG)
        if TILE_N == BLOCK_N and TILE_KW == STEP_KW:
            tile = (rb * tl.cdiv(KW, TILE_KW) + kc).to(tl.int64)
            code_at = tile * (BLOCK_N * STEP_KW) + (tl.arange(0, BLOCK_N)[:, None] * STEP_KW
                                                    + tl.arange(0, STEP_KW)[None, :])
            at = tile * (BLOCK_N * NG) + (tl.arange(0, BLOCK_N)[:, None] * NG + tl.arange(0, NG)[None, :])
        elif TILE_N > 0:
            code_at = tile_offsets(rows, kws, KW, TILE_N, TILE_KW)
            at = tile_offsets(rows, g, K // GROUP, TILE_N, TILE_KW // WPG)
        else:
            code_at = rows[:, None].to(tl.int64) * KW + kws[None, :]
            at = rows[:, None].to(tl.int64) * (K // GROUP) + g[None, :]
        wmask = row_ok[:, None] & (kws < KW)[None, :]
        gmask = row_ok[:, None] & (g < K // GROUP)[None, :]
        w = tl.load(codes_ptr + code_at, mask=wmask, other=0)  # int32 [BLOCK_N, STEP_KW]
        s = tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32)  # [BLOCK_N, NG]
        if HAS_OFFSET:
            o = tl.load(offset_ptr + at, mask=gmask, other=0.0).to(tl.float32)
        ka = kc * STEP_KW * EPW + tl.arange(0, STEP_KW * EPW)
        a, ss = activation_slice(a_ptr, nw_ptr, ka, ka < K, K, MODE)
        hi, lo, amax, a_sum = digits(a, QGROUP, GROUP)  # the split-K GEMV's digits (kernels/act_digits.py)
        w0, w1, w2, w3 = digit_words(hi, lo, INT4)
        if INT4:
            q_even = w & 0x0F0F0F0F
            q_odd = (w >> 4) & 0x0F0F0F0F
            dot = _dp4a(q_odd, w1[None, :], _dp4a(q_even, w0[None, :], tl.zeros_like(w), False, EMULATE), False,
                        EMULATE)
            dot = _dp4a(q_odd, w3[None, :], _dp4a(q_even, w2[None, :], dot * 256, False, EMULATE), False, EMULATE)
        else:
            dot = _dp4a(w, w0[None, :], tl.zeros_like(w), True, EMULATE)
            dot = _dp4a(w, w2[None, :], dot * 256, True, EMULATE)
        qsum = tl.sum(tl.reshape(dot, [BLOCK_N, NQ, QGROUP // EPW]), axis=2).to(tl.float32) * (amax / 32512.0)[None, :]
        if NQ != NG:
            qsum = tl.sum(tl.reshape(qsum, [BLOCK_N, NG, NQ // NG]), axis=2)
        if HAS_OFFSET:
            terms = s * qsum + o * a_sum[None, :]
        else:
            terms = s * (qsum - ZERO * a_sum[None, :])
        acc += tl.sum(terms, axis=1)
        ssum += ss
        if kc == NK - 1:  # this row block's last step: its epilogue, then start the next block from zero
            total = acc
            if MODE == 0:
                total = total / tl.sqrt(tl.sum(ssum, axis=0) / K + eps)
                if HAS_BIAS:
                    total += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            else:
                total += tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            ssum = tl.zeros([1], dtype=tl.float32)


def stream_gemv(w: Int4Groups | Int8Groups, a: torch.Tensor, nw: torch.Tensor | None, out: torch.Tensor, mode: int,
                cfg: tuple[int, ...], pdl: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """MODE 0: out = W @ (rmsnorm(a) * nw); 1: out += W @ a; 2: out += W @ SwiGLU(a). cfg = (block_n, step_kw,
    warps, stages[, programs])."""
    block_n, step_kw, warps, stages = cfg[:4]
    n, k = w.shape
    nb = triton.cdiv(n, block_n)
    programs = min(cfg[4], nb) if len(cfg) > 4 and cfg[4] else nb
    nk = triton.cdiv(k // w.per_word, step_kw)
    n_iter = triton.cdiv(nb, programs) * nk
    int4 = isinstance(w, Int4Groups)
    tiles = w.tiles or (0, 0)
    _stream_kernel[(programs,)](
        w.codes.view(torch.int32), w.scale, w.offset if w.offset is not None else w.scale, a,
        nw if nw is not None else a, out, out, n, k, eps, n_iter, programs, MODE=mode, HAS_OFFSET=w.offset is not None,
        ZERO=float(INT4_ZERO) if int4 and w.offset is None else 0.0, HAS_BIAS=False, GROUP=w.group,
        BLOCK_N=block_n, STEP_KW=step_kw, INT4=int4, EMULATE=not w.codes.is_cuda, PDL=pdl and w.codes.is_cuda,
        STAGES=stages, TILE_N=tiles[0], TILE_KW=tiles[1], num_warps=warps, num_stages=stages,
        **launch_options(pdl and w.codes.is_cuda))
    return out


def reference(w: Int4Groups | Int8Groups, a: torch.Tensor, nw: torch.Tensor, init: torch.Tensor, mode: int
              ) -> torch.Tensor:
    """float64 of what stream_gemv writes."""
    dense = (w.row_major() if w.tiles else w).dequantize(torch.float64)
    x = a.double()
    if mode == 0:
        x = x / torch.sqrt((x * x).mean() + 1e-5) * nw.double()
        return dense @ x
    if mode == 2:
        k = x.numel() // 2
        x = torch.nn.functional.silu(x[:k]) * x[k:]
    return init.double() + dense @ x


def built(name: str, label: str, graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
    """Wait for a variant's eager warm-up, then one replay, so that a fault names its kernel (stderr)."""
    torch.cuda.synchronize(device)
    print(f"warmed {name} {label}", file=sys.stderr, flush=True)
    graph.replay()
    torch.cuda.synchronize(device)
    print(f"built {name} {label}", file=sys.stderr, flush=True)


def parse(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


@dataclass(frozen=True)
class Candidate:
    """One kernel a probe times against the shipped split-K GEMV: `call(w, a, nw, out)` writes out as the shipped
    call does (out holds the residual on entry for MODEs 1 and 2), over each of `weights` (its layout of the
    layers' weights)."""

    label: str
    weights: list
    call: object  # (w, a, nw or None, out) -> None


def compare_to_shipped(bits: int, projections: list[str], layers: int, rounds: int, check: bool, candidates) -> None:
    """Per 7B projection: `layers` distinct random weights a CUDA graph, the shipped split-K 32x128x4 + reduce kernel
    (PDL; o and down tile-major as the loader stores them) against every `candidates(weights, n, k, mode)`
    (a list of Candidate), median graph time of `rounds` alternating rounds, each output's relative error against
    the shipped one's and (`check`) one layer's against float64. Prints one table row per kernel."""
    from bench.floors import time_gpu
    from bench.probes.tiled_int4 import MATRICES, launch, random_packed
    from bench.probes.verify_plan import graphed
    from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch, scratch_floats
    from graph_executor.quant.tiles import tiles_for

    device = torch.device("cuda")
    shipped = SplitKConfig(32, 128, 4, pdl=True, reduce_kernel=True)
    print(f"int{bits} decode GEMVs on {torch.cuda.get_device_name()}, {layers} layers a graph, PDL; median of "
          f"{rounds} alternating rounds; shipped = split-K 32x128x4 + reduce kernel (o and down tile-major as the "
          "loader stores them)")
    print("| projection | kernel | ms | TB/s | vs shipped | rel err (2-norm) vs shipped | vs float64 |")
    print("|---|---|---|---|---|---|---|")
    for name, n, k, mode in MATRICES:
        if name not in projections:
            continue
        weights = [random_packed(bits, n, k, device) for _ in range(layers)]
        nbytes = weights[0].nbytes * layers
        a = torch.randn(2 * k if mode == 2 else k, device=device).half()
        nw = torch.rand(k, device=device).half()
        init = torch.randn(n, device=device).half()
        variants = {}
        ship_tiles = tiles_for(weights[0], 32, 128) if name in ("o", "down") else None
        ship_w = [w.tiled(ship_tiles) for w in weights] if ship_tiles else weights
        scratch = SplitKScratch.zeros(scratch_floats(weights[0], shipped), triton.cdiv(n, 32), device)
        out = torch.zeros(n, device=device).half()

        def ship_calls(out=out, ws=ship_w) -> None:
            out.copy_(init)
            for w in ws:
                launch(w, a, nw, out, mode, scratch, shipped)
        variants["split-K 32x128x4"] = (graphed(ship_calls), out, "")
        built(name, "split-K 32x128x4", variants["split-K 32x128x4"][0], device)
        for cand in candidates(weights, n, k, mode):
            out = torch.zeros(n, device=device).half()

            def calls(out=out, cand=cand) -> None:
                out.copy_(init)
                for w in cand.weights:
                    cand.call(w, a, nw if mode == 0 else None, out)
            errs = ""
            if check:
                one = torch.zeros(n, device=device).half().copy_(init)
                cand.call(cand.weights[0], a, nw if mode == 0 else None, one)
                ref = reference(cand.weights[0], a, nw, init, mode)
                errs = f"{((one.double() - ref).norm() / ref.norm()).item():.1e}"
            variants[cand.label] = (graphed(calls), out, errs)
            built(name, cand.label, variants[cand.label][0], device)
        times = {label: [] for label in variants}
        for _ in range(rounds):
            for label, (graph, _, _) in variants.items():
                times[label].append(time_gpu(graph.replay, device) * 1e3)
        base_ms, base_out = None, None
        for label, (graph, out, errs) in variants.items():
            graph.replay()
            torch.cuda.synchronize()
            ms = statistics.median(times[label])
            if base_ms is None:
                base_ms, base_out = ms, out.float().clone()
            err = ((out.float() - base_out).norm() / base_out.norm()).item()
            print(f"| {name} x{layers} | {label} | {ms:.3f} | {nbytes / ms / 1e9:.2f} | {ms / base_ms:.3f} | "
                  f"{err:.1e} | {errs} |", flush=True)
        variants.clear()
        weights.clear()
        torch.cuda.empty_cache()


def compare_args(description: str, configs: str, configs_help: str, layout: str, layout_help: str
                 ) -> argparse.ArgumentParser:
    """The options a compare_to_shipped probe takes: --bits, --configs, --layout, --projections, --layers, --rounds,
    --check (the probe's own default configs and layout)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=4)
    ap.add_argument("--configs", default=configs, help=configs_help)
    ap.add_argument("--layout", choices=("tiled", "row", "both"), default=layout, help=layout_help)
    ap.add_argument("--projections", default="qkv,o,gate_up,down")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="one layer of each config against float64 first")
    return ap


def layouts(weights: list, block_n: int, block_kw: int, layout: str) -> list[tuple[str, list]]:
    """(label suffix, weights) per layout a config runs over: tile-major in tiles of its block (" tiled") where one
    fits, row-major (""), or both (`layout`: tiled, row or both; tiled falls back to row-major where no tile fits)."""
    from graph_executor.quant.tiles import tiles_for

    t = tiles_for(weights[0], block_n, block_kw) if layout != "row" else None
    tiled = [(" tiled", [w.tiled(t) for w in weights])] if t is not None and t == (block_n, block_kw) else []
    return tiled if tiled and layout == "tiled" else [("", weights)] + tiled


def main(argv: list[str] | None = None) -> None:
    ap = compare_args(__doc__.splitlines()[0], "32x128x4x3,32x64x4x4,16x128x4x4,64x64x4x3,64x64x8x3,128x32x4x3,"
                      "16x256x4x3,8x256x4x4,64x32x4x4,128x32x8x3",
                      "comma-separated BLOCK_N x STEP_KW x warps x stages [x programs]", "tiled",
                      "the stream configs over tile-major weights of their block (one contiguous run a step; "
                      "row-major where no tile fits), row-major, or both")
    args = ap.parse_args(argv)
    configs = [parse(c) for c in args.configs.split(",")]

    def candidates(weights, n, k, mode) -> list[Candidate]:
        return [Candidate("stream " + "x".join(str(v) for v in cfg) + suffix, ws,
                          lambda w, a, nw, out, cfg=cfg, mode=mode: stream_gemv(w, a, nw, out, mode, cfg))
                for cfg in configs for suffix, ws in layouts(weights, cfg[0], cfg[1], args.layout)]

    compare_to_shipped(args.bits, args.projections.split(","), args.layers, args.rounds, args.check, candidates)


if __name__ == "__main__":
    main()
