"""GPU probe (issue 10's packed TTFT from 128 prompt rows): a packed projection dequantized and multiplied in
chunks small enough to stay in L2, against the whole projection dequantized then multiplied (the shipped path).

The shipped path writes each dense projection to memory whole (2 bytes a weight) and cuBLAS reads it back: at 128
tokens on LLaMA-2-7B the int4 prefill pays ~5 ms over fp16 for that. A chunk of 8-24 MB written by the pass may
still be in L2 (50 MB) when the GEMM reads it, so neither the write nor the read would reach memory. Chunks by
weight rows (out[:, rows] = x @ W[rows]^T: fewer output tiles a GEMM) or by columns (out += x[:, cols] @
W[:, cols]^T: the whole output each time, float16 sums between chunks). Per slot and prompt length, all 32 layers
in one CUDA graph, median of alternating rounds, with the fp16 GEMM on weights already dense as the floor.

    python -m bench.probes.dequantize_chunks [--model llama-2-7b] [--quantize int4] [--tokens 128,512] [--mb 8,16,24]
"""

from __future__ import annotations

import argparse

import torch

from bench.probes.step_variants import alternating_rounds
from bench.probes.verify_plan import graphed
from graph_executor.kernels import gemm_lowbit
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.quant import rows as qrows

SLOTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def chunks(total: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="a dummy preset")
    ap.add_argument("--quantize", default="int4", choices=("int4", "int8"))
    ap.add_argument("--tokens", default="128,512", help="comma list of prompt lengths")
    ap.add_argument("--mb", default="8,16,24", help="comma list of chunk sizes (MB of float16 weights)")
    ap.add_argument("--slots", default=",".join(SLOTS))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("dequantize_chunks: needs a CUDA GPU; none is visible")
    device = torch.device("cuda")
    model = load_model(LoadConfig(model=f"dummy:{args.model}", device="cuda", dtype="float16", max_context=64,
                                  progress=False, quantize=args.quantize, tile_packed=False)).model
    print(f"dummy:{args.model} {args.quantize} (row-major) on {torch.cuda.get_device_name()}, 32 layers a graph, "
          f"median of {args.rounds} alternating rounds")
    print("| slot | tokens | variant | ms, all layers | vs whole | vs fp16 GEMM | max abs diff vs whole |")
    print("|---|---|---|---|---|---|---|")
    for slot in args.slots.split(","):
        weights = [getattr(layer, slot) for layer in model.layers]
        n, k = weights[0].shape
        dense = [gemm_lowbit.dequantize(w, torch.empty(n, k, dtype=torch.float16, device=device)) for w in weights]
        biggest = max(int(mb) for mb in args.mb.split(",")) << 20
        bufs = [torch.empty(max(n * k, biggest // 2), dtype=torch.float16, device=device) for _ in range(2)]
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, k, dtype=torch.float16, device=device) * 0.1
            variants: list[tuple[str, object]] = []
            outs = []

            def add(name, body):
                out = torch.empty(t, n, dtype=torch.float16, device=device)
                outs.append(out)
                variants.append((name, graphed(lambda o=out: body(o))))

            add("fp16 GEMM (dense weights)", lambda o: [torch.mm(x, d.t(), out=o) for d in dense])

            def whole(o):
                for w in weights:
                    buf = bufs[0][:n * k].view(n, k)
                    torch.mm(x, gemm_lowbit.dequantize(w, buf).t(), out=o)
            add("whole (shipped)", whole)
            for mb in (int(v) for v in args.mb.split(",")):
                rows_per = max(64, ((mb << 20) // (2 * k)) // 64 * 64)
                cols_per = max(256, ((mb << 20) // (2 * n)) // 256 * 256)
                row_parts = [[(a, b, qrows.row_slice(w, a, b)) for a, b in chunks(n, rows_per)] for w in weights]
                col_parts = [[(a, b, qrows.part(w, (slice(None), slice(a, b)))) for a, b in chunks(k, cols_per)]
                             for w in weights]

                def by_rows(o, parts=row_parts):
                    for layer in parts:
                        for i, (a, b, w) in enumerate(layer):
                            buf = bufs[i % 2][:(b - a) * k].view(b - a, k)
                            torch.mm(x, gemm_lowbit.dequantize(w, buf).t(), out=o[:, a:b])

                def by_cols(o, parts=col_parts):
                    for layer in parts:
                        for i, (a, b, w) in enumerate(layer):
                            buf = bufs[i % 2][:n * (b - a)].view(n, b - a)
                            dq = gemm_lowbit.dequantize(w, buf)
                            if i == 0:
                                torch.mm(x[:, a:b], dq.t(), out=o)
                            else:
                                o.addmm_(x[:, a:b], dq.t())
                if len(row_parts[0]) > 1:
                    add(f"rows {rows_per} ({len(row_parts[0])} chunks)", by_rows)
                if len(col_parts[0]) > 1:
                    add(f"cols {cols_per} ({len(col_parts[0])} chunks)", by_cols)
            times, results = alternating_rounds([g for _, g in variants], outs, args.rounds, device)
            ref = results[1]
            for (name, _), ms, out in zip(variants, times, results, strict=True):
                print(f"| {slot} | {t} | {name} | {ms:.3f} | {ms / times[1]:.3f} | {ms / times[0]:.3f} | "
                      f"{float((out - ref).abs().max()):.2e} |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
