"""Block-config sweep of the batched decode GEMVs (`kernels/gemv_batch.py`) on LLaMA-2-7B's projections, against
cuBLAS (`torch.mm`) and the batch-1 GEMV on the same weights: each case is LAYERS calls over distinct weights in one
CUDA graph (nothing stays in L2), timed over replays; read TB/s = weight bytes / time.

    python -m bench.probes.batch_gemv [--batches 2,4,8] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from graph_executor.kernels import gemv, gemv_batch
from graph_executor.kernels.gemv import GEMV_PLAN
from graph_executor.kernels.pdl import wait_for_prior

LAYERS = 8
REPLAYS = 20
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """fn captured as a CUDA graph, after one eager call (kernel compile), and replayed once (its upload)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_ms(fn, replays: int = REPLAYS) -> float:
    """ms per call of fn, captured as a CUDA graph and timed over replays."""
    graph = capture_graph(fn)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def _time(fn) -> float:
    """ms per layer of fn (LAYERS launches)."""
    return graph_ms(fn) / LAYERS


@triton.jit
def _fma_rmsnorm_gemm_kernel(w_ptr, x_ptr, nw_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_out, eps,
                             HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PDL: tl.constexpr):
    """`gemv_batch`'s RMSNorm GEMM without tensor cores: every row of a (padded) power-of-two batch of ROWS multiplies the
    weight tile on the CUDA cores, a [BLOCK_N, ROWS, BLOCK_K] float32 accumulator reduced once at the end."""
    wait_for_prior(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seqs = tl.arange(0, ROWS)
    row_ok, seq_ok = rows < N, seqs < M
    acc = tl.zeros([BLOCK_N, ROWS, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + seqs[:, None] * stride_x + cols[None, :], mask=seq_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)  # [R, BK]
        nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ss += x * x
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)  # [BN, BK]
        acc += w[:, None, :] * (x * nw[None, :])[None, :, :]
    out = tl.sum(acc, axis=2) * (1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps))[None, :]  # [BN, R]
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + seqs[None, :] * stride_out + rows[:, None], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & seq_ok[None, :])


def fma_rmsnorm_gemm(w: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                     cfg: gemv_batch.BatchGemvConfig) -> torch.Tensor:
    """The CUDA-core variant of `gemv_batch.rmsnorm_gemm` (no bias), kept here as the sweep's comparison: slower at
    every measured config (bench/NOTES.md, issue 14)."""
    n, k = w.shape
    _fma_rmsnorm_gemm_kernel[(triton.cdiv(n, cfg.block_n),)](
        w, x, norm_w, w, out, x.shape[0], n, k, x.stride(0), out.stride(0), eps, HAS_BIAS=False,
        ROWS=max(2, triton.next_power_of_2(x.shape[0])), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, PDL=False)
    return out


def sweep(name: str, batches: list[int]) -> list[dict]:
    n, k = SHAPES[name]
    dev, dt = torch.device("cuda"), torch.float16
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
    nw = torch.ones(k, device=dev, dtype=dt)
    gbytes = n * k * 2 / 1e9
    rows = []
    x1, out1 = torch.randn(k, device=dev, dtype=dt), torch.empty(n, device=dev, dtype=dt)
    single_cfg = getattr(GEMV_PLAN, name)
    ms = _time(lambda: [gemv.rmsnorm_gemv(w, x1, nw, 1e-5, out1, cfg=single_cfg) for w in ws])
    rows.append({"proj": name, "m": 1, "kernel": "gemv (batch-1)", "ms": ms, "tbps": gbytes / ms})
    for m in batches:
        x, out = torch.randn(m, k, device=dev, dtype=dt), torch.empty(m, n, device=dev, dtype=dt)
        ms = _time(lambda: [torch.mm(x, w.t(), out=out) for w in ws])
        rows.append({"proj": name, "m": m, "kernel": "cublas", "ms": ms, "tbps": gbytes / ms})
        configs = [("batch", gemv_batch.BatchGemvConfig(bn, bk, w, s)) for bn, bk, w, s in itertools.product(
            (16, 32, 64, 128), (64, 128, 256), (4,), (2, 4))]
        configs += [("fma", gemv_batch.BatchGemvConfig(bn, bk, w, s)) for bn, bk, w, s in itertools.product(
            (4, 8, 16), (64, 128, 256), (4,), (2, 3))]
        for kind, cfg in configs:
            label = f"{kind} {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
            gemm = gemv_batch.rmsnorm_gemm if kind == "batch" else fma_rmsnorm_gemm
            try:
                ms = _time(lambda: [gemm(w, x, nw, 1e-5, out, cfg=cfg) for w in ws])
            except Exception as e:  # noqa: BLE001 - a config the compiler refuses (shared memory)
                rows.append({"proj": name, "m": m, "kernel": label, "error": str(e)[:80]})
                continue
            rows.append({"proj": name, "m": m, "kernel": label, "ms": ms, "tbps": gbytes / ms})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="2,4,8")
    ap.add_argument("--projections", default=",".join(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    print("| projection | M | kernel | ms/layer | TB/s |\n|---|---|---|---|---|", flush=True)
    rows = []
    for p in args.projections.split(","):
        swept = sweep(p, batches)
        rows += swept
        for (proj, m), group in itertools.groupby(swept, key=lambda r: (r["proj"], r["m"])):
            group = [r for r in group if "ms" in r]
            best = [r for kind in ("batch", "fma") for r in sorted(
                (r for r in group if r["kernel"].startswith(kind)), key=lambda r: r["ms"])[:3]]
            for r in [r for r in group if not r["kernel"].startswith(("batch", "fma"))] + best:
                print(f"| {proj} | {m} | {r['kernel']} | {r['ms']:.4f} | {r['tbps']:.2f} |", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "batch_gemv.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
