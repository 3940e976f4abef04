"""GPU probe: the prefill step (`FusedPrefill.run` as a CUDA graph) of an `--quantize fp8` model with its FP8
projections on the FP8 tensor cores (`fp8_scaled_mm_rows`: activations quantized per token, W8A8) against the
default path (the low-bit GEMM below 128 rows, the whole-dequantize + cuBLAS path above), and against the fp16
model, timed in alternating rounds in one process; with the logits' largest relative difference from the default.

    python -m bench.probes.fp8_prefill [--model llama-2-7b] [--tokens 16,64,100,128,500] [--from-rows 1,128]
"""

from __future__ import annotations

import argparse

import torch

from bench.probes.prefill_steps import dummy_models, prefill_rounds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset")
    ap.add_argument("--tokens", default="16,64,100,128,500", help="comma list of prompt lengths")
    ap.add_argument("--from-rows", default="1,128", help="comma list of fp8_scaled_mm_rows values to time")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the variants")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    models = dummy_models(args.model, [None, "fp8"], max(tokens))
    variants = [("fp16", None, None), ("fp8 default", "fp8", None)] + [
        (f"fp8 scaled_mm from {r} rows", "fp8", int(r)) for r in args.from_rows.split(",")]
    print(f"prefill step, dummy:{args.model}, on {torch.cuda.get_device_name()}, CUDA graph replays, median of "
          f"{args.rounds} alternating rounds")
    print("| tokens | variant | ms | vs fp8 default | logits max rel diff vs fp8 default |")
    print("|---|---|---|---|---|")
    for t in tokens:
        times, logits = prefill_rounds(models, t, [(q, {"fp8_scaled_mm_rows": rows}) for _, q, rows in variants],
                                       args.rounds)
        base = logits[1]
        for (name, _, _), ms, out in zip(variants, times, logits, strict=True):
            diff = float((out - base).abs().max() / base.abs().max())
            print(f"| {t} | {name} | {ms:.3f} | {ms / times[1]:.3f} | {diff:.2e} |", flush=True)

if __name__ == "__main__":
    main()
