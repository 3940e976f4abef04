"""Probe (issue 10): how much of the packed decode GEMVs' time is forming the activation's dp4a operands. The split-K
GEMVs (graph_executor/kernels/gemv_splitk.py) have every program quantize its K slice of the activation to two int8
digits (and its group maxima and sums): N / BLOCK_N row blocks do that work again for the same slice, about as many
instructions as the dp4a loop itself at 32 rows a block. `digits=` (ActDigits) forms them once in a kernel of their
own and the GEMV loads them. Per LLaMA-2-7B projection, int4 (groups of 32, with offsets, as Q4_1) and int8, 32
layers' weights in one CUDA graph per variant (no L2 reuse), PDL on as in the decode step: each config both ways,
and the bytes the format reads per second.

    python -m bench.probes.int4_digits [--layers 32] [--formats int4,int8] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.probes.gemv_rows import graph_ms
from graph_executor.fused_decoder import INT4_PLAN, INT8_PLAN
from graph_executor.kernels import gemv_splitk
from graph_executor.kernels.gemv_splitk import ActDigits, SplitKConfig, SplitKScratch
from graph_executor.quant.formats import quantize_int4, quantize_int8

H, I = 4096, 11008  # LLaMA-2-7B
SHAPES = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
SWEEP = [SplitKConfig(n, kw, warps) for n, kw, warps in
         ((32, 64, 4), (64, 64, 4), (64, 64, 8), (128, 64, 8), (32, 128, 4), (64, 128, 8), (128, 32, 4), (64, 32, 4))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--out", default=None, help="write every timing here as JSON")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    results, table = [], []
    print(f"{torch.cuda.get_device_name()}: ms for {args.layers} layers' weights of each projection, TB/s of the "
          "format's bytes; plain = each program forms its activation slice, digits = ActDigits first")
    for fmt in args.formats.split(","):
        plan = INT4_PLAN if fmt == "int4" else INT8_PLAN
        for name, (n, k) in SHAPES.items():
            dense = [torch.randn(n, k, device=device, dtype=torch.float16) * 0.02 for _ in range(args.layers)]
            weights = [quantize_int4(d, 32) if fmt == "int4" else quantize_int8(d, 32) for d in dense]
            del dense
            gb = sum(w.nbytes for w in weights) / 1e9
            width = 2 * k if name == "down" else k
            a = torch.randn(width, device=device, dtype=torch.float16)
            nw = torch.ones(k, device=device, dtype=torch.float16)
            out = torch.zeros(n, device=device, dtype=torch.float16)
            best = {}
            for cfg in [getattr(plan, name)] + SWEEP:
                cfg = dataclasses.replace(cfg, pdl=True)
                if cfg.block_kw % (32 // (8 if fmt == "int4" else 4)):
                    continue
                scratch = SplitKScratch.allocate([weights[0]], [cfg], device)
                digits = ActDigits.allocate(weights[0], cfg)
                for variant in ("plain", "digits"):
                    d = digits if variant == "digits" else None

                    def call(w, cfg=cfg, d=d, scratch=scratch):
                        if name in ("qkv", "gate_up"):
                            return lambda: gemv_splitk.rmsnorm_gemv(w, a, nw, 1e-5, out, scratch, cfg=cfg, digits=d)
                        if name == "o":
                            return lambda: gemv_splitk.gemv_residual(w, a, out, scratch, cfg, digits=d)
                        return lambda: gemv_splitk.silu_gemv_residual(w, a, out, scratch, cfg, digits=d)

                    try:
                        ms = graph_ms([call(w) for w in weights], 30)
                    except Exception as e:  # a config the card cannot run (registers, shared memory)
                        print(f"  {fmt} {name:8s} {cfg.block_n}x{cfg.block_kw}/{cfg.num_warps}w {variant}: "
                              f"{type(e).__name__}: {str(e)[:100]}", flush=True)
                        continue
                    results.append({"format": fmt, "proj": name, "cfg": dataclasses.asdict(cfg), "variant": variant,
                                    "ms": ms, "tb_s": gb / ms})
                    print(f"  {fmt} {name:8s} {cfg.block_n}x{cfg.block_kw}/{cfg.num_warps}w {variant:6s} {ms:.3f} ms "
                          f"{gb / ms:.2f} TB/s", flush=True)
                    if variant not in best or ms < best[variant][1]:
                        best[variant] = (cfg, ms)
            shipped = next(r["ms"] for r in results if r["format"] == fmt and r["proj"] == name
                           and r["variant"] == "plain")
            row = [fmt, name, f"{shipped:.3f} ({gb / shipped:.2f})"]
            for variant in ("plain", "digits"):
                cfg, ms = best[variant]
                row.append(f"{cfg.block_n}x{cfg.block_kw}/{cfg.num_warps}w {ms:.3f} ({gb / ms:.2f})")
            row.append(f"{best['digits'][1] / best['plain'][1]:.3f}")
            table.append(row)
    head = ["format", "projection", "shipped config ms (TB/s)", "best plain", "best digits", "digits / plain"]
    print("\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                    ["| " + " | ".join(r) + " |" for r in table]))
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
