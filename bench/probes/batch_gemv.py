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

from graph_executor.kernels import gemv, gemv_batch
from graph_executor.kernels.gemv import DEFAULT_PLAN

LAYERS = 8
REPLAYS = 20
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def graph_ms(fn, replays: int = REPLAYS) -> float:
    """ms per call of fn, captured as a CUDA graph (after one eager call: kernel compile) and timed over replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
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


def sweep(name: str, batches: list[int]) -> list[dict]:
    n, k = SHAPES[name]
    dev, dt = torch.device("cuda"), torch.float16
    ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(LAYERS)]
    nw = torch.ones(k, device=dev, dtype=dt)
    gbytes = n * k * 2 / 1e9
    rows = []
    x1, out1 = torch.randn(k, device=dev, dtype=dt), torch.empty(n, device=dev, dtype=dt)
    single_cfg = getattr(DEFAULT_PLAN, name)
    ms = _time(lambda: [gemv.rmsnorm_gemv(w, x1, nw, 1e-5, out1, cfg=single_cfg) for w in ws])
    rows.append({"proj": name, "m": 1, "kernel": "gemv (batch-1)", "ms": ms, "tbps": gbytes / ms})
    for m in batches:
        x, out = torch.randn(m, k, device=dev, dtype=dt), torch.empty(m, n, device=dev, dtype=dt)
        ms = _time(lambda: [torch.mm(x, w.t(), out=out) for w in ws])
        rows.append({"proj": name, "m": m, "kernel": "cublas", "ms": ms, "tbps": gbytes / ms})
        configs = [gemv_batch.BatchGemvConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product(
            (16, 32, 64, 128), (64, 128, 256), (4,), (2, 4))]
        configs += [gemv_batch.BatchGemvConfig(bn, bk, w, s, fma=True) for bn, bk, w, s in itertools.product(
            (4, 8, 16), (64, 128, 256), (4,), (2, 3))]
        for cfg in configs:
            bn, bk, warps, stages = cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages
            label = f"{'fma' if cfg.fma else 'batch'} {bn}x{bk} w{warps} s{stages}"
            try:
                ms = _time(lambda: [gemv_batch.rmsnorm_gemm(w, x, nw, 1e-5, out, cfg=cfg) for w in ws])
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
