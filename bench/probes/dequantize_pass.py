"""GPU probe (issue 10's packed TTFT from 128 prompt rows): what the dequantizing pass costs and what hides it.

From `projections.DequantizeRows` rows up each packed projection of the prefill is dequantized whole (codes in,
2 bytes a weight out) and multiplied by cuBLAS; at 500 tokens on LLaMA-2-7B that pass is most of the int4 prefill's
~5 ms over fp16's. Two questions, one process:

1. `--configs`: the pass alone per projection slot, all layers of that slot in one CUDA graph, per block config
   (rows x columns a program, warps): ms and TB/s of the bytes it moves (packed weight in + dense weight out).
2. `--tokens`: whole prefill steps (`FusedPrefill.run` as CUDA graphs, alternating rounds) of the fp16 model and of
   each packed format with the passes on the step's stream (ahead 0) or on a second stream ahead of the GEMMs
   (`dequantize_ahead.py`, ahead = buffers), with the logits' largest difference from ahead 0 (expected: 0).

    python -m bench.probes.dequantize_pass [--model llama-2-7b] [--quantize int4,int8] [--tokens 128,256,512]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.floors import time_gpu
from bench.probes.prefill_steps import dummy_models, prefill_rounds
from bench.probes.verify_plan import graphed
from graph_executor.kernels import gemm_lowbit
from graph_executor.kernels.projections import DequantizeRows

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
    ap.add_argument("--configs", default=CONFIGS, help="comma list of ROWSxCOLSxWARPS for part 1; '' skips it")
    ap.add_argument("--tokens", default="128,256,512", help="comma list of prompt lengths for part 2; '' skips it")
    ap.add_argument("--ahead", default="0,2,3", help="comma list of dequantize_ahead values for part 2")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (alternating in part 2)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("dequantize_pass: needs a CUDA GPU; none is visible")
    formats = args.quantize.split(",")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    models = dummy_models(args.model, [None, *formats] if tokens else formats, max(tokens, default=16))
    print(f"dummy:{args.model} on {torch.cuda.get_device_name()}")
    if args.configs:
        pass_table(models, formats, [parse_config(c) for c in args.configs.split(",")], args.rounds)
    if not tokens:
        return
    aheads = [int(a) for a in args.ahead.split(",")]
    always = DequantizeRows(1, 1, 1)  # every packed projection dequantized, whatever the length
    variants = [("fp16", None, {})] + [(f"{q} ahead {a}", q, {"dequantize_ahead": a, "dequantize_rows": always})
                                       for q in formats for a in aheads]
    print(f"\nprefill step, CUDA graph replays, median of {args.rounds} alternating rounds; every packed projection "
          "dequantized for cuBLAS")
    print("| tokens | variant | ms | vs fp16 | logits max abs diff vs the format's first |")
    print("|---|---|---|---|---|")
    for t in tokens:
        times, logits = prefill_rounds(models, t, [(q, o) for _, q, o in variants], args.rounds)
        base = {}
        for (name, q, _), ms, out in zip(variants, times, logits, strict=True):
            ref = base.setdefault(q, out)
            print(f"| {t} | {name} | {ms:.3f} | {ms / times[0]:.3f} | {float((out - ref).abs().max()):.2e} |",
                  flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
