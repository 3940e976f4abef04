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

from bench.probes.step_variants import alternating_rounds
from bench.probes.verify_plan import graphed
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.kernels.projections import DequantizeRows
from graph_executor.loading.loader import LoadConfig, load_model

NEVER = 1 << 30  # a threshold no prompt reaches


def variants_for(quantize: str, t: int) -> list[tuple[str, DequantizeRows]]:
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
    device = torch.device("cuda")
    tokens = [int(t) for t in args.tokens.split(",")]
    formats = args.quantize.split(",")
    models = {q: load_model(LoadConfig(model=f"dummy:{args.model}", device="cuda", dtype="float16",
                                       max_context=max(tokens) + 16, progress=False, quantize=q)).model
              for q in (None, *formats)}
    print(f"prefill step, dummy:{args.model}, on {torch.cuda.get_device_name()}, CUDA graph replays, median of "
          f"{args.rounds} alternating rounds")
    print("| tokens | variant | ms | vs fp16 | logits max rel diff vs the format's low-bit GEMM |")
    print("|---|---|---|---|---|")
    for t in tokens:
        ids = torch.randint(0, models[None].config.vocab_size, (t,), device=device)
        positions = torch.arange(t, device=device)
        index = torch.tensor([t - 1], device=device)
        variants = [("fp16", None, DequantizeRows())] + [(name, q, rows) for q in formats
                                                          for name, rows in variants_for(q, t)]
        graphs, outs, steps = [], [], []  # the steps own the buffers their graphs read and write: keep them
        for _, quantize, rows in variants:
            step = FusedPrefill(models[quantize], t, dequantize_rows=rows)
            out = torch.empty(models[quantize].config.vocab_size, dtype=torch.float32, device=device)
            graphs.append(graphed(lambda s=step, o=out: s.run(ids, positions, index, o)))
            outs.append(out)
            steps.append(step)
        times, logits = alternating_rounds(graphs, outs, args.rounds, device)
        base = {}
        for (name, quantize, _), ms, out in zip(variants, times, logits, strict=True):
            ref = base.setdefault(quantize, out)  # the format's first variant: its low-bit GEMM
            diff = float((out - ref).abs().max() / ref.abs().max())
            print(f"| {t} | {name} | {ms:.3f} | {ms / times[0]:.3f} | {diff:.2e} |", flush=True)
        del graphs, outs, steps
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
