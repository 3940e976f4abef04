"""Probe: a verify step of k + 1 tokens against a decode step, as CUDA graph replays of the executor's own bodies
(`FusedVerify.run`, `FusedDecoder.step`), for a few multi-row GEMV plans side by side: which projections take the
fused multi-row kernel and which cuBLAS. Prints verify ms, decode ms and their ratio per plan and k.

    python -m bench.probes.verify_plan [--model dummy:llama-2-7b] [--context 512] [--tokens 2,5,9]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.floors import time_gpu
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.fused_verify import DEFAULT_ROWS_PLAN, SMALL_ROWS_PLAN, FusedVerify
from graph_executor.kernels.gemv_rows import RowsConfig
from graph_executor.kernels.prefill_plan import ROWS_16
from graph_executor.loading.loader import LoadConfig, load_model

_16 = ROWS_16  # the prefill step's 16-row configs (the verify step's rows pad to 16 too)
PLANS = {
    "default": DEFAULT_ROWS_PLAN,
    "o-rows-64x256": dataclasses.replace(DEFAULT_ROWS_PLAN, o=RowsConfig(64, 256, 4, 3)),
    # the multi-row GEMVs split along K (twenty-second session) where cuBLAS and row kernels run today
    "rows-qkv-o": dataclasses.replace(DEFAULT_ROWS_PLAN, qkv=_16.qkv, o=_16.o),
    "rows-all": SMALL_ROWS_PLAN,  # fused_verify's plan below hidden 2048
}


def graphed(fn) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--context", type=int, default=512, help="the first verify position (the KV length read)")
    ap.add_argument("--tokens", default="2,5,9", help="comma list of verify token counts (k + 1)")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    loaded = load_model(LoadConfig(model=args.model, device="cuda", dtype="float16",
                                   max_context=args.context + 16, progress=False))
    model, device = loaded.model, torch.device("cuda")
    vocab = model.config.vocab_size
    next_token = torch.zeros(1, dtype=torch.int64, device=device)
    position = torch.full((1,), args.context, dtype=torch.int64, device=device)
    logits = torch.empty(vocab, dtype=torch.float32, device=device)
    decoder = FusedDecoder(model)
    decode_ms = time_gpu(graphed(lambda: decoder.step(next_token, position, logits)).replay, device) * 1e3
    print(f"{loaded.name} on {torch.cuda.get_device_name()}: decode at context {args.context}: {decode_ms:.3f} ms")
    print("| plan | k + 1 | verify ms | verify / decode |")
    print("|---|---|---|---|")
    rows = torch.empty(max(tokens), vocab, dtype=torch.float32, device=device)
    for name, plan in PLANS.items():
        verifier = FusedVerify(model, max(tokens), plan)
        for t in tokens:
            ids = torch.randint(0, vocab, (t,), device=device)
            positions = torch.arange(args.context, args.context + t, device=device)
            graph = graphed(lambda: verifier.run(ids, positions, rows[:t]))  # noqa: B023 - replayed right here
            ms = time_gpu(graph.replay, device) * 1e3
            print(f"| {name} | {t} | {ms:.3f} | {ms / decode_ms:.3f} |")


if __name__ == "__main__":
    main()
