"""Probe: a prefill's latency from an idle card, its CUDA graph launched whole against the same step cut into
pieces by layers (`FusedPrefill.run(part=)`), each piece its own graph, launched in order (issue 12's TTFT: the
executor's `cudaGraphLaunch` of a ~300-node prefill graph takes ~0.1 ms of host time; if the card starts only once
that launch is submitted, a small first piece lets it start ~0.1 ms sooner while the host submits the rest).

Per model, prompt length and cut: the median over rounds of (host time of the launches) and (host time from the
first launch to the end of a synchronize), with the card idle for 2 ms before each; and whether the logits equal
the whole graph's bit for bit.

    python -m bench.probes.graph_pieces [--models smollm2-135m,llama-2-7b] [--tokens 10,100] [--rounds 30]
        [--cuts "whole;1;2,8;1,4,12"]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from graph_executor.fused_prefill import FusedPrefill
from graph_executor.loading.loader import LoadConfig, load_model


def parts(cuts: list[int], layers: int) -> list[tuple[int, int]]:
    """Layer ranges [(0, c0), (c0, c1), ..., (c_last, layers)] for the cut points (each in 1..layers - 1, rising)."""
    if any(not 0 < c < layers for c in cuts) or cuts != sorted(set(cuts)):
        raise ValueError(f"cuts {cuts}: rising layer indices in 1..{layers - 1}")
    edges = [0, *cuts, layers]
    return list(zip(edges[:-1], edges[1:]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-2-7b", help="dummy presets")
    ap.add_argument("--tokens", default="10,100", help="prompt lengths")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cuts", default="whole;1;2,8;1,4,12", help="';'-separated variants: 'whole', or the layer "
                    "indices where a new piece starts")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    print(f"prefill from an idle card on {torch.cuda.get_device_name()}, median of {args.rounds} rounds (alternating)")
    print("| model | tokens | pieces (first layers) | launch host ms | launch to done ms | vs whole | logits equal |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        loaded = load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16", max_context=1024,
                                       progress=False))
        model = loaded.model
        layers = len(model.layers)
        for t in (int(v) for v in args.tokens.split(",")):
            prefill = FusedPrefill(model, t)
            ids = torch.randint(0, model.config.vocab_size, (t,), device=device)
            positions = torch.arange(t, device=device)
            index = torch.tensor([t - 1], device=device)
            logits = torch.empty(model.config.vocab_size, device=device)
            variants = {}
            for spec in args.cuts.split(";"):
                ranges = [(0, layers)] if spec == "whole" else parts([int(c) for c in spec.split(",")], layers)
                graphs = []
                for part in ranges:
                    prefill.run(ids, positions, index, logits, part=part)  # warm-up (compiles) outside the capture
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        prefill.run(ids, positions, index, logits, part=part)
                    graphs.append(g)
                name = "whole" if spec == "whole" else "+".join(str(b - a) for a, b in ranges)
                while name in variants:  # a variant given twice (a drift check) keeps both
                    name += "'"
                variants[name] = graphs
            times = {name: ([], []) for name in variants}
            outs = {}
            for _ in range(args.rounds):
                for name, graphs in variants.items():
                    torch.cuda.synchronize()
                    time.sleep(0.002)
                    start = time.perf_counter()
                    for g in graphs:
                        g.replay()
                    launched = time.perf_counter()
                    torch.cuda.synchronize()
                    done = time.perf_counter()
                    times[name][0].append((launched - start) * 1e3)
                    times[name][1].append((done - start) * 1e3)
                    outs[name] = logits.clone()
            whole = statistics.median(times["whole"][1]) if "whole" in times else None
            for name, (launch, total) in times.items():
                ms = statistics.median(total)
                ratio = f"{ms / whole:.3f}" if whole else "-"
                same = torch.equal(outs[name], outs["whole"]) if "whole" in outs else "-"
                print(f"| {preset} | {t} | {name} | {statistics.median(launch):.3f} | {ms:.3f} | {ratio} | {same} |",
                      flush=True)
            del variants, prefill
        del model, loaded
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
