"""Quick GPU probe of the executor alone: floors (HBM read bandwidth, fp16 matmul rate), decode step latency of
the graph runner (fused Triton GEMVs) at several contexts, GEMV block configs,
prefill bucket latency, capture times and graph memory. One process, one card, printed as a table.
Floors, timers, percentiles and the model's byte counts are the harness's (bench/floors.py, bench/stats.py,
bench/model_info.py), so the probe's ratios mean what the bench's do.

    python -m bench.probes.gpu_probe [--model dummy:llama-2-7b] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.floors import decode_floor_ms, measure_device, prefill_floor_ms, time_gpu
from bench.model_info import ModelCost
from bench.stats import percentile
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.graphs import GraphRunner
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.loading.loader import LoadConfig, load_model


def time_ms(fn, reps: int = 20) -> float:
    """Median ms of fn() on the current CUDA device (the harness's timer)."""
    return time_gpu(fn, torch.cuda.current_device(), reps) * 1e3


def decode_latency(runner: GraphRunner, context: int, steps: int = 200) -> dict:
    """Per-step device time of decode replays at `context`, one event pair per step."""
    b = runner.buffers
    b.input_ids[:context].random_(100, 30000)
    runner.prefill(context)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for i in range(steps):
        starts[i].record()
        runner.decode(context + i)
        torch.argmax(b.logits).view(1)
        b.next_token.copy_(torch.argmax(b.logits).view(1))
        ends[i].record()
    torch.cuda.synchronize()
    t = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return {"p50_ms": percentile(t, 50), "p99_ms": percentile(t, 99), "min_ms": min(t)}


CONFIGS = [GemvConfig(*c) for c in [(8, 512, 4, 3), (16, 512, 4, 3), (16, 512, 4, 2), (4, 1024, 4, 3),
                                       (8, 1024, 8, 2), (16, 256, 4, 3), (2, 2048, 4, 3), (32, 512, 8, 3)]]


def gemv_sweep(model, bandwidth_tbs: float):
    """Per projection: each config over every layer's weight in one graph (no L2 reuse) -> TB/s; best plan."""
    from graph_executor.kernels.gemv import GemvPlan, gemv_residual, rmsnorm_gemv, silu_gemv_residual

    cfg, layers = model.config, model.layers
    h, i = cfg.hidden_size, cfg.intermediate_size
    dev, dt = model.embed_tokens.device, model.dtype
    x, nw = torch.randn(h, device=dev, dtype=dt), torch.ones(h, device=dev, dtype=dt)
    outs = {"qkv": torch.empty(cfg.q_size + 2 * cfg.kv_size, device=dev, dtype=dt),
            "gate_up": torch.empty(2 * i, device=dev, dtype=dt), "lm_head": torch.empty(cfg.vocab_size, device=dev)}
    a, gu, r = torch.randn(h, device=dev, dtype=dt), torch.randn(2 * i, device=dev, dtype=dt), x.clone()
    ops = {
        "qkv": lambda c: [rmsnorm_gemv(l.qkv_proj, x, nw, 1e-5, outs["qkv"], cfg=c) for l in layers],
        "o": lambda c: [gemv_residual(l.o_proj, a, r, cfg=c) for l in layers],
        "gate_up": lambda c: [rmsnorm_gemv(l.gate_up_proj, x, nw, 1e-5, outs["gate_up"], cfg=c) for l in layers],
        "down": lambda c: [silu_gemv_residual(l.down_proj, gu, r, cfg=c) for l in layers],
        "lm_head": lambda c: [rmsnorm_gemv(model.lm_head, x, nw, 1e-5, outs["lm_head"], cfg=c) for _ in range(4)],
    }
    nbytes = {"qkv": layers[0].qkv_proj, "o": layers[0].o_proj, "gate_up": layers[0].gate_up_proj,
              "down": layers[0].down_proj, "lm_head": model.lm_head}
    table, best = {}, {}
    for op, fn in ops.items():
        reps = 4 if op == "lm_head" else len(layers)
        total = nbytes[op].numel() * nbytes[op].element_size() * reps
        for c in CONFIGS:
            fn(c)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn(c)
            ms = time_ms(g.replay, reps=10)
            tbs = total / ms / 1e9
            table[f"{op} {c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}"] = round(tbs, 3)
            if op not in best or tbs > best[op][0]:
                best[op] = (tbs, c)
    return table, GemvPlan(**{op: c for op, (_, c) in best.items()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    measured = measure_device("cuda", "float16")
    bandwidth, rate = measured["bandwidth_bytes_per_s"], measured["matmul_flops_per_s"]
    res["bandwidth_tbs"], res["matmul_tflops"] = bandwidth / 1e12, rate / 1e12
    torch.cuda.empty_cache()
    t = time.perf_counter()
    loaded = load_model(LoadConfig(model=args.model, device="cuda", dtype="float16", max_context=4096,
                                   progress=False))
    res["load_s"] = time.perf_counter() - t
    model = loaded.model
    cost = ModelCost.of(model.config, "float16")
    res["weight_gb"] = cost.weight_bytes / 1e9
    runner = GraphRunner(model)
    t = time.perf_counter()
    runner.capture_all()
    res["capture_all_s"] = time.perf_counter() - t
    res["capture"] = runner.facts()
    res["decode"] = {}
    for ctx in (128, 512, 2048):
        floor = decode_floor_ms(cost, bandwidth, ctx)
        lat = decode_latency(runner, ctx)
        lat["floor_ms"] = floor
        lat["ratio"] = lat["p50_ms"] / floor
        res["decode"][f"fused_{ctx}"] = lat
    res["gemv_sweep"], plan = gemv_sweep(model, res["bandwidth_tbs"])
    res["best_plan"] = {k: vars(v) for k, v in vars(plan).items()}
    res["split_sweep"] = {}
    for split in (64, 128, 256):
        r = GraphRunner(model, buckets=(), decoder=FusedDecoder(model, plan, split_size=split))
        r.capture_next()
        res["split_sweep"][split] = {c: decode_latency(r, c, steps=100)["p50_ms"] for c in (512, 2048)}
        del r
    res["prefill_ms"] = {}
    for n in (10, 25, 50, 100, 200, 300, 400, 500):
        b = runner.buffers
        b.input_ids[:n].random_(100, 30000)
        ms = time_ms(lambda: runner.prefill(n))
        res["prefill_ms"][n] = {"ms": ms, "floor_ms": prefill_floor_ms(cost, bandwidth, rate, n)}
    res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_probe.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k not in ("capture",)}, indent=1, default=str))
    print("capture:", json.dumps(res["capture"], default=str))


if __name__ == "__main__":
    main()
