"""Issue 12 (decode <= 1.15x the floor): the split-K dense GEMVs (graph_executor/kernels/gemv_dense_splitk.py) against
the fp16 kernels of gemv.py for a model's projections (default LLaMA-2-7B's), then the whole decode step with the
winners.

1. Per projection (default o and down, the two the fp16 kernels read at 3.0 and 3.28 TB/s against ~4.0 for the
   wide ones): 32 layers' worth of distinct fp16 weights called once each in one CUDA graph (no L2 reuse), timed
   over replays (median); read bandwidth = (weights + the activation vectors read) / time. GEMV_PLAN's config
   first, then a sweep of split-K configs, each checked against float64 on the first layer. Both launched as the
   decoder launches them (programmatic dependent launch where the card has it).
2. The batch-1 step (`FusedDecoder.step` as a CUDA graph, the dummy preset in fp16) with GEMV_PLAN against the plan
   taking each projection's best split-K config where it beat the fp16 kernel, at two contexts, in alternating
   rounds; the logits' largest difference is printed with it.

    python -m bench.probes.dense_splitk [--model llama-2-7b] [--shapes o,down] [--configs "16,512,4;..."]
        [--layers 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import torch

from bench.floors import measure_device, time_gpu
from bench.probes import fused_projection as fp
from bench.probes.verify_plan import graphed
from graph_executor.kernels import gemv_dense_splitk as dsk
from graph_executor.kernels import pdl as pdl_launch
from graph_executor.kernels.gemv import GEMV_PLAN
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig
from graph_executor.kernels.projections import ProjectionConfig
from graph_executor.loading.presets import preset

PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")


def shapes(model: str) -> dict[str, tuple[int, int]]:
    """[N, K] of each projection of a dummy preset (llama-2-7b, llama-3-8b, llama-3.2-1b, ...)."""
    c = preset(model)
    h = c.hidden_size
    return {"qkv": (c.q_size + 2 * c.kv_size, h), "o": (h, c.q_size), "gate_up": (2 * c.intermediate_size, h),
            "down": (h, c.intermediate_size), "lm_head": (c.vocab_size, h)}

SWEEP = [DenseSplitKConfig(n, k, w) for n, k, w in itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048), (4, 8))
         if n * k <= 32 * 1024]  # at most 64 KB of fp16 weights in flight per program
TOL = 2e-3  # per element against float64, relative to max(|ref_i|, rms(ref)): float16 output rounding and a margin


def _vectors(n: int, k: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return {"x": torch.randn(k, device=device, dtype=torch.float16, generator=g),
            "nw": torch.rand(k, device=device, dtype=torch.float16, generator=g) + 0.5,
            "gu": torch.randn(2 * k, device=device, dtype=torch.float16, generator=g),
            "r": torch.randn(n, device=device, dtype=torch.float16, generator=g),
            "out": torch.empty(n, device=device, dtype=torch.float16)}


def _error(name: str, w: torch.Tensor, v: dict, pc: ProjectionConfig) -> float:
    got = fp.call(name, w, {key: t.clone() for key, t in v.items()}, pc, None)
    return fp.error(got, fp.reference(name, w.double(), v))


def _time(name: str, weights: list[torch.Tensor], v: dict, pc: ProjectionConfig, replays: int,
          device: torch.device) -> float:
    """ms of one replay of a graph calling the projection once per layer."""
    cfg = pc.dense
    scratch = dsk.allocate_scratch(weights[0], cfg) if isinstance(cfg, DenseSplitKConfig) else None
    v = {key: t.clone() for key, t in v.items()}
    graph = graphed(lambda: [fp.call(name, w, v, pc, scratch) for w in weights])
    return time_gpu(graph.replay, device, repeats=replays) * 1e3


def _cfg_str(c) -> str:
    if isinstance(c, DenseSplitKConfig):
        return f"split-K {c.block_n}x{c.block_k}/{c.num_warps}w"
    return f"fp16 kernel {c.block_n}x{c.block_k}/{c.num_warps}w/{c.num_stages}s"


def sweep(model: str, names: list[str], configs: list[DenseSplitKConfig], layers: int, replays: int,
          pdl: bool) -> dict:
    """Per projection: the best split-K config and its ms, and the fp16 kernel's ms; prints a line per config."""
    device = torch.device("cuda")
    best = {}
    for index, name in enumerate(names):
        n, k = shapes(model)[name]
        g = torch.Generator(device=device).manual_seed(index)
        weights = [torch.randn(n, k, device=device, dtype=torch.float16, generator=g) * 0.02 for _ in range(layers)]
        vec = 2 * k if fp.mode(name) != dsk.RESIDUAL else k
        total = layers * (n * k + vec) * 2
        v = _vectors(n, k, device, seed=100 + index)
        old_cfg = dataclasses.replace(getattr(GEMV_PLAN, name), pdl=pdl)
        old_pc = ProjectionConfig(dense=old_cfg)
        old_ms = _time(name, weights, v, old_pc, replays, device)
        print(f"  {name:8s} {_cfg_str(old_cfg):32s} {old_ms:.3f} ms {total / old_ms / 1e9:.2f} TB/s "
              f"err {_error(name, weights[0], v, old_pc):.1e}", flush=True)
        found = None
        for cfg in configs:
            cfg = dataclasses.replace(cfg, pdl=pdl)
            pc = ProjectionConfig(dense=cfg)
            try:
                err = _error(name, weights[0], v, pc)
                ms = _time(name, weights, v, pc, replays, device)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is reported, not fatal
                print(f"  {name:8s} {_cfg_str(cfg):32s} {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            good = err <= TOL
            print(f"  {name:8s} {_cfg_str(cfg):32s} {ms:.3f} ms {total / ms / 1e9:.2f} TB/s err {err:.1e}"
                  f"{'' if good else ' FAIL'}", flush=True)
            if good and (found is None or ms < found[0]):
                found = (ms, cfg)
        best[name] = (found, old_cfg, old_ms, total)
        del weights
        torch.cuda.empty_cache()
    return best


def whole_step(model_name: str, plan, contexts: list[int], rounds: int) -> None:
    """The batch-1 step with GEMV_PLAN against `plan`, the dummy preset in fp16, alternating rounds."""
    from graph_executor.fused_decoder import FusedDecoder
    from graph_executor.loading.loader import LoadConfig, load_model

    device = torch.device("cuda")
    model = load_model(LoadConfig(model=f"dummy:{model_name}", device="cuda", dtype="float16", max_context=4096,
                                  progress=False)).model
    token = torch.full((1,), 7, dtype=torch.int64, device=device)
    print("| context | plan | ms/step | vs GEMV_PLAN | logits max abs diff |")
    print("|---|---|---|---|---|")
    for context in contexts:
        position = torch.full((1,), context, dtype=torch.int64, device=device)
        decoders = [FusedDecoder(model, plan=GEMV_PLAN), FusedDecoder(model, plan=plan)]
        outs = [torch.empty(model.config.vocab_size, dtype=torch.float32, device=device) for _ in decoders]
        graphs = [graphed(lambda d=d, o=o: d.step(token, position, o)) for d, o in zip(decoders, outs)]
        times: list[list[float]] = [[], []]
        for _ in range(rounds):
            for i, graph in enumerate(graphs):
                times[i].append(time_gpu(graph.replay, device) * 1e3)
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize()
        base = statistics.median(times[0])
        for label, t, out in zip(("GEMV_PLAN", "split-K where it won"), times, outs):
            ms = statistics.median(t)
            print(f"| {context} | {label} | {ms:.3f} | {ms / base:.3f} | {float((out - outs[0]).abs().max()):.2e} |",
                  flush=True)
        del graphs, decoders


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-2-7b", help="the dummy preset whose shapes are measured")
    ap.add_argument("--shapes", default="o,down", help=f"comma list of {', '.join(PROJECTIONS)}")
    ap.add_argument("--configs", default=None, help="semicolon list of block_n,block_k,num_warps (default: a sweep)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the whole-step comparison")
    ap.add_argument("--contexts", default="300,2000", help="decode positions of the whole-step comparison")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda")
    pdl = pdl_launch.supported(device)
    configs = SWEEP if args.configs is None else [DenseSplitKConfig(*(int(x) for x in c.split(",")))
                                                  for c in args.configs.split(";")]
    bandwidth = measure_device("cuda", "float16")["bandwidth_bytes_per_s"]
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bandwidth / 1e12:.2f} TB/s; {args.layers} layers per "
          f"graph, median of {args.replays} replays; PDL {'on' if pdl else 'off'}")
    names = args.shapes.split(",")
    print(f"dummy:{args.model}: " + ", ".join(f"{n} {shapes(args.model)[n][0]}x{shapes(args.model)[n][1]}"
                                            for n in names))
    best = sweep(args.model, names, configs, args.layers, args.replays, pdl)
    print("\n| projection | fp16 kernel | TB/s | best split-K | TB/s | speedup |\n|---|---|---|---|---|---|")
    plan = GEMV_PLAN
    for name, (found, old_cfg, old_ms, total) in best.items():
        if found is None:
            print(f"| {name} | {_cfg_str(old_cfg)} | {total / old_ms / 1e9:.2f} | none passed | | |")
            continue
        ms, cfg = found
        print(f"| {name} | {_cfg_str(old_cfg)} | {total / old_ms / 1e9:.2f} | {_cfg_str(cfg)} | "
              f"{total / ms / 1e9:.2f} | {old_ms / ms:.2f}x |")
        if ms < old_ms:
            plan = dataclasses.replace(plan, **{name: dataclasses.replace(cfg, pdl=False)})
    print(f"plan: {plan}")
    if plan != GEMV_PLAN:
        whole_step(args.model, plan, [int(c) for c in args.contexts.split(",")], args.rounds)
    print(f"probe: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
