"""GPU probe: from how many prompt rows should each packed format's prefill projections leave the low-bit GEMM for
dequantize + cuBLAS (`projections.DequantizeRows`)? The whole prefill step (`FusedPrefill.run` as a CUDA graph) of a
`--quantize` model with every projection on the low-bit GEMM against every projection dequantized (and, for the
fp8 format, whose down_proj is int8, its FP8 projections on the GEMM with down_proj dequantized), next to the fp16
model, timed in alternating rounds in one process; with the logits' largest relative difference between the two
paths of each format (the same weights: only rounding differs).

    python -m bench.probes.dequantize_rows [--model llama-2-7b] [--quantize int4,int8,fp8] [--tokens 128,256,512]
"""

from __future__ import annotations

import argparse

import torch

from bench.probes.prefill_steps import dummy_models, prefill_rounds
from graph_executor.kernels.projections import DEQUANTIZE_ROWS, DequantizeRows

NEVER = 1 << 30  # a threshold no prompt reaches


def variants_for(quantize: str) -> list[tuple[str, DequantizeRows]]:
    gemm, dequant = DequantizeRows(NEVER, NEVER, NEVER), DequantizeRows(1, 1, 1)
    out = [(f"{quantize} low-bit GEMM", gemm), (f"{quantize} dequantize + cuBLAS", dequant)]
    if quantize == "fp8":  # its down_proj is int8
        out.append(("fp8 GEMM, int8 down_proj dequantized", DequantizeRows(1, 1, NEVER)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset")
    ap.add_argument("--quantize", default="int4,int8,fp8", help="comma list of packed formats")
    ap.add_argument("--tokens", default="128,192,256,384,512", help="comma list of prompt lengths")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the variants")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("dequantize_rows: needs a CUDA GPU; none is visible")
    tokens = [int(t) for t in args.tokens.split(",")]
    formats = args.quantize.split(",")
    models = dummy_models(args.model, [None, *formats], max(tokens))
    variants = [("fp16", None, DEQUANTIZE_ROWS)] + [(name, q, rows) for q in formats for name, rows in variants_for(q)]
    print(f"prefill step, dummy:{args.model}, on {torch.cuda.get_device_name()}, CUDA graph replays, median of "
          f"{args.rounds} alternating rounds")
    print("| tokens | variant | ms | vs fp16 | logits max rel diff vs the format's low-bit GEMM |")
    print("|---|---|---|---|---|")
    for t in tokens:
        times, logits = prefill_rounds(models, t, [(q, {"dequantize_rows": rows}) for _, q, rows in variants],
                                       args.rounds)
        base = {}
        for (name, quantize, _), ms, out in zip(variants, times, logits, strict=True):
            ref = base.setdefault(quantize, out)  # the format's first variant: its low-bit GEMM
            diff = float((out - ref).abs().max() / ref.abs().max())
            print(f"| {t} | {name} | {ms:.3f} | {ms / times[0]:.3f} | {diff:.2e} |", flush=True)
        torch.cuda.empty_cache()  # the last length's graphs and steps are gone: give their memory back


if __name__ == "__main__":
    main()
