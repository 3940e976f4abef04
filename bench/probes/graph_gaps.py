"""How much of a captured decode step is kernels and how much the boundaries between them: the batch-1 step
(`FusedDecoder`) and the batched step (`FusedBatchDecoder`, cuBLAS plan) of a LLaMA-2-7B-shaped model at context
~300, each a CUDA graph replayed under torch.profiler, one replay at a time. Per replay: the wall time from the first
kernel's start to the last one's end, the time at least one kernel runs (the union of their intervals: kernels
launched with programmatic dependent launch overlap their neighbours), and the rest, the idle boundaries.

The question it answers (issue 14): the batched step of 4 sequences replays in ~4.45-4.68 ms against ~3.9 for one
sequence, yet its kernels' own times add up to about the batch-1 step's; is the difference its ~380 kernel boundaries
without PDL (cuBLAS, the row kernels) against the batch-1 step's ~225 with it?

    python -m bench.probes.graph_gaps [--model dummy:llama-2-7b] [--batches 1,2,4] [--replays 10]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.probes.batch_gemv import capture_graph
from graph_executor.fused_batch_decoder import FusedBatchDecoder
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.loading.loader import LoadConfig, load_model

TOP = 8  # kernels listed per step, by their summed span per replay (neighbours launched with PDL overlap)


def union_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals (us)."""
    total, reach = 0.0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


def replay_figures(graph: torch.cuda.CUDAGraph, replays: int) -> dict:
    """Kernels per replay, and the median replay's wall, busy and idle-boundary time (ms)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    records = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if getattr(e, "device_type", None) == DeviceType.CUDA]
    kernels = sorted((start, end) for start, end, _ in records)
    if not kernels or len(kernels) % replays:
        raise RuntimeError(f"{len(kernels)} kernel records over {replays} replays: the profiler missed some")
    per = len(kernels) // replays
    walls, busy = [], []
    for r in range(replays):
        spans = kernels[r * per:(r + 1) * per]
        walls.append((max(e for _, e in spans) - spans[0][0]) / 1e3)
        busy.append(union_us(spans) / 1e3)
    wall, run = statistics.median(walls), statistics.median(busy)
    by_name: dict[str, float] = {}
    for start, end, name in records:
        by_name[name] = by_name.get(name, 0.0) + (end - start) / replays
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP]
    return {"kernels": per, "wall_ms": wall, "busy_ms": run, "gaps_ms": wall - run,
            "gap_us_per_boundary": (wall - run) * 1e3 / max(1, per - 1), "top_us": top}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes of the batched step (1: its one-row graph)")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--position", type=int, default=300, help="every row's position (its context)")
    ap.add_argument("--split-sizes", default="",
                    help="also time both steps with their attention split into these many positions per program, on "
                         "Triton's default 4 warps (comma list; the default steps take decode_attention's defaults)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    model = load_model(LoadConfig(model=args.model, device="cuda", max_context=max(512, args.position + 64),
                                  max_num_seqs=max(batches), progress=False)).model
    dev, vocab = model.embed_tokens.device, model.config.vocab_size
    steps = {}
    one = FusedDecoder(model)
    token, position = torch.zeros(1, dtype=torch.int64, device=dev), torch.full((1,), args.position, device=dev)
    logits1 = torch.empty(vocab, device=dev)
    steps["batch-1 step (FusedDecoder)"] = capture_graph(lambda: one.step(token, position, logits1))
    batched = FusedBatchDecoder(model, max(batches))
    inputs = {}
    for b in batches:
        inputs[b] = (torch.zeros(b, dtype=torch.int64, device=dev), torch.full((b,), args.position, device=dev),
                     torch.arange(b, device=dev), torch.empty(b, vocab, device=dev))
        steps[f"batched step, {b} rows (cuBLAS plan)"] = capture_graph(
            lambda b=b: batched.step(*inputs[b]))
    cfg = model.config
    for size in filter(None, args.split_sizes.split(",")):
        single = FusedDecoder(model, split_size=int(size))
        steps[f"batch-1 step, attention split {size}"] = capture_graph(
            lambda single=single: single.step(token, position, logits1))
        other = FusedBatchDecoder(model, max(batches))
        other.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context, dev,
                                          cfg.sliding_window, split_size=int(size), max_tokens=max(batches),
                                          pdl=other.pdl, batched=True)
        for b in batches:
            steps[f"batched step, {b} rows, attention split {size}"] = capture_graph(
                lambda b=b, other=other: other.step(*inputs[b]))
    print("| step | kernels | wall ms | kernels running ms | idle boundaries ms | us per boundary |\n"
          "|---|---|---|---|---|---|", flush=True)
    tops = {}
    for name, graph in steps.items():
        f = replay_figures(graph, args.replays)
        tops[name] = f["top_us"]
        print(f"| {name} | {f['kernels']} | {f['wall_ms']:.3f} | {f['busy_ms']:.3f} | {f['gaps_ms']:.3f} | "
              f"{f['gap_us_per_boundary']:.2f} |", flush=True)
    for name, top in tops.items():
        print(f"\n{name}, kernels by summed span per replay (us):")
        for kernel, us in top:
            print(f"  {us:8.1f}  {kernel[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
