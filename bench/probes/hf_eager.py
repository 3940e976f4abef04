"""Probe: why the bench's hf-eager decode is slow and erratic on the H200 host, variant by variant.

Issue 12 asks for the cause before hf-eager's ratios are quoted. The bench's own loop (`bench.engines.hf`:
DynamicCache, argmax, the token on the host each step) per variant, in one process, each step split into its host
part (the forward's Python and launches, until it returns) and its wait (the sync for the token), with the process's
CPU time, the machine's steal time, the garbage collections and the minor page faults over each variant, and whether
each variant's greedy tokens are the first variant's (the same seed and weights: they must be). What it found on an
H200 (bench/NOTES.md, twenty-first session): SDPA's cuDNN backend building a plan per new sequence length, i.e. in
every layer of every DynamicCache step; the bench's hf-eager runs without it.

    python -m bench.probes.hf_eager [--model llama-2-7b] [--device cuda] [--context 512] [--steps 64]
        [--variants plain,threads1,nogc,static,eager-attn,no-cudnn] [--layers N]

Variants: plain (the bench's loop with SDPA's backends as torch picks them), threads1 (torch.set_num_threads(1):
torch's CPU thread pool is the suspect), nogc (Python's collector off during the steps), static (a StaticCache
instead of the DynamicCache's growing torch.cat, still eager), eager-attn (attention_implementation "eager" instead
of sdpa), no-cudnn (SDPA's cuDNN backend off: the bench's hf-eager engine runs so). A name may repeat: a variant's
second run in the process shows what its first paid once. Reading it: host ms near the step ms means the host is the
limit (Python and launches: ~1,000 ops a step for a 7B); CPU ms well below wall ms means the process waited for
something other than the GPU (steal time says whether that was the VM's host); a spike that follows a gen-2
collection is the collector's.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import os
import resource
import statistics
import time

import torch

from bench.engines.hf import build_hf_model, make_static_cache
from graph_executor.loading.presets import preset

VARIANTS = ("plain", "threads1", "nogc", "static", "eager-attn", "no-cudnn")


@dataclasses.dataclass(frozen=True)
class StepTimes:
    host_ms: list[float]  # [steps]: from the step's start until the forward and argmax returned
    step_ms: list[float]  # [steps]: until the token was on the host
    cpu_ms: float  # the process's user + system time over the steps
    wall_ms: float
    steal_ms: float  # the machine's steal time over the steps (all CPUs; 0 where /proc/stat has none)
    collections: tuple[int, int, int]  # garbage collections per generation over the steps
    faults: int  # the process's minor page faults over the steps (fresh host pages: slow in a ballooning VM)
    tokens: list[int]  # [steps] the greedy tokens (every variant must give the plain loop's)
    logits: torch.Tensor  # [vocab] float32 on the CPU: the last step's (every variant's near the plain loop's)


def steal_ms() -> float:
    """The machine's steal time so far (ms, summed over CPUs), from /proc/stat; 0.0 where it is not reported."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    ticks = int(fields[8]) if len(fields) > 8 else 0
    return ticks * 1e3 / os.sysconf("SC_CLK_TCK")


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def collections() -> tuple[int, int, int]:
    return tuple(s["collections"] for s in gc.get_stats())  # type: ignore[return-value]


def decode_steps(model, prompt: torch.Tensor, steps: int, cache, cache_kw: str, static: bool) -> StepTimes:
    """prompt [1, T] on the model's device; `steps` greedy decode steps after its prefill (not timed)."""
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1,
                   **({"cache_position": torch.arange(prompt.shape[1], device=prompt.device)} if static else {}),
                   **{cache_kw: cache}).logits
    token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    int(token)
    host, step, tokens = [], [], []
    position = prompt.shape[1]
    gcs, faults0, cpu0, steal0, wall0 = collections(), minor_faults(), cpu_ms(), steal_ms(), time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        extra = {"cache_position": torch.tensor([position], device=prompt.device)} if static else {}
        logits = model(input_ids=token, use_cache=True, **extra, **{cache_kw: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        host.append((time.perf_counter() - start) * 1e3)
        tokens.append(int(token))  # the token on the host, as the bench's loop and generate's stop checks need it
        step.append((time.perf_counter() - start) * 1e3)
        position += 1
    wall = (time.perf_counter() - wall0) * 1e3
    after = collections()
    return StepTimes(host, step, cpu_ms() - cpu0, wall, steal_ms() - steal0,
                     tuple(b - a for a, b in zip(gcs, after, strict=True)),  # type: ignore[arg-type]
                     minor_faults() - faults0, tokens,
                     logits[0, -1].float().cpu())


def run_variant(name: str, hf_config: dict, device: str, dtype: torch.dtype, context: int, steps: int,
                threads: int) -> StepTimes:
    from transformers import DynamicCache

    config = dict(hf_config)
    if name == "eager-attn":
        config["attn_implementation"] = "eager"
    model = build_hf_model(config, device, dtype, seed=0)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    prompt = torch.randint(100, 1000, (1, context), generator=torch.Generator().manual_seed(1)).to(device)
    static = name == "static"
    torch.set_num_threads(1 if name == "threads1" else threads)
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    # bench.engines.hf (hf-eager) turns it off: it builds a cuDNN plan per new sequence length, i.e. every step
    torch.backends.cuda.enable_cudnn_sdp(cudnn and name != "no-cudnn")
    try:
        with torch.no_grad():
            warm = make_static_cache(model, context + steps + 8, device, dtype) if static else DynamicCache()
            decode_steps(model, prompt[:, :16], 4, warm, cache_kw, static)  # first calls: kernels and allocator
            cache = make_static_cache(model, context + steps + 8, device, dtype) if static else DynamicCache()
            if name == "nogc":
                gc.disable()
            return decode_steps(model, prompt, steps, cache, cache_kw, static)
    finally:
        gc.enable()
        torch.set_num_threads(threads)
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def row(name: str, t: StepTimes, first: StepTimes) -> str:
    def q(values: list[float], p: float) -> float:
        return sorted(values)[min(len(values) - 1, int(p * len(values)))]

    return (f"| {name} | {statistics.median(t.step_ms):.2f} | {q(t.step_ms, 0.99):.2f} | {max(t.step_ms):.2f} | "
            f"{statistics.median(t.host_ms):.2f} | {t.cpu_ms / t.wall_ms:.2f} | {t.steal_ms:.0f} | "
            f"{'/'.join(map(str, t.collections))} | {t.faults / len(t.step_ms):.0f} | {'yes' if t.tokens == first.tokens else 'NO'} | "
            f"{float((t.logits - first.logits).abs().max() / first.logits.abs().max()):.1e} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset (random weights in its shapes)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (a quick look)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the model runs (default: cuda if present)")
    ap.add_argument("--dtype", default=None, help="float16 on a GPU, float32 on the CPU unless given")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.context < 16 or args.steps < 1:
        raise SystemExit("--context must be >= 16 and --steps >= 1")
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    hf_config = preset(args.model).to_hf_dict()
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit("--layers must be >= 1")
        hf_config["num_hidden_layers"] = args.layers
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {os.cpu_count()} cores"
    print(f"hf eager decode, {args.model} {dtype}, context {args.context}, {args.steps} steps, {where}, torch "
          f"threads {threads}, load average {os.getloadavg()[0]:.2f}")
    print("| variant | step P50 ms | P99 | max | host P50 ms | CPU / wall | steal ms | gc gen0/1/2 | page faults / step | "
          "first's tokens | last logits vs first's (max abs / max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    first: StepTimes | None = None
    for name in names:
        times = run_variant(name, hf_config, args.device, dtype, args.context, args.steps, threads)
        first = first or times
        print(row(name, times, first), flush=True)


if __name__ == "__main__":
    main()
