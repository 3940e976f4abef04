"""Probe: does the card itself run a step slower after it has been idle (issues 12 and 13)?

The first request after `serve` is ready, like a chat user's after a pause, comes after idle time; its TTFT has been 1.4-1.5x the
back-to-back one on the H200 (SmolLM2 shape), and the JIT context's own share of that was ~1 ms. This probe leaves
both processes out: one prefill step and a few decode steps of a dummy model (CUDA graphs, one process), replayed
after each idle gap, timed on the card (CUDA events: how long the kernels ran) and on the host (from the replay
call until the host saw the step done, spinning on the event: what a process waiting for it would see).

    python -m bench.probes.gpu_idle [--models smollm2-135m,llama-2-7b] [--prompt 100] [--repeats 5]

If the card's times rise with the gap, the first request's extra cost is the card's (clocks and power states,
which we may not pin); if only the host's do, it is the launch and the wake-up of the waiting thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.probes.verify_plan import graphed
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.loading.loader import LoadConfig, load_model

GAPS_S = (0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 3.0)
DECODE_STEPS = 8


def spin_until(event: torch.cuda.Event) -> None:
    while not event.query():
        pass


def one_request(prefill: torch.cuda.CUDAGraph, decode: torch.cuda.CUDAGraph) -> tuple[float, float, float, float]:
    """(prefill on the card, prefill seen by the host, one decode step on the card (median), decode seen by the
    host (median)) in ms: the prefill graph, then DECODE_STEPS decode graphs, each waited for before the next."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * (1 + DECODE_STEPS))]
    host = []
    for i in range(1 + DECODE_STEPS):
        start = time.perf_counter()
        events[2 * i].record()
        (prefill if i == 0 else decode).replay()
        events[2 * i + 1].record()
        spin_until(events[2 * i + 1])
        host.append((time.perf_counter() - start) * 1e3)
    card = [events[2 * i].elapsed_time(events[2 * i + 1]) for i in range(1 + DECODE_STEPS)]
    return card[0], host[0], statistics.median(card[1:]), statistics.median(host[1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-2-7b", help="comma list of dummy presets")
    ap.add_argument("--prompt", type=int, default=100, help="prompt tokens of the prefill step")
    ap.add_argument("--repeats", type=int, default=5, help="requests per gap")
    ap.add_argument("--gaps", default=",".join(str(g) for g in GAPS_S), help="comma list of idle gaps in seconds")
    args = ap.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    device = torch.device("cuda")
    print(f"one process, CUDA graphs on {torch.cuda.get_device_name()}: a {args.prompt}-token prefill then "
          f"{DECODE_STEPS} decode steps after each idle gap; medians of {args.repeats}, ms")
    print("| model | gap (s) | prefill, card | prefill, host | decode step, card | decode step, host |")
    print("|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        model = load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16",
                                      max_context=args.prompt + 64, progress=False)).model
        tokens = args.prompt
        ids = torch.randint(0, model.config.vocab_size, (tokens,), device=device)
        positions = torch.arange(tokens, device=device)
        index = torch.tensor([tokens - 1], device=device)
        logits = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
        step = FusedPrefill(model, tokens)
        decoder = FusedDecoder(model)
        token = torch.full((1,), 7, dtype=torch.int64, device=device)
        position = torch.full((1,), tokens, dtype=torch.int64, device=device)
        prefill = graphed(lambda s=step: s.run(ids, positions, index, logits))
        decode = graphed(lambda d=decoder: d.step(token, position, logits))
        for _ in range(20):  # warm: the back-to-back state
            one_request(prefill, decode)
        for gap in gaps:
            rows = []
            for _ in range(args.repeats):
                time.sleep(gap)
                rows.append(one_request(prefill, decode))
            cols = [statistics.median(r[i] for r in rows) for i in range(4)]
            print(f"| {preset} | {gap:g} | " + " | ".join(f"{c:.3f}" for c in cols) + " |", flush=True)
        del prefill, decode, step, decoder, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
