"""Continuous batching's mixed step against the prefill alone, on a LLaMA-2-7B-shaped model with 4 KV slots: how
much a prompt chunk pays for the decode rows riding with it, and whether the row count matters to cuBLAS (a chunk
padded to 128 rows plus 4 decode rows is a GEMM of 132 rows; 124 + 4 is one of 128). Each step captured as a CUDA
graph and timed over replays; the GEMMs alone (torch.mm on one layer's weights) per row count after.

    python -m bench.probes.mixed_step [--model dummy:llama-2-7b] [--prompt 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.probes.batch_gemv import graph_ms
from graph_executor.fused_batch_decoder import FusedBatchDecoder
from graph_executor.fused_mixed import FusedMixedStep
from graph_executor.fused_prefill import FusedPrefill
from graph_executor.loading.loader import LoadConfig, load_model

REPLAYS = 30
SLOTS = 4
DECODE_POSITION = 300  # the running streams' context


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--prompt", type=int, default=100, help="valid prompt tokens in the chunk")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = load_model(LoadConfig(model=args.model, device="cuda", max_context=1024, max_num_seqs=SLOTS,
                                  progress=False)).model
    dev, vocab = model.embed_tokens.device, model.config.vocab_size
    prefill = FusedPrefill(model, 256 + SLOTS)
    mixed = FusedMixedStep(prefill, SLOTS)
    batch = FusedBatchDecoder(model, SLOTS)
    logits, batch_logits = torch.empty(vocab, device=dev), torch.empty(SLOTS, vocab, device=dev)
    index = torch.full((1,), args.prompt - 1, device=dev)
    rows: list[dict] = []

    def report(name: str, ms: float) -> None:
        rows.append({"step": name, "ms": ms})
        print(f"| {name} | {ms:.3f} |", flush=True)

    print("| step (graph replay) | ms |\n|---|---|", flush=True)
    tokens = torch.zeros(SLOTS, dtype=torch.int64, device=dev)
    positions = torch.full((SLOTS,), DECODE_POSITION, device=dev)
    which = torch.arange(SLOTS, device=dev)
    report(f"decode batch {SLOTS}", graph_ms(lambda: batch.step(tokens, positions, which, batch_logits), REPLAYS))
    for bucket in (128, 124, 104):
        if bucket < args.prompt:
            continue
        ids = torch.zeros(bucket, dtype=torch.int64, device=dev)
        pos = torch.arange(bucket, device=dev)
        if bucket in (128,):
            report(f"prefill {bucket} rows (SDPA, slot 0)", graph_ms(lambda: prefill.run(ids, pos, index, logits),
                                                                      REPLAYS))
            chunk_slots = torch.ones(bucket, dtype=torch.int64, device=dev)
            report(f"extend {bucket} rows (slot 1 from 0)", graph_ms(
                lambda: prefill.run(ids, pos, index, logits, from_cache=True, slots=chunk_slots), REPLAYS))
        t = bucket + SLOTS
        m_ids = torch.zeros(t, dtype=torch.int64, device=dev)
        m_pos = torch.cat([torch.arange(bucket, device=dev), torch.full((SLOTS,), DECODE_POSITION, device=dev)])
        # the chunk in slot 1, the decode rows in slots 0, 2, 3 (the 4th padding: row 0 again)
        m_slots = torch.cat([torch.ones(bucket, dtype=torch.int64, device=dev),
                             torch.tensor([0, 2, 3, 0], device=dev)[:SLOTS]])
        report(f"mixed {bucket} chunk + {SLOTS} decode = {t} rows", graph_ms(
            lambda: mixed.run(m_ids, m_pos, m_slots, bucket, index, [logits], batch_logits), REPLAYS))
    # The JIT context's greedy draw of the decode rows: one argmax per row, or one over the batch.
    next_token = torch.zeros(SLOTS, dtype=torch.int64, device=dev)
    report(f"greedy draw: {SLOTS} row argmaxes", graph_ms(lambda: [torch.argmax(
        batch_logits[b], dim=0, keepdim=True, out=next_token[b:b + 1]) for b in range(SLOTS)], REPLAYS * 10))
    report(f"greedy draw: one argmax over {SLOTS} rows", graph_ms(lambda: torch.argmax(
        batch_logits, dim=-1, out=next_token), REPLAYS * 10))
    print("\n| GEMM (one layer's weight) | rows | ms |\n|---|---|---|", flush=True)
    layer = model.layers[0]
    for name, w in (("qkv", layer.qkv_proj), ("gate_up", layer.gate_up_proj), ("down", layer.down_proj)):
        for m in (100, 104, 124, 128, 132, 160):
            x = torch.randn(m, w.shape[1], device=dev, dtype=w.dtype)
            out = torch.empty(m, w.shape[0], device=dev, dtype=w.dtype)
            ms = graph_ms(lambda: torch.mm(x, w.t(), out=out), REPLAYS * 10)
            rows.append({"gemm": name, "rows": m, "ms": ms})
            print(f"| {name} | {m} | {ms:.4f} |", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "mixed_step.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
