"""GPU measurement of the packed low-bit prefill GEMM (graph_executor/kernels/gemm_lowbit.py) on LLaMA-2-7B's
projection shapes: for int4 and int8 (groups of 32), fp8 (per-row scales) and fp16 (torch.mm on the fp16 weight,
the baseline), out = x @ W^T at a few token counts T. Each timing replays a CUDA graph that runs the projection
over enough copies of the weights to overflow L2 (a real prefill reads each layer's weights once), so small T
reads weights from HBM as it would in the model. Per row: ms per projection, TFLOP/s (2 T N K), effective
weight read bandwidth (the format's bytes / time), the speed-up over fp16 torch.mm and the default tile; each
kernel is first checked against a float64 matmul of the format's dequantized weights. --sweep also times a
handful of block configs per (shape, T, format) and prints the best.

    python -m bench.probes.lowbit_gemm [--tokens 16,64,128,256,512] [--sweep [--sweep-set large]] [--reps 20]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.floors import time_gpu
from graph_executor.kernels import gemm_lowbit
from graph_executor.kernels.gemm_lowbit import GemmConfig
from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.quant.formats import quantize_fp8, quantize_int4, quantize_int8

H, I = 4096, 11008  # LLaMA-2-7B
SHAPES = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}  # (N, K)
FORMATS = ("fp16", "int4", "int8", "fp8")
L2_FLUSH_BYTES = 256 * 1024**2  # over 4x the H200's 60 MB L2
MAX_COPIES = 32
SWEEP = [GemmConfig(*c) for c in [  # (block_n, block_t, block_k, split, num_warps, num_stages)
    (64, bt, bk, split, 4, 3) for bt in (16, 32, 64) for bk in (64, 128, 256) for split in (1, 2, 4, 8)]]
# Long prompts (128-512 tokens, where the tensor cores' work outweighs the weights' read): larger tiles, so that each
# dequantized weight tile feeds more tokens (the default stops at 64 tokens a program: at 512 tokens every weight
# is dequantized 8 times), with 8 warps and deeper pipelines; unsplit.
LARGE_SWEEP = [GemmConfig(*c) for c in [
    *((bn, bt, bk, 1, w, st) for bn in (64, 128) for bt in (128, 256) for bk in (64, 128)
      for w, st in ((4, 3), (8, 3), (8, 4))),
    (128, 64, 128, 1, 8, 3), (128, 64, 64, 1, 4, 3)]]
# The large tiles again with float16 dequantization (GemmConfig.f16_math: no I2F, the quarter-rate conversion that
# took as many cycles as the tensor cores in the 128 x 128 x 64 tile's loop, sm_90 SASS), and two with the float32
# form for comparison in the same run.
MIXED_SWEEP = [GemmConfig(*c) for c in [
    *((bn, bt, bk, 1, w, st) for bn, bt, bk, w, st in (
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4), (64, 256, 64, 4, 3),
        (128, 128, 128, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 128, 4, 3))),
    (128, 128, 64, 1, 8, 3, False, False), (128, 256, 64, 1, 8, 3, False, False)]]
SWEEPS = {"small": SWEEP, "large": LARGE_SWEEP, "mixed": MIXED_SWEEP}
SCRATCH_FLOATS = 64 * 1024**2  # enough for every config above at T <= 512 on these shapes


def _quantize(fmt: str, w: torch.Tensor):
    return {"fp16": lambda: w, "int4": lambda: quantize_int4(w, 32), "int8": lambda: quantize_int8(w, 32),
            "fp8": lambda: quantize_fp8(w)}[fmt]()


def _nbytes(w) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes


def _op(w, x: torch.Tensor, out: torch.Tensor, cfg: GemmConfig | None, scratch: SplitKScratch | None = None,
        dense: torch.Tensor | None = None):
    """The projection as timed: torch.mm for a dense weight; with `dense` (an [N, K] buffer) the long-prompt path of
    kernels/projections.py (dequantize into it, then torch.mm); else the low-bit GEMM with cfg."""
    if isinstance(w, torch.Tensor):
        return lambda: torch.mm(x, w.t(), out=out)
    if dense is not None:
        return lambda: torch.mm(x, gemm_lowbit.dequantize(w, dense).t(), out=out)
    return lambda: gemm_lowbit.gemm(x, w, out, cfg=cfg, scratch=scratch)


def _rel_error(w, x: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| / max(|ref|, rms(ref)) against float64 x @ W^T."""
    ref = x.double() @ (w if isinstance(w, torch.Tensor) else w.dequantize(torch.float32)).double().T
    return float(((out.double() - ref).abs() / torch.maximum(ref.abs(), ref.pow(2).mean().sqrt())).max())


def _time(weights: list, x: torch.Tensor, out: torch.Tensor, cfg: GemmConfig | None, reps: int,
          scratch: SplitKScratch | None = None, dense: torch.Tensor | None = None) -> float:
    """ms per projection: one graph runs it over every copy of the weights (one shared split-K scratch, as in the
    prefill step: a call without one would add an allocation and a memset to each)."""
    ops = [_op(w, x, out, cfg, scratch, dense) for w in weights]
    for op in ops:  # compile and warm up outside the capture
        op()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for op in ops:
            op()
    return time_gpu(graph.replay, x.device, repeats=reps) * 1e3 / len(weights)


def _candidates(w, tokens: int, sweep: list[GemmConfig]) -> list[GemmConfig]:
    """Sweep configs this weight accepts (block_k a multiple of its group) and T can fill (block_t <= 2 T)."""
    group = getattr(w, "group", 1)
    return [c for c in sweep if c.block_k % group == 0 and c.block_t <= max(16, 2 * tokens)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="16,64,128,256,512", help="comma-separated token counts T")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--sweep", action="store_true", help="time the block configs of --sweep-set too, print the best")
    ap.add_argument("--sweep-set", choices=tuple(SWEEPS), default="small",
                    help="small: SWEEP (16-64 tokens a program, split along K); large: LARGE_SWEEP (64-256 tokens "
                    "a program, 8 warps, deeper pipelines, for 128-512-token prompts); mixed: MIXED_SWEEP (large "
                    "tiles with float16 dequantization, two with the float32 form)")
    ap.add_argument("--reps", type=int, default=20, help="timed graph replays per measurement (median)")
    ap.add_argument("--reduce", action="store_true", help="also time the default tile with its split partials added "
                    "by a second kernel (GemmConfig.reduce_kernel), printed after the sweep's column")
    ap.add_argument("--dequant", action="store_true", help="also time the long-prompt path (the weight dequantized "
                    "into an fp16 buffer, then torch.mm), printed after the sweep's column")
    ap.add_argument("--f32-form", action="store_true", help="also time the default tile with the float32 "
                    "dequantization (GemmConfig.f16_math off), printed after the sweep's column")
    ap.add_argument("--out", default=None, help="folder for lowbit_gemm.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lowbit_gemm: needs a CUDA GPU; none is visible")
    tokens = [int(t) for t in args.tokens.split(",")]
    dev = torch.device("cuda")
    res: dict = {"card": torch.cuda.get_device_name(), "rows": []}
    print(f"{res['card']}; ms per projection, weights read from HBM (copies rotate past L2)", flush=True)
    print(f"{'shape':8s} {'N x K':>12s} {'T':>4s} {'fmt':5s} {'ms':>8s} {'TFLOP/s':>8s} {'w TB/s':>7s} "
          f"{'vs fp16':>7s} {'rel err':>8s} {'tile':>11s}  best config (--sweep)", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    scratch = SplitKScratch.zeros(SCRATCH_FLOATS, 65536, dev)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02
        fp16_ms: dict[int, float] = {}
        for fmt in args.formats.split(","):
            w = _quantize(fmt, w16)
            copies = max(1, min(MAX_COPIES, -(-L2_FLUSH_BYTES // _nbytes(w))))
            weights = [w] + [_quantize(fmt, w16 + 0.001 * i) for i in range(1, copies)]
            for t in tokens:
                x = torch.randn(t, k, device=dev, dtype=torch.float16, generator=g)
                out = torch.empty(t, n, device=dev, dtype=torch.float16)
                _op(w, x, out, None)()
                err = _rel_error(w, x, out)
                ms = _time(weights, x, out, None, args.reps, scratch)
                best = ""
                if args.sweep and fmt != "fp16":
                    timed = []
                    for cfg in _candidates(w, t, SWEEPS[args.sweep_set]):
                        try:
                            timed.append((_time(weights, x, out, cfg, args.reps, scratch), cfg))
                        except Exception as e:  # a config that fails to compile (shared memory) is skipped
                            res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": vars(cfg),
                                                "error": repr(e)[:200]})
                    timed.sort(key=lambda r: r[0])
                    best = "; ".join(f"{m:.4f} ms {c.block_n}x{c.block_t}x{c.block_k}/{c.split} {c.num_warps}w"
                                     f"{c.num_stages}s{'' if c.f16_math else ' f32'}" for m, c in timed[:3])
                    old = [(m, c) for m, c in timed if not c.f16_math]
                    if old:
                        best += f"  best f32 form {old[0][0]:.4f} ms"
                    res["rows"] += [{"shape": name, "T": t, "fmt": fmt, "cfg": vars(c), "ms": m} for m, c in timed]
                if args.dequant and fmt != "fp16":
                    d_ms = _time(weights, x, out, None, args.reps,
                                 dense=torch.empty(n, k, device=dev, dtype=torch.float16))
                    best += f"  dequantize+mm {d_ms:.4f} ms"
                    res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": "dequantize+mm", "ms": d_ms})
                if args.f32_form and fmt != "fp16":
                    f32 = dataclasses.replace(gemm_lowbit.default_config(t, n, k), f16_math=False)
                    f_ms = _time(weights, x, out, f32, args.reps, scratch)
                    best += f"  f32 form {f_ms:.4f} ms ({f_ms / ms:.3f}x)"
                    res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": vars(f32), "ms": f_ms})
                if args.reduce and fmt != "fp16":
                    reduced = dataclasses.replace(gemm_lowbit.default_config(t, n, k), reduce_kernel=True)
                    r_ms = _time(weights, x, out, reduced, args.reps, scratch)
                    best += f"  reduce kernel {r_ms:.4f} ms ({r_ms / ms:.3f}x)"
                    res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": vars(reduced), "ms": r_ms})
                if fmt == "fp16":
                    fp16_ms[t] = ms
                ratio = f"{fp16_ms[t] / ms:7.2f}" if t in fp16_ms else f"{'-':>7s}"
                tflops = 2 * t * n * k / ms / 1e9
                tbs = _nbytes(w) / ms / 1e9
                d = gemm_lowbit.default_config(t, n, k)
                tile = "torch.mm" if fmt == "fp16" else f"{d.block_n}x{d.block_t}x{d.block_k}/{d.split}"
                print(f"{name:8s} {f'{n}x{k}':>12s} {t:4d} {fmt:5s} {ms:8.4f} {tflops:8.1f} {tbs:7.2f} {ratio} "
                      f"{err:8.1e} {tile:>11s}  {best}", flush=True)
                res["rows"].append({"shape": name, "T": t, "fmt": fmt, "cfg": "default", "ms": ms, "tflops": tflops,
                                    "weight_tbs": tbs, "rel_err": err, "copies": copies})
            del weights, w
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lowbit_gemm.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
