"""The whole batched decode step (`FusedBatchDecoder`) on a LLaMA-2-7B-shaped model, per block plan and batch size,
against the batch-1 step (`FusedDecoder`) in the same process: each captured as a CUDA graph at context ~300 and
timed over replays. Plans: the tensor-core GEMVs (`TENSOR_CORE`), cuBLAS for o_proj and down_proj, cuBLAS
everywhere (the default).

    python -m bench.probes.batch_step [--model dummy:llama-2-7b] [--batches 1,2,4] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bench.probes.batch_gemv import graph_ms
from graph_executor.fused_batch_decoder import FusedBatchDecoder
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.kernels.gemv_batch import CUBLAS, TENSOR_CORE, BatchGemvPlan
from graph_executor.loading.loader import LoadConfig, load_model

REPLAYS = 50
POSITION = 300


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--blas", default="",
                    help="also time the default plan under these BLAS back ends (comma list of torch's "
                         "preferred_blas_library names: cublas, cublaslt), each with reduced-precision fp16 "
                         "reductions allowed (torch's default) and not")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    slots = max(batches)
    model = load_model(LoadConfig(model=args.model, device="cuda", max_context=512, max_num_seqs=slots,
                                  progress=False)).model
    dev, vocab = model.embed_tokens.device, model.config.vocab_size
    plans = {"tensor-core": TENSOR_CORE,
             "cublas o+down": dataclasses.replace(TENSOR_CORE, o=CUBLAS, down=CUBLAS),
             "cublas (default)": BatchGemvPlan()}
    rows = []
    one = FusedDecoder(model)
    token, position = torch.zeros(1, dtype=torch.int64, device=dev), torch.full((1,), POSITION, device=dev)
    logits1 = torch.empty(vocab, device=dev)
    ms = graph_ms(lambda: one.step(token, position, logits1), REPLAYS)
    rows.append({"plan": "batch-1 step", "batch": 1, "ms": ms})
    print(f"| plan | batch | ms/step | ms per sequence-token | vs batch-1 |\n|---|---|---|---|---|\n"
          f"| batch-1 step | 1 | {ms:.3f} | {ms:.3f} | 1.000 |", flush=True)
    base = ms

    def time_batches(name: str, decoder: FusedBatchDecoder) -> None:
        """One row per batch size: the decoder's step captured and replayed."""
        for b in batches:
            tokens = torch.zeros(b, dtype=torch.int64, device=dev)
            positions = torch.full((b,), POSITION, device=dev)
            which = torch.arange(b, device=dev)
            logits = torch.empty(b, vocab, device=dev)
            ms = graph_ms(lambda: decoder.step(tokens, positions, which, logits), REPLAYS)
            rows.append({"plan": name, "batch": b, "ms": ms})
            print(f"| {name} | {b} | {ms:.3f} | {ms / b:.3f} | {ms / base:.3f} |", flush=True)

    for name, plan in plans.items():
        time_batches(name, FusedBatchDecoder(model, slots, plan=plan))
    # cuBLAS picks its kernel per shape by heuristics; at 2-4 rows the choice (and whether it may split K with
    # reduced-precision reductions) decides most of the batched step's cost over the batch-1 GEMVs.
    matmul = torch.backends.cuda.matmul
    before = (torch.backends.cuda.preferred_blas_library(), matmul.allow_fp16_reduced_precision_reduction)
    for lib in filter(None, args.blas.split(",")):
        for reduced in (True, False):
            torch.backends.cuda.preferred_blas_library(lib)
            matmul.allow_fp16_reduced_precision_reduction = reduced
            time_batches(f"cublas plan, {lib}{'' if reduced else ', full-precision reductions'}",
                         FusedBatchDecoder(model, slots))
    torch.backends.cuda.preferred_blas_library(before[0])
    matmul.allow_fp16_reduced_precision_reduction = before[1]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "batch_step.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
