"""Probe: `rope_append` over a prompt's rows (the prefill's RoPE + KV append) by heads a program.

Why (issue 12): the 7B prefill's kernel profile at 200 tokens (224-row bucket) put `_rope_append_kernel` at ~10 us a
layer (0.33 ms a step, 5% of it) for ~11 MB moved: one program a (token, head), ~14 K programs of 0.25-0.5 KB each.
Here the kernel alone, `layers` calls a CUDA graph (one layer's cache each), LLaMA-2-7B's heads (32 + 32 of 128),
per token count and heads a program (`rope_append(block_h=)`), against the bytes it moves at the card's bandwidth.

    python -m bench.probes.rope_rows [--tokens 16,64,128,224,512] [--blocks 1,2,4,8,16]
"""

from __future__ import annotations

import argparse

import torch

from bench.probes.prefill_gemm import timed_graph
from graph_executor.kernels.rope_append import rope_append


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,64,128,224,512")
    ap.add_argument("--blocks", default="1,2,4,8,16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    heads, kv_heads, hd, context = 32, 32, 128, 1024
    blocks = [int(v) for v in args.blocks.split(",")]
    caches = [torch.zeros(2, kv_heads, context, hd, device=device, dtype=torch.float16) for _ in range(args.layers)]
    rope = torch.randn(context, 2, hd, device=device)
    print(f"{torch.cuda.get_device_name()}: rope_append, LLaMA-2-7B heads, {args.layers} layers a graph, us a layer")
    print("| tokens | MB moved | " + " | ".join(f"{b} heads a program" for b in blocks) + " |")
    print("|---|---|" + "---|" * len(blocks))
    for t in (int(v) for v in args.tokens.split(",")):
        qkv = torch.randn(t, (heads + 2 * kv_heads) * hd, device=device, dtype=torch.float16)
        q = torch.empty(t, heads, hd, device=device, dtype=torch.float16)
        positions = torch.arange(t, device=device)
        moved = qkv.numel() * 2 + q.numel() * 2 + 2 * t * kv_heads * hd * 2
        row = []
        for b in blocks:
            def calls(b=b) -> None:
                for cache in caches:
                    rope_append(qkv, positions, rope, q, cache[0], cache[1], heads, kv_heads, hd, block_h=b)
            row.append(timed_graph(calls, args.reps) / args.layers * 1e3)
        print(f"| {t} | {moved / 1e6:.2f} | " + " | ".join(f"{us:.2f}" for us in row) + " |", flush=True)


if __name__ == "__main__":
    main()
