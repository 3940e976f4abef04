"""Probe: what a prefill graph's bucket padding costs, LLaMA-2-7B fp16 at 100-500 prompt tokens.

Why (issue 12): a prompt runs in the prefill graph of the smallest bucket that holds it (`graphs.DEFAULT_BUCKETS`:
16, then every 32 up to 512), so a 200-token prompt computes 224 rows (12% more GEMM work, where the GEMMs are
~600 TFLOP/s compute-bound) and a 100-token one 128. Here each length's prefill graph at its default bucket
against one captured for exactly that many rows, in alternating rounds in one process (CUDA events).

    python -m bench.probes.prefill_buckets [--tokens 100,200,300,400,500] [--rounds 5]
    python -m bench.probes.prefill_buckets --curve 96,104,...   (a graph for each row count: time against rows)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from graph_executor.graphs import DEFAULT_BUCKETS, GraphRunner, median_event_ms
from graph_executor.loading.loader import LoadConfig, load_model


def graph_ms(runner: GraphRunner, tokens: int, reps: int = 10) -> float:
    return median_event_ms(lambda: runner.prefill(tokens), reps)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--tokens", default="100,200,300,400,500")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--curve", default=None, help="comma-separated row counts: one graph each, timed in rounds")
    args = ap.parse_args(argv)
    if args.curve:
        return curve([int(v) for v in args.curve.split(",")], args.model, args.rounds)
    lengths = [int(v) for v in args.tokens.split(",")]
    model = load_model(LoadConfig(model=args.model, device="cuda", dtype="float16", max_context=600,
                                  progress=False)).model
    padded = GraphRunner(model)
    exact = GraphRunner(model, buffers=padded.buffers, buckets=tuple(sorted(set(DEFAULT_BUCKETS) | set(lengths))),
                        decoder=padded.decoder)
    padded.buffers.input_ids.random_(0, model.config.vocab_size)
    for runner in (padded, exact):
        for n in lengths:
            runner.prefill(n)  # demand for its bucket
        while runner.capture_next() is not None:
            pass
    times = {(n, kind): [] for n in lengths for kind in ("padded", "exact")}
    for _ in range(args.rounds):
        for n in lengths:
            times[(n, "padded")].append(graph_ms(padded, n))
            times[(n, "exact")].append(graph_ms(exact, n))
    print(f"{torch.cuda.get_device_name()}: {args.model} fp16 prefill graphs, median of {args.rounds} rounds x 10 "
          "replays")
    print("| tokens | bucket | padded ms | exact ms | exact / padded |")
    print("|---|---|---|---|---|")
    for n in lengths:
        bucket = next(b for b in padded.buckets if b >= n)
        p, e = statistics.median(times[(n, "padded")]), statistics.median(times[(n, "exact")])
        print(f"| {n} | {bucket} | {p:.3f} | {e:.3f} | {e / p:.3f} |")


def curve(rows: list[int], model_name: str, rounds: int) -> None:
    """A prefill graph for each row count, timed in alternating rounds: the step time against the rows it computes."""
    model = load_model(LoadConfig(model=model_name, device="cuda", dtype="float16", max_context=max(rows) + 64,
                                  progress=False)).model
    runner = GraphRunner(model, buckets=tuple(sorted(set(rows))))
    runner.buffers.input_ids.random_(0, model.config.vocab_size)
    for n in rows:
        runner.prefill(n)
    while runner.capture_next() is not None:
        pass
    times = {n: [] for n in rows}
    for _ in range(rounds):
        for n in rows:
            times[n].append(graph_ms(runner, n))
    print(f"{torch.cuda.get_device_name()}: {model_name} fp16 prefill graph of exactly n rows, median of {rounds} "
          "rounds x 10 replays")
    print("| rows | ms | us a row |")
    print("|---|---|---|")
    for n in rows:
        ms = statistics.median(times[n])
        print(f"| {n} | {ms:.3f} | {ms / n * 1e3:.2f} |")


if __name__ == "__main__":
    main()
