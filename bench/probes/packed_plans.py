"""Probe: the batch-1 decode step (`FusedDecoder.step` as a CUDA graph) of a packed model under several split-K plans
(the int4 / int8 / FP8 block configs per projection, kernels/gemv_splitk.py and gemv_fp8.py), timed in alternating
rounds in one process.

    python -m bench.probes.packed_plans --quantize int4 [--model llama-2-7b] [--contexts 300,2000]
        [--plans "default;all=64x64x4;gate_up=128x32x4,down=64x64x4;all=f"] [--rounds 5]

A plan is `projection=BLOCK_NxBLOCK_KWxWARPS[r|f]` items joined by commas (r: the partials added by a second kernel,
`SplitKConfig.reduce_kernel`; f: by the last program's fixup; neither: f) or `projection=r|f` (the block config
kept, only how the partials are added changed), projection: qkv, o, gate_up, down, lm_head or all (`all`: the
split-K configs only, FP8's fp16-kernel projections stay), applied over the format's shipped plan
(`fused_decoder.INT4_PLAN` / `INT8_PLAN` / `FP8_PLAN`; for FP8 the block is BLOCK_NxBLOCK_KxWARPS); `default` is the
shipped plan itself. Why: the shipped int4 config (32 rows x 64 words on 4 warps, 128 weights a thread) spends ~4.5 SASS
instructions a weight, most of them the program's fixed work (the activation's digits, the layout conversion, the
cross-lane sums, the fixup), and the block sweeps never tried 256 or 512 weights a thread (bench/NOTES.md). Prints
the median of each plan's per-round medians, its ratio to the first, and the logits' largest difference from the
first (the plans change only the order of float32 sums).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.probes.step_variants import alternating_rounds
from bench.probes.verify_plan import graphed
from graph_executor.fused_decoder import FP8_PLAN, INT4_PLAN, INT8_PLAN, FusedDecoder
from graph_executor.kernels.gemv_fp8 import Fp8Config, Fp8Plan
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKPlan
from graph_executor.loading.loader import LoadConfig, load_model

PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")


def parse_plan(text: str, base: SplitKPlan | Fp8Plan) -> SplitKPlan | Fp8Plan:
    """'gate_up=64x64x4,down=128x32x4r' (or 'all=...', 'all=r', or 'default') over `base`."""
    if text == "default":
        return base
    changes: dict[str, SplitKConfig | Fp8Config] = {}
    for item in text.split(","):
        name, _, spec = item.partition("=")
        reduce_kernel = spec.endswith("r")
        parts = (spec[:-1] if spec[-1:] in ("r", "f") else spec).split("x")  # one optional suffix
        blocks = len(parts) == 3 and all(p.isdigit() for p in parts)
        if name not in (*PROJECTIONS, "all") or not (blocks or spec in ("r", "f")):
            raise SystemExit(f"bad plan item {item!r} in {text!r} (projection=BLOCK_NxBLOCK_KWxWARPS[r|f] or "
                             f"projection=r|f; projection: {', '.join(PROJECTIONS)} or all)")
        for target in PROJECTIONS if name == "all" else (name,):
            cfg = getattr(base, target)
            if not isinstance(cfg, (SplitKConfig, Fp8Config)):
                if name == "all":  # all: the split-K projections
                    continue
                raise SystemExit(f"{target} runs {type(cfg).__name__} in this format's plan, not a split-K kernel")
            size = {"block_n": int(parts[0]), "num_warps": int(parts[2]),
                    "block_kw" if isinstance(cfg, SplitKConfig) else "block_k": int(parts[1])} if blocks else {}
            changes[target] = dataclasses.replace(cfg, reduce_kernel=reduce_kernel, **size)
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset")
    ap.add_argument("--quantize", default="int4", choices=("int4", "int8", "fp8"), help="the packed format")
    ap.add_argument("--contexts", default="300,2000", help="comma list of decode positions")
    ap.add_argument("--plans", default="default;all=64x64x4;all=128x32x4", help="';'-separated plans (module doc)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the plans")
    ap.add_argument("--max-context", type=int, default=4096, help="the KV cache's positions")
    args = ap.parse_args(argv)
    base = {"int4": INT4_PLAN, "int8": INT8_PLAN, "fp8": FP8_PLAN}[args.quantize]
    plans = [(text, parse_plan(text, base)) for text in args.plans.split(";")]
    device = torch.device("cuda")
    loaded = load_model(LoadConfig(model=f"dummy:{args.model}", device="cuda", dtype="float16",
                                   max_context=args.max_context, progress=False, quantize=args.quantize))
    model = loaded.model
    print(f"batch-1 decode step, dummy:{args.model} {args.quantize}, on {torch.cuda.get_device_name()}, CUDA graph "
          f"replays, median of {args.rounds} alternating rounds")
    print("| context | plan | ms/step | vs first | logits max abs diff vs first |")
    print("|---|---|---|---|---|")
    token = torch.full((1,), 7, dtype=torch.int64, device=device)
    for context in (int(c) for c in args.contexts.split(",")):
        position = torch.full((1,), context, dtype=torch.int64, device=device)
        graphs, outs, decoders = [], [], []  # the decoders own the buffers their graphs write: keep them
        for _, plan in plans:
            decoder = FusedDecoder(model, **{args.quantize: plan})
            decoders.append(decoder)
            out = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
            graphs.append(graphed(lambda d=decoder, o=out: d.step(token, position, o)))
            outs.append(out)
        medians, logits = alternating_rounds(graphs, outs, args.rounds, device)
        for (text, _), ms, lg in zip(plans, medians, logits):
            diff = float((lg - logits[0]).abs().max())
            print(f"| {context} | {text} | {ms:.3f} | {ms / medians[0]:.3f} | {diff:.2e} |", flush=True)
        del graphs, decoders


if __name__ == "__main__":
    main()
