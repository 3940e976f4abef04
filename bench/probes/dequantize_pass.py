"""GPU probe (issue 10's packed TTFT from 128 prompt rows): the dequantizing pass alone, per block config.

From `projections.DequantizeRows` rows up each packed projection of the prefill is dequantized whole (codes in, 2
bytes a weight out) and multiplied by cuBLAS; at 500 tokens on LLaMA-2-7B that pass is most of the int4 prefill's
~4 ms over fp16's. Per projection slot, all layers of that slot in one CUDA graph, per block config (rows x columns
a program, warps): ms and TB/s of the bytes it moves (packed weight in + dense weight out). (The thirty-second
session also ran the passes on a second stream ahead of the GEMMs, whole 7B prefill steps: no gain; commit 1a9998d
holds that part.)

    python -m bench.probes.dequantize_pass [--model llama-2-7b] [--quantize int4,int8] [--configs 16x256x4,...]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.floors import time_gpu
from bench.probes.prefill_steps import dummy_models
from bench.probes.verify_plan import graphed
from graph_executor.kernels import gemm_lowbit

SLOTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
CONFIGS = "16x256x4,8x512x4,16x512x4,16x512x8,32x256x4,32x256x8,32x512x8,64x256x8,64x512x8,8x1024x4,8x1024x8"


def parse_config(text: str) -> tuple[int, int, int]:
    r, k, w = (int(v) for v in text.split("x"))
    return r, k, w


def pass_table(models: dict, formats: list[str], configs: list[tuple[int, int, int]], rounds: int) -> None:
    print("| format | slot | shape | config (rows x cols x warps) | ms, all layers | TB/s |")
    print("|---|---|---|---|---|---|")
    for q in formats:
        layers = models[q].layers
        for slot in SLOTS:
            weights = [getattr(layer, slot) for layer in layers]
            w0 = weights[0]
            out = torch.empty(w0.shape, dtype=torch.float16, device="cuda")
            moved = sum(w.nbytes for w in weights) + out.numel() * 2 * len(weights)
            rows = []
            for r, k, nw in configs:
                graph = graphed(lambda r=r, k=k, nw=nw: [gemm_lowbit.dequantize(w, out, r, k, nw) for w in weights])
                ms = statistics.median(time_gpu(graph.replay, torch.device("cuda")) * 1e3 for _ in range(rounds))
                rows.append((ms, f"{r}x{k}x{nw}"))
                del graph
            best = min(rows)[0]
            for ms, name in rows:
                mark = " **best**" if ms == best else ""
                print(f"| {q} | {slot} | {tuple(w0.shape)} | {name}{mark} | {ms:.3f} | {moved / ms / 1e9:.2f} |",
                      flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset")
    ap.add_argument("--quantize", default="int4,int8", help="comma list of packed formats")
    ap.add_argument("--configs", default=CONFIGS, help="comma list of ROWSxCOLSxWARPS")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per config (median)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("dequantize_pass: needs a CUDA GPU; none is visible")
    formats = args.quantize.split(",")
    models = dummy_models(args.model, formats, 16)
    print(f"dummy:{args.model} on {torch.cuda.get_device_name()}")
    pass_table(models, formats, [parse_config(c) for c in args.configs.split(",")], args.rounds)


if __name__ == "__main__":
    main()
