"""GPU probe: long-prompt projections over packed weights (LLaMA-2-7B shapes, int4 / int8 groups of 32) three ways:
the whole weight dequantized into HBM then torch.mm (kernels/projections.py before), and kernels/dequant_matmul.py's
blocks of rows dequantized into a buffer that stays in L2, one after another or overlapped on a side stream; fp16
torch.mm on the dense weight is the baseline. Each timing replays a CUDA graph over enough weight copies to overflow
L2 (as bench.probes.lowbit_gemm does); each variant is checked against the whole-dequantize path first.

    python -m bench.probes.dequant_matmul [--tokens 128,512] [--formats int4,int8] [--chunks 1024,2048,4096]
"""

from __future__ import annotations

import argparse

import torch

from bench.floors import time_gpu
from bench.probes.lowbit_gemm import L2_FLUSH_BYTES, MAX_COPIES, SHAPES, _nbytes, _quantize
from graph_executor.kernels import dequant_matmul, gemm_lowbit
from graph_executor.kernels.dequant_matmul import ChunkConfig


def _timed(ops: list, device: torch.device, reps: int) -> float:
    for op in ops:
        op()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for op in ops:
            op()
    return time_gpu(graph.replay, device, repeats=reps) * 1e3 / len(ops)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="128,512", help="comma-separated prompt rows T")
    ap.add_argument("--formats", default="int4,int8", help="comma-separated, of int4, int8, fp8")
    ap.add_argument("--chunks", default="1024,2048,4096", help="comma-separated chunk_rows to time")
    ap.add_argument("--reps", type=int, default=10, help="timed graph replays per measurement (median)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; ms per projection (weights from HBM: copies rotate past L2)")
    print("| shape | T | format | fp16 mm | whole dequantize + mm | " + " | ".join(
        f"{c} rows{' overlapped' if o else ''}" for c in args.chunks.split(",") for o in (False, True)) + " |")
    print("|---|---|---|---|---|" + "---|" * (2 * len(args.chunks.split(","))))
    side = torch.cuda.Stream(dev)
    for name, (n, k) in SHAPES.items():
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02
        copies16 = max(1, min(MAX_COPIES, -(-L2_FLUSH_BYTES // (n * k * 2))))
        dense = [w16] + [w16 + 0.001 * i for i in range(1, copies16)]
        for fmt in args.formats.split(","):
            w = _quantize(fmt, w16)
            copies = max(1, min(MAX_COPIES, -(-L2_FLUSH_BYTES // _nbytes(w))))
            weights = [w] + [_quantize(fmt, w16 + 0.001 * i) for i in range(1, copies)]
            for t in (int(v) for v in args.tokens.split(",")):
                x = torch.randn(t, k, device=dev, dtype=torch.float16, generator=g)
                out = torch.empty(t, n, device=dev, dtype=torch.float16)
                full = torch.empty(n, k, device=dev, dtype=torch.float16)
                ref = torch.mm(x, gemm_lowbit.dequantize(w, full).t())
                cells = [_timed([lambda d=d: torch.mm(x, d.t(), out=out) for d in dense], dev, args.reps),
                         _timed([lambda q=q: torch.mm(x, gemm_lowbit.dequantize(q, full).t(), out=out)
                                 for q in weights], dev, args.reps)]
                for rows in (int(c) for c in args.chunks.split(",")):
                    for overlap in (False, True):
                        cfg = ChunkConfig(rows, overlap)
                        out.zero_()
                        dequant_matmul.matmul(x, w, out, cfg=cfg, side=side)
                        torch.cuda.synchronize()
                        err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
                        if err > 1e-2:
                            raise SystemExit(f"{name} {fmt} T={t} {cfg}: relative error {err:.1e} against the whole path")
                        cells.append(_timed([lambda q=q, c=cfg: dequant_matmul.matmul(x, q, out, cfg=c, side=side)
                                             for q in weights], dev, args.reps))
                print(f"| {name} | {t} | {fmt} | " + " | ".join(f"{c:.4f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
