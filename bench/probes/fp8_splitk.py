"""Issue 10: FP8 rows (`Fp8Rows`: e4m3 codes, a float32 scale per row) in the decode step. The split-K kernels
(graph_executor/kernels/gemv_fp8.py) against the path before them (the fp16 GEMVs over the codes, FP8_GEMV_PLAN),
both called through kernels/projections.py as the fused decoder calls them (one shared SplitKScratch).

LLaMA-2-7B's projections (qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008, lm_head 32000x4096),
each over 32 layers' worth of distinct weights in one CUDA graph (no L2 reuse between calls), timed by CUDA events
over many replays (median); read bandwidth = (codes + row scales + the activation vectors the call reads) / time.
The new kernel over a sweep of configs (block_n 16, 32, 64 x block_k 256 .. 2048 x 4 or 8 warps; the decoder's
FP8_PLAN config first), each checked against float64 on the first layer before it is timed; the old path with its
plan's config. Compiling the ~100 kernel variants (24 configs x 4: three fusions, float32 logits) one after another
would take about as long as the 2 minutes this probe may run (0.5-6 s each in an offline sm_90 compile), so a pool of
processes fills Triton's cache first (`gemv_fp8.precompile`); `--budget-s` stops the sweep early if it is still
too slow (the skipped configs are listed; the plan's config always runs).

    python -m bench.probes.fp8_splitk [--out DIR] [--shapes qkv,o,...] [--configs "32,1024,4;..."]
    python -m bench.probes.fp8_splitk --check [--out DIR]   # correctness only: on a CPU with tiny shapes under the
                                                            # Triton interpreter, on a GPU with the real shapes
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in interpreter mode (--check); it must be set before any kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import itertools
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.floors import measure_device, time_gpu
from bench.probes import fused_projection as fp
from graph_executor.fused_decoder import FP8_GEMV_PLAN, FP8_PLAN
from graph_executor.kernels import gemv_fp8
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_fp8 import Fp8Config
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.kernels.projections import ProjectionConfig
from graph_executor.quant.formats import Fp8Rows, quantize_fp8

HIDDEN, INTER, VOCAB = 4096, 11008, 32000  # LLaMA-2-7B
SHAPES = {"qkv": (3 * HIDDEN, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER),
          "lm_head": (VOCAB, HIDDEN)}
# the CPU check's stand-ins: N not a multiple of any block_n, K not a multiple of the K slice
TINY_SHAPES = {"qkv": (45, 160), "o": (37, 96), "gate_up": (70, 160), "down": (37, 200), "lm_head": (50, 160)}
TINY_CONFIGS = [Fp8Config(16, 64, 2), Fp8Config(32, 128, 4)]
SWEEP = [Fp8Config(n, k, w) for n, k, w in itertools.product((16, 32, 64), (256, 512, 1024, 2048), (4, 8))]
GPU_CHECK_CONFIGS = [Fp8Config(16, 256, 4), Fp8Config(64, 2048, 8)]  # besides the plan's
TOL = 1e-3  # per element, relative to max(|ref_i|, rms(ref)) (as tests/test_gemv_fp8.py)


def _split_config(name: str) -> Fp8Config:
    """The decoder's split-K config for a projection, or the default where its plan runs the fp16 kernels."""
    cfg = getattr(FP8_PLAN, name)
    return cfg if isinstance(cfg, Fp8Config) else gemv_fp8.DEFAULT


def _out_dtype(name: str, act: torch.dtype) -> torch.dtype:
    return torch.float32 if name == "lm_head" else act  # the decoder writes float32 logits


@dataclass
class Report:
    """What the run prints (kept for the log) and its measured rows (the JSON)."""

    lines: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, out: str | None, stem: str) -> None:
        if out is None:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{stem}.json").write_text(json.dumps(self.data, indent=1))
        (Path(out) / f"{stem}.log").write_text("\n".join(self.lines) + "\n")


def _vectors(name: str, n: int, k: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """The call's inputs: x and the norm weight (RMSNorm), a (o), [gate, up] (down), the residual r [N], out [N]."""
    g = torch.Generator(device=device).manual_seed(seed)
    return {"x": torch.randn(k, device=device, dtype=dtype, generator=g),  # [K]; also o's a
            "nw": torch.rand(k, device=device, dtype=dtype, generator=g) + 0.5,  # [K]
            "gu": torch.randn(2 * k, device=device, dtype=dtype, generator=g),  # [2K]: [gate, up]
            "r": torch.randn(n, device=device, dtype=dtype, generator=g),  # [N], the residual stream
            "out": torch.empty(n, device=device, dtype=_out_dtype(name, dtype))}  # [N]


def _checked(name: str, w: Fp8Rows, v: dict, pc: ProjectionConfig, ref: torch.Tensor) -> tuple[float, bool]:
    """(error against float64, a second call gave the same bits) of one call on fresh copies of the inputs."""
    outs = []
    for _ in range(2):
        fresh = {key: t.clone() for key, t in v.items()}
        outs.append(fp.call(name, w, fresh, pc, None).clone())
    return fp.error(outs[0], ref), torch.equal(outs[0], outs[1])


def _config_str(c: Fp8Config | GemvConfig) -> str:
    if isinstance(c, Fp8Config):
        return f"{c.block_n}x{c.block_k}/{c.num_warps}w"
    return f"fp16 kernel {c.block_n}x{c.block_k}/{c.num_warps}w/{c.num_stages}s"


def check(args: argparse.Namespace, report: Report) -> bool:
    """Every projection's fusion, new path (a few configs) and old path, against float64: True when all pass."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    shapes = SHAPES if gpu else TINY_SHAPES
    act = torch.float16 if gpu else torch.float32
    report.say(f"fp8 check on {torch.cuda.get_device_name() if gpu else 'cpu (Triton interpreter, tiny shapes)'}, "
               f"tolerance {TOL:g} per element")
    rows, ok = [], True
    for index, name in enumerate(args.shapes.split(",")):
        n, k = shapes[name]
        g = torch.Generator(device=device).manual_seed(100 + index)
        w = quantize_fp8(torch.randn(n, k, device=device, generator=g) * 0.02)
        v = _vectors(name, n, k, device, act, seed=200 + index)
        ref = fp.reference(name, w.codes.double() * w.scale.double()[:, None], v)
        plan_cfg = _split_config(name)
        cfgs = ([plan_cfg] + [c for c in GPU_CHECK_CONFIGS if c != plan_cfg]) if gpu else TINY_CONFIGS
        for cfg in [*cfgs, getattr(FP8_GEMV_PLAN, name)]:
            err, same = _checked(name, w, v, ProjectionConfig(fp8=cfg), ref)
            # the fp16 kernels' accumulation order is fixed too: both paths must repeat bit for bit
            good = err <= TOL and same
            ok &= good
            rows.append({"proj": name, "n": n, "k": k, "cfg": _config_str(cfg), "error": err, "repeatable": same,
                         "ok": good})
            report.say(f"  {name:8s} [{n}, {k}] {_config_str(cfg):32s} error {err:.2e} "
                       f"{'repeatable' if same else 'NOT REPEATABLE'} {'ok' if good else 'FAIL'}")
    report.data["check"] = {"device": str(device), "tolerance": TOL, "rows": rows, "ok": ok}
    report.say(f"fp8 check: {'all passed' if ok else 'FAILED'}")
    return ok


def _precompile_job(job: tuple) -> tuple[tuple, str | None, float]:
    """One kernel variant into Triton's cache (a pool process): (job, error or None, seconds)."""
    n, k, cfg_fields, mode, act, out = job
    start = time.perf_counter()
    try:
        gemv_fp8.precompile(n, k, Fp8Config(*cfg_fields), mode, getattr(torch, act), getattr(torch, out))
    except Exception as e:  # noqa: BLE001 - reported; the sweep then compiles (or fails) that config itself
        return job, repr(e)[:200], time.perf_counter() - start
    return job, None, time.perf_counter() - start


def precompile_all(names: list[str], configs: list[Fp8Config], processes: int, report: Report) -> None:
    """Fill Triton's cache with every (projection's variant, config) from a pool of spawned processes (compiling
    holds the GIL, so threads would not help). Projections with the same fusion, K and dtypes share a variant."""
    act = "float16"
    jobs = sorted({(SHAPES[name][0], SHAPES[name][1], (c.block_n, c.block_k, c.num_warps), fp.mode(name), act,
                    str(_out_dtype(name, torch.float16)).removeprefix("torch."))
                   for name in names for c in configs})
    # N only matters to the cache key through its divisibility: keep one N per (variant, config)
    unique = {}
    for job in jobs:
        unique.setdefault((job[0] % 16 == 0, *job[1:]), job)
    jobs = list(unique.values())
    start = time.perf_counter()
    errors = []
    try:
        ctx = multiprocessing.get_context("spawn")  # the parent holds a CUDA context: forking it is unsafe
        with ProcessPoolExecutor(max_workers=max(1, min(processes, len(jobs))), mp_context=ctx) as pool:
            for job, err, _ in pool.map(_precompile_job, jobs):
                if err is not None:
                    errors.append((job, err))
    except Exception as e:  # noqa: BLE001 - without the pool, each config compiles on first use
        report.say(f"precompile pool failed ({type(e).__name__}: {str(e)[:120]}); compiling on first use")
        return
    report.say(f"precompiled {len(jobs)} kernel variants in {time.perf_counter() - start:.1f} s with "
               f"{min(processes, len(jobs))} processes ({len(errors)} failed)")
    for job, err in errors[:5]:
        report.say(f"  precompile {job}: {err}")


def _time_graph(name: str, weights: list[Fp8Rows], v: dict, pc: ProjectionConfig, scratch: SplitKScratch | None,
                replays: int, device: torch.device) -> tuple[float, float]:
    """(ms of one replay of a graph calling the projection once per layer, seconds of the first eager call:
    compiling or loading the kernel)."""
    start = time.perf_counter()
    fp.call(name, weights[0], v, pc, scratch)
    torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    for w in weights[1:]:
        fp.call(name, w, v, pc, scratch)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fp.call(name, w, v, pc, scratch)
    return time_gpu(graph.replay, device, repeats=replays) * 1e3, first


def _read_bytes(name: str, w: Fp8Rows, act: torch.dtype) -> int:
    """Bytes one call reads from memory: codes, row scales and the activation vectors (x and the norm weight for
    RMSNorm, a for o, [gate, up] for down); the residual and output vectors are not counted."""
    k = w.shape[1]
    vec = {gemv_fp8.RMSNORM: 2 * k, gemv_fp8.RESIDUAL: k, gemv_fp8.SILU_RESIDUAL: 2 * k}[fp.mode(name)]
    return w.nbytes + vec * torch.finfo(act).bits // 8


def sweep(args: argparse.Namespace, report: Report) -> bool:
    start = time.perf_counter()
    device = torch.device("cuda")
    names = args.shapes.split(",")
    configs = SWEEP if args.configs is None else [Fp8Config(*(int(x) for x in c.split(",")))
                                                  for c in args.configs.split(";")]
    bandwidth = measure_device("cuda", "float16")["bandwidth_bytes_per_s"]
    report.data.update(card=torch.cuda.get_device_name(), bandwidth_tbs=bandwidth / 1e12, layers=args.layers,
                       replays=args.replays, rows=[])
    report.say(f"{report.data['card']}: read bandwidth {bandwidth / 1e12:.2f} TB/s (float32 sum over 4 GiB); "
               f"{args.layers} layers per graph, median of {args.replays} replays")
    if args.processes > 0:
        precompile_all(names, [*{_split_config(n) for n in names}, *configs], args.processes, report)
    act = torch.float16
    table, ok = [], True
    for index, name in enumerate(names):
        n, k = SHAPES[name]
        g = torch.Generator(device=device).manual_seed(index)
        weights = [quantize_fp8(torch.randn(n, k, device=device, dtype=act, generator=g) * 0.02)
                   for _ in range(args.layers)]
        total = sum(_read_bytes(name, w, act) for w in weights)
        v = _vectors(name, n, k, device, act, seed=1000 + index)
        ref = fp.reference(name, weights[0].codes.double() * weights[0].scale.double()[:, None], v)
        plan_cfg = _split_config(name)
        best = None
        for cfg in [plan_cfg, *(c for c in configs if c != plan_cfg)]:
            row = {"proj": name, "n": n, "k": k, "path": "split-K", "cfg": asdict(cfg)}
            if cfg != plan_cfg and time.perf_counter() - start > args.budget_s:  # the plan's config always runs
                report.data["rows"].append({**row, "skipped": f"past the {args.budget_s:g} s budget"})
                report.say(f"  {name:8s} {_config_str(cfg)}: skipped (budget)")
                continue
            pc = ProjectionConfig(fp8=cfg)
            try:
                err, same = _checked(name, weights[0], v, pc, ref)
                scratch = gemv_fp8.allocate_scratch(weights[0], cfg)
                ms, first = _time_graph(name, weights, {key: t.clone() for key, t in v.items()}, pc, scratch,
                                        args.replays, device)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or run is reported, not fatal
                report.data["rows"].append({**row, "error": repr(e)[:200]})
                report.say(f"  {name:8s} {_config_str(cfg)}: {type(e).__name__}: {str(e)[:100]}")
                continue
            good = err <= TOL and same
            ok &= good
            tbs = total / ms / 1e9
            report.data["rows"].append({**row, "ms": ms, "tbs": tbs, "error": err, "repeatable": same,
                                        "first_call_s": first})
            report.say(f"  {name:8s} {_config_str(cfg):14s} {ms:.3f} ms {tbs:.2f} TB/s err {err:.1e}"
                       f"{'' if good else ' FAIL'} (first call {first:.2f} s)")
            if good and (best is None or ms < best[0]):
                best = (ms, cfg, tbs)
        old_cfg = getattr(FP8_GEMV_PLAN, name)
        old_pc = ProjectionConfig(fp8=old_cfg)
        old_err, old_same = _checked(name, weights[0], v, old_pc, ref)
        old_ms, _ = _time_graph(name, weights, {key: t.clone() for key, t in v.items()}, old_pc, None, args.replays,
                                device)
        old_tbs = total / old_ms / 1e9
        report.data["rows"].append({"proj": name, "n": n, "k": k, "path": "fp16 kernels", "cfg": asdict(old_cfg),
                                    "ms": old_ms, "tbs": old_tbs, "error": old_err, "repeatable": old_same})
        report.say(f"  {name:8s} {_config_str(old_cfg)}: {old_ms:.3f} ms {old_tbs:.2f} TB/s err {old_err:.1e}")
        table.append((name, n, k, best, old_cfg, old_ms, old_tbs))
        del weights
        torch.cuda.empty_cache()
    report.say("")
    report.say(f"| projection | best split-K config | ms ({args.layers} layers) | TB/s | of reduction | "
               f"old path (fp16 kernels) TB/s | speedup |")
    report.say("|---|---|---|---|---|---|---|")
    for name, n, k, best, old_cfg, old_ms, old_tbs in table:
        if best is None:
            report.say(f"| {name} {n}x{k} | none measured | | | | {old_tbs:.2f} | |")
            continue
        ms, cfg, tbs = best
        report.say(f"| {name} {n}x{k} | {_config_str(cfg)} | {ms:.3f} | {tbs:.2f} | {tbs * 1e12 / bandwidth:.0%} | "
                   f"{old_tbs:.2f} | {old_ms / ms:.2f}x |")
    report.say("FP8_PLAN from this run: " + ", ".join(
        f"{name}=Fp8Config({b[1].block_n}, {b[1].block_k}, {b[1].num_warps})" for name, _, _, b, *_ in table if b))
    report.say(f"sweep: {time.perf_counter() - start:.0f} s{'' if ok else '; SOME CONFIGS FAILED THE CHECK'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="correctness only (runs on a CPU with tiny shapes)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--configs", default=None, help="semicolon list of block_n,block_k,num_warps (default: the sweep)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=50, help="timed graph replays per config (median)")
    ap.add_argument("--processes", type=int, default=min(16, os.cpu_count() or 1),
                    help="processes that precompile the kernels (0: compile on first use)")
    ap.add_argument("--budget-s", type=float, default=80.0,
                    help="seconds after which the sweep skips configs other than the plan's (the run must stay "
                         "under 2 minutes)")
    ap.add_argument("--out", default=None, help="folder for fp8_splitk.json and fp8_splitk.log")
    args = ap.parse_args()
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        ap.error(f"unknown projections {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    report = Report()
    if args.check:
        ok = check(args, report)
    elif not torch.cuda.is_available():
        ap.error("timing needs a GPU; --check runs on the CPU")
    else:
        ok = sweep(args, report)  # every config is checked against float64 before it is timed
    report.write(args.out, "fp8_splitk")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
