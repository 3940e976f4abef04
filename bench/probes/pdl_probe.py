"""Probe: the decode step with and without programmatic dependent launch (kernels/pdl.py), as CUDA graph
replays of the executor's own body (`FusedDecoder.step`) per model shape, side by side in one run; the logits of
the two must be bit-identical (the same kernels in the same order).

    python -m bench.probes.pdl_probe [--models llama-2-7b,smollm2-135m,llama-3.2-1b,llama-2-7b:int4] [--context 512]

A model `<preset>:<format>` is quantized at load (`--quantize int4|int8|fp8`).
"""

from __future__ import annotations

import argparse

import torch

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.loading.loader import LoadConfig, load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,smollm2-135m,llama-3.2-1b", help="comma list of dummy presets")
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args(argv)
    print(f"decode step at context {args.context} on {torch.cuda.get_device_name()}, CUDA graph replays")
    print("| model | without PDL ms | with PDL ms | with / without | logits identical |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        preset, _, quantize = name.partition(":")
        loaded = load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16",
                                       max_context=args.context + 16, progress=False, quantize=quantize or None))
        model, device = loaded.model, torch.device("cuda")
        token = torch.full((1,), 7, dtype=torch.int64, device=device)
        position = torch.full((1,), args.context, dtype=torch.int64, device=device)
        ms, logits = {}, {}
        for pdl in (False, True):
            decoder = FusedDecoder(model, pdl=pdl)
            out = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
            graph = graphed(lambda: decoder.step(token, position, out))  # noqa: B023 - replayed right here
            ms[pdl] = time_gpu(graph.replay, device) * 1e3
            graph.replay()
            torch.cuda.synchronize()
            logits[pdl] = out.clone()
        same = bool(torch.equal(logits[False], logits[True]))
        print(f"| {name} | {ms[False]:.3f} | {ms[True]:.3f} | {ms[True] / ms[False]:.3f} | {same} |", flush=True)
        del model, loaded
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
