"""Probe: the verify step's multi-row GEMVs (graph_executor/kernels/gemv_rows.py) per projection against what
they replace (cuBLAS through torch.mm / addmm_ at the same rows) and against the decode step's one-row GEMV
(kernels/gemv.py with the decoder's plan: the rate a step that reads each weight once can reach).

Each projection runs over `--layers` layers' worth of distinct weights in one CUDA graph (no L2 reuse), timed by
CUDA events (median of replays); TB/s counts the weight bytes. Prints one line per config and a table with
each projection's best config, and writes a JSON under --out.

    python -m bench.probes.gemv_rows [--model llama-2-7b|smollm2-135m] [--rows 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch

from bench.floors import time_gpu
from graph_executor.fused_verify import DEFAULT_ROWS_PLAN
from graph_executor.kernels import gemv
from graph_executor.kernels.gemv import GEMV_PLAN
from graph_executor.kernels.gemv_rows import (
    RowsConfig,
    gemv_residual_rows,
    rmsnorm_gemv_rows,
    silu_gemv_residual_rows,
)
from graph_executor.loading.presets import preset

SWEEP = [RowsConfig(n, k, 4, 3) for n, k in itertools.product((16, 32, 64), (64, 128, 256))] + [
    RowsConfig(32, 128, 8, 3), RowsConfig(16, 256, 4, 4)]


def shapes(model: str) -> dict[str, tuple[int, int]]:
    c = preset(model)
    h, i = c.hidden_size, c.intermediate_size
    return {"qkv": (c.q_size + 2 * c.kv_size, h), "o": (h, c.q_size), "gate_up": (2 * i, h), "down": (h, i),
            "lm_head": (c.vocab_size, h)}


def graph_ms(calls, replays: int) -> float:
    for call in calls:  # compile and warm outside the graph
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return time_gpu(graph.replay, torch.device("cuda"), repeats=replays) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset whose shapes to use")
    ap.add_argument("--rows", type=int, default=5, help="token rows (k + 1 of a verify step)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device, dtype, t = torch.device("cuda"), torch.float16, args.rows
    results, table = [], []
    for name, (n, k) in shapes(args.model).items():
        layers = 4 if name == "lm_head" else args.layers
        weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(layers)]
        gb = layers * n * k * 2 / 1e9
        width = 2 * k if name == "down" else k
        a = torch.randn(t, width, device=device, dtype=dtype)
        nw = torch.ones(k, device=device, dtype=dtype)
        out = torch.zeros(t, n, device=device, dtype=torch.float32 if name == "lm_head" else dtype)

        def rows_call(w, cfg):
            if name in ("qkv", "gate_up", "lm_head"):
                return lambda: rmsnorm_gemv_rows(w, a, nw, 1e-5, out, cfg=cfg)
            if name == "o":
                return lambda: gemv_residual_rows(w, a, out, cfg=cfg)
            return lambda: silu_gemv_residual_rows(w, a, out, cfg=cfg)

        best = None
        planned = getattr(DEFAULT_ROWS_PLAN, name, None)  # the verify step's config, where it takes this kernel
        for cfg in [*([planned] if planned else []), *SWEEP]:
            ms = graph_ms([rows_call(w, cfg) for w in weights], args.replays)
            results.append({"proj": name, "cfg": dataclasses.asdict(cfg), "ms": ms, "tb_s": gb / ms})
            print(f"  {name:8s} {cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w/{cfg.num_stages}s {ms:.3f} ms "
                  f"{gb / ms:.2f} TB/s", flush=True)
            if best is None or ms < best[1]:
                best = (cfg, ms)
        h = torch.randn(t, k, device=device, dtype=dtype)
        dense_out = torch.zeros(t, n, device=device, dtype=dtype)
        cublas = graph_ms([lambda w=w: torch.mm(h, w.t(), out=dense_out) for w in weights], args.replays)
        x1, o1 = torch.randn(k, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=torch.float32)
        one = graph_ms([lambda w=w: gemv.rmsnorm_gemv(w, x1, nw, 1e-5, o1, cfg=getattr(GEMV_PLAN, name))
                        for w in weights], args.replays)
        cfg, ms = best
        table.append([name, f"{n}x{k}", f"{cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w/{cfg.num_stages}s",
                      f"{ms:.3f}", f"{gb / ms:.2f}", f"{gb / cublas:.2f}", f"{gb / one:.2f}"])
    head = ["projection", "N x K", f"best config ({t} rows)", "ms", "TB/s", "cuBLAS mm TB/s", "decode GEMV TB/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv_rows.json").write_text(json.dumps({"model": args.model, "rows": t, "results": results,
                                                                   "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
