"""The decode attention (`kernels/decode_attention.py`, split + reduce) of a whole LLaMA-2-7B step: 32 layers of 32
heads of 128, each layer its own KV cache (nothing stays in L2), for 1 and 4 rows (the batched step: one KV slot per
row) at a few contexts, per split size and warp count of the split kernel, timed as a CUDA graph of the 32 layers.
Against it, the bytes the step must read (each row's keys and values up to its position) at the card's bandwidth.

Why (issue 14): in the batched step of 4 rows at context 300, attention costs ~0.23 ms more than at one row, of which
the 3 more slots' K/V are ~0.10 ms of reads (`bench.probes.graph_gaps`). The split kernel's grid is heads x splits x
rows, splits counted for the whole cache (empty ones exit at once): 4 rows make 4x the programs, most of them empty.

    python -m bench.probes.decode_attention [--rows 1,4] [--contexts 300,1000,2000] [--max-context 768,4096]
        [--splits default,32,64,128] [--warps 1,2,4] [--kv-heads 8]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench.probes.batch_gemv import graph_ms
from graph_executor.kernels.decode_attention import DecodeAttention

HEADS, HEAD_DIM, LAYERS = 32, 128, 32
BANDWIDTH_TBPS = 4.3  # what the H200's weight reads measure (DESIGN.md); the floor column uses it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--contexts", default="300,1000,2000")
    ap.add_argument("--max-context", default="768,4096", help="cache lengths (the split count follows them)")
    ap.add_argument("--splits", default="32,64,128",
                    help="positions per split (comma list); \"default\": DecodeAttention's own split and warps")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--reduce", default="fused,kernel",
                    help="how the splits are combined (comma list): fused (the split kernel's last program per query "
                         "head) or kernel (a reduce kernel after it)")
    ap.add_argument("--kv-heads", type=int, default=HEADS,
                    help="KV heads (32: LLaMA-2-7B; 8: Llama-3-8B's grouped-query attention, where one row also "
                         "runs the verify step's kernel, one program per KV head for its whole group)")
    ap.add_argument("--verify-tokens", type=int, default=0,
                    help="also time a speculative verify step's attention of this many tokens (one sequence, "
                         "consecutive positions ending at the context) per split size: the verify kernel, one program "
                         "per KV head")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run under TRITON_INTERPRET=1
    args = ap.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    rows, contexts, caches = ints(args.rows), ints(args.contexts), ints(args.max_context)
    dev = torch.device(args.device)
    kvh = args.kv_heads
    print("| cache | rows | context | kernel | split | warps | reduce | ms/step | reads floor ms | x floor |\n"
          "|---|---|---|---|---|---|---|---|---|---|", flush=True)
    reduces = args.reduce.split(",")
    verify_splits = sorted({int(x) for x in args.splits.split(",") if x != "default"})

    def time_verify_kernel(kv: torch.Tensor, q: torch.Tensor, out: torch.Tensor, positions: torch.Tensor, row: str,
                           floor: float) -> None:
        """The verify step's kernel (one program per KV head and split; its own reduce kernel) over q [T, heads,
        hd] at `positions`, one table row per split size, each starting with `row`."""
        for split in verify_splits:
            attention = DecodeAttention(HEADS, kvh, HEAD_DIM, kv.shape[4], kv.device, split_size=split,
                                        max_tokens=max(2, q.shape[0]))

            def step(attention=attention):
                for layer in range(LAYERS):
                    attention(q, kv[0, layer, 0], kv[0, layer, 1], positions, out)

            ms = graph_ms(step)
            print(f"{row} | {split} | - | kernel | {ms:.3f} | {floor:.3f} | {ms / floor:.1f} |", flush=True)
    for cache in caches:
        slots = max(rows)
        kv = torch.randn(slots, LAYERS, 2, kvh, cache, HEAD_DIM, device=dev, dtype=torch.float16)
        for b, context in itertools.product(rows, (c for c in contexts if c < cache)):
            q = torch.randn(b, HEADS, HEAD_DIM, device=dev, dtype=torch.float16)
            out = torch.empty_like(q)
            positions = torch.full((b,), context, device=dev)
            which = torch.arange(b, device=dev)
            floor = b * (context + 1) * LAYERS * 2 * kvh * HEAD_DIM * 2 / (BANDWIDTH_TBPS * 1e12) * 1e3
            configs = [(None, None)] * ("default" in args.splits.split(",")) + list(itertools.product(
                [int(x) for x in args.splits.split(",") if x != "default"], ints(args.warps)))
            for (split, warps), reduce in itertools.product(configs, reduces):
                attention = DecodeAttention(HEADS, kvh, HEAD_DIM, cache, dev, split_size=split, max_tokens=slots,
                                            batched=True, num_warps=warps, fused_reduce=reduce == "fused")
                split, warps = attention.split, attention.warps.get("num_warps", 4)

                def step(attention=attention, kv=kv, q=q, out=out, positions=positions, which=which):
                    for layer in range(LAYERS):
                        attention(q, kv[0, layer, 0], kv[0, layer, 1], positions, out, slots=which,
                                  slot_stride=kv.stride(0))

                ms = graph_ms(step)
                print(f"| {cache} | {b} | {context} | per head | {split} | {warps} | {reduce} | {ms:.3f} | "
                      f"{floor:.3f} | {ms / floor:.1f} |", flush=True)
            if b == 1 and kvh < HEADS:  # one row of a GQA model: the verify kernel, each K/V tile read once
                time_verify_kernel(kv, q, out, positions, f"| {cache} | 1 | {context} | per KV head (verify's)", floor)
            if b == 1 and args.verify_tokens > 1:
                t = args.verify_tokens
                qv = torch.randn(t, HEADS, HEAD_DIM, device=dev, dtype=torch.float16)
                time_verify_kernel(kv, qv, torch.empty_like(qv), torch.arange(context - t + 1, context + 1, device=dev),
                                   f"| {cache} | {t} tokens | {context} | verify (per KV head)", floor)
        del kv
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
