"""GPU probe (issues 10 and 12): where the batch-1 decode loop's time per token goes on the card, beyond the step's
CUDA graph. The bench's in-process decode P50 (LLaMA-2-7B int4 1.81 ms) sits ~0.1 ms above the step graph's own
replay (1.71 ms at a longer context); this records the generation loop (`LocalEngine`, greedy, ignore EOS) with
torch's profiler (CUPTI) and splits each token's period (one token read-back to the next) into the span of the
decode graph's kernels and the rest (sampling, the token's copy, the boundaries), with one period's events outside
the graph in detail.

    python -m bench.probes.decode_loop [--model dummy:llama-2-7b] [--quantize int4] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch


def gpu_events(trace: dict) -> list[dict]:
    """The trace's kernels and copies, sorted by start: {name, ts, dur (us), graph (bool)}."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        # the step's kernels are ours (Triton, named _*); the sampling loop's are torch's, its copies, and the greedy
        # token's own Triton kernel (graph_executor/kernels/argmax.py; with Generator(executor_argmax=True) the
        # executor's launch of it, after the graph, counts here too)
        graph = e["name"].startswith("_") and e["name"] != "_argmax_kernel"
        out.append({"name": e["name"], "ts": float(e["ts"]), "dur": float(e.get("dur", 0.0)), "graph": graph,
                    "cat": e["cat"]})
    return sorted(out, key=lambda e: e["ts"])


def periods(events: list[dict]) -> list[list[dict]]:
    """The events between consecutive token read-backs: device-to-host copies, or, where the greedy kernel writes
    the token to the host itself (no copy since the thirty-third session), its `_argmax_kernel` launches."""
    copies = [i for i, e in enumerate(events) if e["cat"] == "gpu_memcpy" and "DtoH" in e["name"].replace(" ", "")]
    marks = copies or [i for i, e in enumerate(events) if e["name"] == "_argmax_kernel"]
    return [events[a + 1:b + 1] for a, b in zip(marks, marks[1:])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--quantize", default="int4", help="none, int8, int4 or fp8")
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated under the profiler")
    ap.add_argument("--prompt", type=int, default=50, help="prompt tokens")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_loop: needs a CUDA GPU; none is visible")
    from torch.profiler import ProfilerActivity, profile

    from graph_executor.loading.loader import LoadConfig
    from jit_context.sampling_params import SamplingParams
    from launch.local import LocalEngine

    quantize = None if args.quantize == "none" else args.quantize
    engine = LocalEngine(LoadConfig(model=args.model, device="cuda", dtype="float16", max_context=1024,
                                    progress=False, quantize=quantize))
    prompt = list(range(100, 100 + args.prompt))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # graphs captured, kernels compiled
        *_, result = engine.generator.generate(prompt, params)
    host = statistics.median(b - a for a, b in zip(result.token_times_ms[1:], result.token_times_ms[2:]))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        *_, result = engine.generator.generate(prompt, params)
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace_file:
            trace = json.load(trace_file)
    events = gpu_events(trace)
    steps = periods(events)[4:-2]  # steady decode steps only
    if not steps:
        raise SystemExit(f"decode_loop: no token read-backs found among {len(events)} GPU events")
    rows = []
    for step in steps:
        ours = [e for e in step if e["graph"]]
        start, end = step[0]["ts"], step[-1]["ts"] + step[-1]["dur"]
        span = max(e["ts"] + e["dur"] for e in ours) - ours[0]["ts"]
        rows.append((end - start, span, len(ours)))
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    print(f"{args.model} {args.quantize} on {torch.cuda.get_device_name()}: {len(steps)} steady tokens profiled "
          f"(contexts {args.prompt + 4}-{args.prompt + args.tokens - 2}); host token period median without the "
          f"profiler {host:.3f} ms")
    print("| per token (median) | us |")
    print("|---|---|")
    print(f"| period on the card (one read-back to the next) | {med[0]:.1f} |")
    print(f"| the step's kernels, first start to last end ({med[2]:.0f} kernels) | {med[1]:.1f} |")
    print(f"| the rest: sampling, the token's copy (if any), the boundaries | {med[0] - med[1]:.1f} |")
    mid = steps[len(steps) // 2]
    print("\nOne period's events outside the graph, and the gaps (us) before each event:")
    print("| event | in graph | start - previous end | duration |")
    print("|---|---|---|---|")
    prev_end = mid[0]["ts"]
    for i, e in enumerate(mid):
        gap = e["ts"] - prev_end
        if not e["graph"] or gap > 3.0 or i < 2 or i >= len(mid) - 2:
            print(f"| {e['name'][:70]} | {e['graph']} | {gap:.1f} | {e['dur']:.1f} |")
        prev_end = max(prev_end, e["ts"] + e["dur"])


if __name__ == "__main__":
    main()
