"""Where a step's time goes, kernel by kernel: torch.profiler over decode steps at one context and over
prefills of one length, with the top kernels (GPU) or ops (CPU) by time per step. The next look when a bench
figure sits far from its floor (e.g. the 200-token prefill at about 2x).

On a GPU the steps run the executor's fused kernels launched one by one (the bodies its CUDA graphs capture),
so each kernel is timed on its own; the step time of the graph replay is printed beside them for reference.

    python -m bench.probes.kernel_profile [--model dummy:llama-2-7b] [--context 2048] [--prompt 200] [--steps 20]
        [--batch 4]   (also a batched decode of 4 sequences, and a mixed step: 3 of them and a --prompt chunk)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.runner import ModelRunner


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls_per_step: float
    us_per_step: float
    share: float  # of the summed kernel time


def _self_time_us(event, on_gpu: bool) -> float:
    if not on_gpu:
        return event.self_cpu_time_total
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0


def profile_steps(step, steps: int, on_gpu: bool, top: int) -> list[KernelRow]:
    """Run `step` `steps` times under the profiler; the `top` kernels (GPU) or ops (CPU) by self time."""
    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    step()  # warm-up: compilation and first-use allocations stay out of the figures
    _sync(on_gpu)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(on_gpu)
    times = [(e.key, e.count, _self_time_us(e, on_gpu)) for e in prof.key_averages()]
    times = [t for t in times if t[2] > 0]
    total = sum(t[2] for t in times) or 1.0
    times.sort(key=lambda t: -t[2])
    return [KernelRow(name, count / steps, us / steps, us / total) for name, count, us in times[:top]]


def step_ms(step, steps: int, on_gpu: bool) -> float:
    step()
    _sync(on_gpu)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(on_gpu)
    return (time.perf_counter() - start) * 1e3 / steps


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def table(title: str, rows: list[KernelRow], step_time_ms: float) -> str:
    lines = [f"### {title}: {step_time_ms:.3f} ms per step", "",
             "| kernel / op | calls per step | us per step | share |", "|---|---|---|---|"]
    for r in rows:
        name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
        lines.append(f"| `{name}` | {r.calls_per_step:g} | {r.us_per_step:.1f} | {r.share:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--device", default="auto", help="auto (GPU if present), cuda or cpu")
    ap.add_argument("--quantize", default=None, choices=("int8", "int4", "fp8"),
                    help="round the weights to this packed format at load (as `serve --quantize`)")
    ap.add_argument("--context", type=int, default=2048, help="decode at this many tokens of context")
    ap.add_argument("--prompt", type=int, default=200, help="prefill this many tokens")
    ap.add_argument("--steps", type=int, default=20, help="profiled steps of each kind")
    ap.add_argument("--top", type=int, default=15, help="rows per table")
    ap.add_argument("--verify", type=int, default=0, help="also profile speculative verify steps of this many "
                                                           "proposals (k + 1 tokens each); 0: none")
    ap.add_argument("--batch", type=int, default=1, help="N > 1: also a batched decode of N sequences (KV slots) "
                                                         "at the context, and a mixed step of N - 1 of them with "
                                                         "a --prompt chunk (<= 256 tokens) of the last slot")
    args = ap.parse_args(argv)
    # decode and verify positions for three runs each (profile, timing, graph replays)
    extra = 3 * (args.steps + 1) * (2 + args.verify) + 2 * (args.verify + 1) + 6 * (args.steps + 1) * (args.batch > 1)
    max_context = max(args.context + extra, args.prompt) + 1
    loaded = load_model(LoadConfig(model=args.model, device=args.device, dtype="auto", max_context=max_context,
                                   progress=False, max_num_seqs=max(1, args.batch),
                                   quantize=args.quantize))
    model = loaded.model
    on_gpu = model.embed_tokens.device.type == "cuda"
    if on_gpu:
        from graph_executor.graphs import GraphRunner

        runner = GraphRunner(model)  # nothing captured yet: its steps launch the fused kernels eagerly
    else:
        runner = ModelRunner(model)
    runner.buffers.input_ids.random_(0, model.config.vocab_size)
    runner.prefill(args.context)
    position = iter(range(args.context, max_context))
    decode = lambda: runner.decode(next(position))
    prefill = lambda: runner.prefill(args.prompt)
    device = "GPU kernels" if on_gpu else "CPU ops"
    print(f"{loaded.name} on {torch.cuda.get_device_name() if on_gpu else 'cpu'}, "
          f"{str(model.dtype).removeprefix('torch.')}; self time of {device}, eager launches\n")
    print(table(f"decode at context {args.context}", profile_steps(decode, args.steps, on_gpu, args.top),
                step_ms(decode, args.steps, on_gpu)))
    print()
    print(table(f"prefill of {args.prompt} tokens", profile_steps(prefill, args.steps, on_gpu, args.top),
                step_ms(prefill, args.steps, on_gpu)))
    verify = None
    if args.verify:
        tokens = args.verify + 1
        spans = iter(range(args.context + 3 * (args.steps + 1), max_context - tokens, tokens))
        verify = lambda: runner.verify(next(spans), tokens)
        print()
        print(table(f"verify of {tokens} tokens at context ~{args.context}",
                    profile_steps(verify, args.steps, on_gpu, args.top), step_ms(verify, args.steps, on_gpu)))
    batch = mixed = None
    if args.batch > 1:
        from ipc.messages import PromptChunk

        n = args.batch
        for slot in range(1, n):
            runner.prefill(args.context, 0, slot)
        rows = iter(range(args.context, max_context))
        batch = lambda: runner.decode_batch(list(range(n)), [next(rows)] * n)
        chunk = PromptChunk(args.prompt, 0, n - 1)  # the last slot's prompt again, over its own cache rows
        mixed = lambda: runner.decode_batch(list(range(n - 1)), [next(rows)] * (n - 1), [chunk])
        print()
        print(table(f"batched decode of {n} sequences at context ~{args.context}",
                    profile_steps(batch, args.steps, on_gpu, args.top), step_ms(batch, args.steps, on_gpu)))
        print()
        print(table(f"mixed step: {n - 1} decode rows and a {args.prompt}-token chunk",
                    profile_steps(mixed, args.steps, on_gpu, args.top), step_ms(mixed, args.steps, on_gpu)))
    if on_gpu:
        runner.capture_next()  # decode first, then the prompt's bucket once it has demand
        while runner.capture_next() is not None:
            pass
        print(f"\nthe same steps as graph replays: decode {step_ms(decode, args.steps, True):.3f} ms, "
              f"prefill {step_ms(prefill, args.steps, True):.3f} ms"
              + (f", verify {step_ms(verify, args.steps, True):.3f} ms" if verify else "")
              + (f", batched decode {step_ms(batch, args.steps, True):.3f} ms, mixed {step_ms(mixed, args.steps, True):.3f}"
                 " ms" if batch else ""))


if __name__ == "__main__":
    main()
