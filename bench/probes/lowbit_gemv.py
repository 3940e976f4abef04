"""GPU measurement of the packed decode GEMVs (graph_executor/kernels/projections.py) on LLaMA-2-7B's
decode projections: for fp16 (the shipped kernels), int8 and int4 (groups of 32), each projection over all 32
layers' weights in one CUDA graph (no L2 reuse); fp16 and fp8 (the fp16 kernels) over a few block configs each,
int4 and int8 with the decoder's split-K config for the projection (`bench/probes/int4_splitk.py` sweeps those);
read bandwidth = bytes the format reads (codes + scales + offsets) / time.

    python -m bench.probes.lowbit_gemv [--layers 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.floors import measure_device, time_gpu
from graph_executor.fused_decoder import INT4_PLAN, INT8_PLAN
from graph_executor.kernels import projections
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKScratch
from graph_executor.kernels.projections import ProjectionConfig
from graph_executor.quant.formats import quantize_fp8, quantize_int4, quantize_int8

H, I = 4096, 11008  # LLaMA-2-7B
SHAPES = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
CONFIGS = [GemvConfig(*c) for c in [(16, 256, 4, 3), (8, 512, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3),
                                       (4, 1024, 4, 3), (2, 2048, 4, 3), (8, 256, 4, 2), (32, 512, 8, 3),
                                       (16, 1024, 4, 3), (32, 512, 4, 3), (8, 1024, 4, 3), (16, 512, 8, 3)]]
FORMATS = ("fp16", "int8", "int4", "fp8")


def _nbytes(w) -> int:
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes


def _configs(name: str, fmt: str) -> list:
    """fp16 / fp8: the sweep; int4 / int8: the decoder's split-K config for this projection."""
    if fmt in ("int4", "int8"):
        return [getattr(INT4_PLAN if fmt == "int4" else INT8_PLAN, name)]
    return CONFIGS


def step_vectors(dev: torch.device, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The activations, norm weight, residual and outputs `_op`'s calls read and write (LLaMA-2-7B sizes, fp16)."""
    def randn(n: int) -> torch.Tensor:
        return torch.randn(n, device=dev, dtype=torch.float16, generator=g)

    return {"x": randn(H), "nw": torch.ones(H, device=dev, dtype=torch.float16), "a": randn(H), "r": randn(H),
            "gu": randn(2 * I), "out_qkv": torch.empty(3 * H, device=dev, dtype=torch.float16),
            "out_gate_up": torch.empty(2 * I, device=dev, dtype=torch.float16)}


def _op(name: str, w, vecs: dict, cfg: GemvConfig | SplitKConfig, scratch: SplitKScratch | None):
    """The decode step's kernel for this projection, through kernels/projections.py as the decoder calls it (packed
    weights share one split-K scratch, as in the decoder)."""
    pc = (ProjectionConfig(int4=cfg, int8=cfg) if isinstance(cfg, SplitKConfig)
          else ProjectionConfig(dense=cfg, fp8=cfg))
    if name in ("qkv", "gate_up"):
        return lambda: projections.rmsnorm_gemv(w, vecs["x"], vecs["nw"], 1e-5, vecs[f"out_{name}"], cfg=pc,
                                                scratch=scratch)
    if name == "o":
        return lambda: projections.gemv_residual(w, vecs["a"], vecs["r"], cfg=pc, scratch=scratch)
    return lambda: projections.silu_gemv_residual(w, vecs["gu"], vecs["r"], cfg=pc, scratch=scratch)


def _make(fmt: str, w: torch.Tensor):
    return {"fp16": lambda: w, "int8": lambda: quantize_int8(w), "int4": lambda: quantize_int4(w),
            "fp8": lambda: quantize_fp8(w)}[fmt]()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma list of {', '.join(FORMATS)}")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bandwidth = measure_device("cuda", "float16")["bandwidth_bytes_per_s"]
    res: dict = {"card": torch.cuda.get_device_name(), "bandwidth_tbs": bandwidth / 1e12, "rows": []}
    print(f"{res['card']}: read bandwidth {bandwidth / 1e12:.2f} TB/s (float32 sum over 4 GiB)", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    vecs = step_vectors(dev, g)
    for name, (n, k) in SHAPES.items():
        for fmt in args.formats.split(","):
            weights = []
            for _ in range(args.layers):
                w = torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02
                weights.append(_make(fmt, w))
                del w
            total = sum(_nbytes(w) for w in weights)
            best = None
            for cfg in _configs(name, fmt):
                try:
                    scratch = (SplitKScratch.allocate([weights[0]], [cfg], dev) if isinstance(cfg, SplitKConfig)
                               else None)
                    ops = [_op(name, w, vecs, cfg, scratch) for w in weights]
                    for op in ops:
                        op()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for op in ops:
                            op()
                    ms = time_gpu(graph.replay, dev) * 1e3
                except Exception as e:  # a config the format refuses (block_k vs group) or fails to compile
                    res["rows"].append({"proj": name, "fmt": fmt, "cfg": vars(cfg), "error": repr(e)[:200]})
                    continue
                tbs = total / ms / 1e9
                res["rows"].append({"proj": name, "fmt": fmt, "cfg": vars(cfg), "ms": ms, "tbs": tbs})
                if best is None or ms < best[0]:
                    best = (ms, cfg, tbs)
            if best:
                print(f"{name:8s} {fmt:5s} {total / args.layers / 1e6:8.2f} MB/layer  best {best[0]:.3f} ms "
                      f"({best[2]:.2f} TB/s, {best[2] * 1e12 / bandwidth:.0%} of the reduction) with {best[1]}",
                      flush=True)
            del weights
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lowbit_gemv.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
