"""The extend attention (`kernels/extend_attention.py`) of one layer on LLaMA-2-7B's shapes (32 heads of 128, a 4096-
position cache): T new tokens continuing `context` cached positions, one pass against key splits, with SDPA over the
same keys (a causal mask offset by the start) as a reference point. Each timed as a CUDA graph of 32 launches (one
per layer of a step), so the figure is the attention's share of one extend step.

    python -m bench.probes.extend_attention [--tokens 16,21,32,64] [--contexts 600,2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.probes.batch_gemv import graph_ms
from graph_executor.kernels.extend_attention import ExtendWorkspace, extend_attention

HEADS, HEAD_DIM, CACHE, LAYERS = 32, 128, 4096, 32


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,21,32,64")
    ap.add_argument("--contexts", default="600,2000")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    k, v = (torch.randn(HEADS, CACHE, HEAD_DIM, device=dev, dtype=torch.float16, generator=gen) for _ in range(2))
    workspace = ExtendWorkspace.allocate(HEADS, HEAD_DIM, CACHE, dev)
    rows = []
    print("| new tokens | cached | one pass ms/step | key splits ms/step | SDPA (masked) ms/step |\n"
          "|---|---|---|---|---|")
    for context in (int(c) for c in args.contexts.split(",")):
        for t in (int(x) for x in args.tokens.split(",")):
            q = torch.randn(t, HEADS, HEAD_DIM, device=dev, dtype=torch.float16, generator=gen)
            out = torch.empty_like(q)
            positions = torch.arange(context, context + t, device=dev)
            mask = torch.arange(context + t, device=dev)[None, :] <= positions[:, None]  # [T, S]

            def one_pass():
                for _ in range(LAYERS):
                    extend_attention(q, k, v, positions, out)

            def split():
                for _ in range(LAYERS):
                    extend_attention(q, k, v, positions, out, workspace=workspace)

            def sdpa():
                for _ in range(LAYERS):
                    F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None, :, :context + t],
                                                   v[None, :, :context + t], attn_mask=mask)

            row = {"tokens": t, "context": context, "one_pass_ms": graph_ms(one_pass), "split_ms": graph_ms(split),
                   "sdpa_ms": graph_ms(sdpa)}
            rows.append(row)
            print(f"| {t} | {context} | {row['one_pass_ms']:.3f} | {row['split_ms']:.3f} | {row['sdpa_ms']:.3f} |",
                  flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "extend_attention.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
