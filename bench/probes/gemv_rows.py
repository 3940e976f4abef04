"""Probe: the multi-row GEMVs (graph_executor/kernels/gemv_rows.py: the verify step's, and the prefill step's for
short prompts) per projection against what they replace (cuBLAS through torch.mm / addmm_ at the same rows, plus
the RMSNorm or SwiGLU row kernel the fused version saves) and against the decode step's one-row GEMV (kernels/gemv.py
with the decoder's plan: the rate a step that reads each weight once can reach).

Each projection runs over `--layers` layers' worth of distinct weights in one CUDA graph (no L2 reuse), timed by
CUDA events (median of replays); TB/s counts the weight bytes. Prints one line per config and a table with each
projection's best config per row count, and writes a JSON under --out; `--plan-out FILE` writes the winners as a
short-prompt plan (kernels/prefill_plan.py) that bench.probes.prefill_rows can load.

    python -m bench.probes.gemv_rows [--model llama-2-7b|smollm2-135m] [--rows 5 | --rows 16,32,64]
        [--splits 1,2,4,8] [--out DIR] [--plan-out FILE]
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
    scratch_size,
    silu_gemv_residual_rows,
)
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.kernels.rows import rmsnorm_rows, silu_mul_rows
from graph_executor.loading.presets import preset

SWEEP = [RowsConfig(n, k, 4, 3) for n, k in itertools.product((16, 32, 64), (64, 128, 256))] + [
    RowsConfig(32, 128, 8, 3), RowsConfig(16, 256, 4, 4)]
# the short-prompt sweep (16+ rows: the tensor cores' tiles grow with the rows): blocks and stages, each at every
# --splits value (a runtime argument: no recompile)
PREFILL_SWEEP = [RowsConfig(n, k, w, st) for n, k, w, st in itertools.product((32, 64, 128), (64, 128), (4,), (3, 4))
                 ] + [RowsConfig(64, 64, 8, 4), RowsConfig(128, 64, 8, 3)]
PROJECTIONS = ("qkv", "o", "gate_up", "down")


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


def sweep(name: str, n: int, k: int, t: int, configs: list[RowsConfig], layers: int, replays: int,
          results: list) -> tuple[list[str], RowsConfig]:
    """Every config on one projection at t rows; the table row and the best config."""
    device, dtype = torch.device("cuda"), torch.float16
    layers = 4 if name == "lm_head" else layers
    weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(layers)]
    gb = layers * n * k * 2 / 1e9
    width = 2 * k if name == "down" else k
    a = torch.randn(t, width, device=device, dtype=dtype)
    nw = torch.ones(k, device=device, dtype=dtype)
    out = torch.zeros(t, n, device=device, dtype=torch.float32 if name == "lm_head" else dtype)
    scratch = SplitKScratch.zeros(*max(scratch_size(t, n, k, c) for c in configs), device)

    def rows_call(w, cfg):
        if name in ("qkv", "gate_up", "lm_head"):
            return lambda: rmsnorm_gemv_rows(w, a, nw, 1e-5, out, cfg=cfg, scratch=scratch)
        if name == "o":
            return lambda: gemv_residual_rows(w, a, out, cfg=cfg, scratch=scratch)
        return lambda: silu_gemv_residual_rows(w, a, out, cfg=cfg, scratch=scratch)

    best = None
    for cfg in configs:
        try:
            ms = graph_ms([rows_call(w, cfg) for w in weights], replays)
        except Exception as e:  # e.g. Triton's OutOfResources: a tile too large for shared memory
            print(f"  {name:8s} {t:3d} rows {label(cfg)} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
            torch.cuda.synchronize()
            continue
        results.append({"proj": name, "rows": t, "cfg": dataclasses.asdict(cfg), "ms": ms, "tb_s": gb / ms})
        print(f"  {name:8s} {t:3d} rows {label(cfg)} {ms:.3f} ms {gb / ms:.2f} TB/s", flush=True)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    h = torch.randn(t, k, device=device, dtype=dtype)
    dense_out = torch.zeros(t, n, device=device, dtype=dtype)
    cublas = graph_ms([lambda w=w: torch.mm(h, w.t(), out=dense_out) for w in weights], replays)
    # what the fused kernel saves besides the GEMM: the prefill step's RMSNorm (qkv, gate_up) or SwiGLU (down) rows
    act = torch.empty(t, k, device=device, dtype=dtype)
    side = {"qkv": lambda: rmsnorm_rows(h, nw, 1e-5, act), "gate_up": lambda: rmsnorm_rows(h, nw, 1e-5, act),
            "down": lambda: silu_mul_rows(a, act)}.get(name)
    with_side = graph_ms([c for w in weights for c in ((side,) if side else ()) + (
        lambda w=w: torch.mm(h, w.t(), out=dense_out),)], replays)
    x1, o1 = torch.randn(k, device=device, dtype=dtype), torch.zeros(n, device=device, dtype=torch.float32)
    one = graph_ms([lambda w=w: gemv.rmsnorm_gemv(w, x1, nw, 1e-5, o1, cfg=getattr(GEMV_PLAN, name))
                    for w in weights], replays)
    cfg, ms = best
    row = [name, str(t), f"{n}x{k}", label(cfg), f"{ms:.3f}", f"{gb / ms:.2f}", f"{cublas:.3f}", f"{gb / cublas:.2f}",
           f"{with_side:.3f}", f"{with_side / ms:.2f}", f"{gb / one:.2f}"]
    return row, cfg


def label(cfg: RowsConfig) -> str:
    return f"{cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w/{cfg.num_stages}s/split{cfg.split}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset whose shapes to use")
    ap.add_argument("--rows", default="5", help="token rows: one count (k + 1 of a verify step, the verify sweep "
                                                "over every projection and the lm_head) or a comma list of prompt "
                                                "rows (the short-prompt sweep over qkv, o, gate_up, down)")
    ap.add_argument("--splits", default="1,2,4,8", help="K splits each short-prompt config is timed at")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plan-out", default=None, help="write the short-prompt winners here as JSON")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    results, table, winners = [], [], {}
    prompt = len(rows) > 1 or rows[0] >= 16
    for t in rows:
        for name, (n, k) in shapes(args.model).items():
            if prompt and name not in PROJECTIONS:
                continue
            if prompt:
                configs = [dataclasses.replace(c, split=sp) for c in PREFILL_SWEEP
                           for sp in map(int, args.splits.split(","))]
            else:
                planned = getattr(DEFAULT_ROWS_PLAN, name, None)  # the verify step's config, where it takes this kernel
                configs = [*([planned] if planned else []), *SWEEP]
            row, cfg = sweep(name, n, k, t, configs, args.layers, args.replays, results)
            table.append(row)
            winners.setdefault(t, {})[name] = dataclasses.asdict(cfg)
    head = ["projection", "rows", "N x K", "best config", "ms", "TB/s", "cuBLAS mm ms", "cuBLAS TB/s",
            "mm + row kernel ms", "(mm + row) / best", "decode GEMV TB/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in table]
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv_rows.json").write_text(json.dumps({"model": args.model, "rows": rows,
                                                                   "results": results, "table": table}, indent=1))
    if args.plan_out:
        Path(args.plan_out).write_text(json.dumps({str(t): w for t, w in winners.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
