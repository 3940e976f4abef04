"""Probe: the prefill step (`FusedPrefill.run` from position 0, as a CUDA graph) at prompt buckets of 16..128 rows with
cuBLAS against the multi-row GEMVs of a short-prompt plan (kernels/prefill_plan.py): the production default and,
with --plan, the winners of `bench.probes.gemv_rows --plan-out`. Timed in alternating rounds in one process; the
logits of each variant against cuBLAS's.

    python -m bench.probes.prefill_rows [--models llama-2-7b] [--buckets 16,32,64,128] [--plan FILE] [--rounds 5]

Each plan with rows also runs as `<name>+pdl`: its kernels launched with programmatic dependent launch; with --reduce
each also as `<name>+reduce` (the split calls' partials added by a second kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.probes.step_variants import alternating_rounds
from bench.probes.verify_plan import graphed
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.kernels import prefill_plan
from graph_executor.kernels.gemv_rows import RowsConfig
from graph_executor.kernels.prefill_plan import ShortPromptConfigs, ShortPromptPlan, with_pdl
from graph_executor.loading.loader import LoadConfig, load_model


def load_plan(path: str) -> ShortPromptPlan:
    """A `gemv_rows --plan-out` file: {"16": {"qkv": {RowsConfig fields}, ...}, ...}."""
    raw = json.loads(Path(path).read_text())
    return ShortPromptPlan(tuple(sorted(
        (int(rows), ShortPromptConfigs(**{name: RowsConfig(**cfg) for name, cfg in configs.items()}))
        for rows, configs in raw.items())))


def with_reduce_kernel(plan: ShortPromptPlan) -> ShortPromptPlan:
    """The plan with every config's split partials added by a second kernel (`RowsConfig.reduce_kernel`)."""
    return ShortPromptPlan(tuple((rows, ShortPromptConfigs(*(dataclasses.replace(c, reduce_kernel=True)
                                                             for c in configs.all())))
                                 for rows, configs in plan.by_rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b", help="comma list of dummy presets")
    ap.add_argument("--buckets", default="16,32,64,128", help="comma list of prompt rows (the prefill buckets)")
    ap.add_argument("--plan", default=None, help="a gemv_rows --plan-out file: a third variant")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the variants")
    ap.add_argument("--reduce", action="store_true", help="also each plan with rows as `<name>+reduce`: split calls' "
                    "partials added by a second kernel (RowsConfig.reduce_kernel)")
    args = ap.parse_args(argv)
    buckets = [int(b) for b in args.buckets.split(",")]
    device = torch.device("cuda")
    print(f"prefill step on {torch.cuda.get_device_name()}, CUDA graph replays, median of {args.rounds} alternating "
          "rounds")
    print("| model | rows | variant | ms/step | vs cuBLAS | logits max rel diff vs cuBLAS |")
    print("|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        model = load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16",
                                      max_context=max(buckets) + 64, progress=False)).model
        variants = [("cublas", prefill_plan.CUBLAS_ONLY),
                    ("default", prefill_plan.plan_for(model.config.hidden_size))]
        if args.plan:
            variants.append(("swept", load_plan(args.plan)))
        # the same configs launched with programmatic dependent launch (the RoPE kernel too: kernels/pdl.py)
        variants += [(f"{name}+pdl", with_pdl(plan)) for name, plan in variants[1:]]
        if args.reduce:
            variants += [(f"{name}+reduce", with_reduce_kernel(plan)) for name, plan in variants[1:]]
        steps = [FusedPrefill(model, max(buckets), short_plan=plan) for _, plan in variants]
        gen = torch.Generator(device="cpu").manual_seed(0)
        for t in buckets:
            ids = torch.randint(0, model.config.vocab_size, (t,), generator=gen).to(device)
            positions = torch.arange(t, device=device)
            last = torch.tensor([t - 1], device=device)
            outs = [torch.empty(model.config.vocab_size, dtype=torch.float32, device=device) for _ in variants]
            graphs = [graphed(lambda s=s, o=o: s.run(ids, positions, last, o)) for s, o in zip(steps, outs)]
            medians, logits = alternating_rounds(graphs, outs, args.rounds, device)
            first = medians[0]
            scale = float(logits[0].abs().max())
            for (name, plan), ms, lg in zip(variants, medians, logits):
                taken = "rows" if plan.configs(t) is not None else "cuBLAS"
                print(f"| {preset} | {t} | {name} ({taken}) | {ms:.3f} | {ms / first:.3f} | "
                      f"{float((lg - logits[0]).abs().max()) / scale:.2e} |", flush=True)
            del graphs
        del steps, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
