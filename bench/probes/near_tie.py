"""Probe: how near to ties a greedy run's choices are (issue 14: a request's greedy tokens in a batch must equal its
tokens alone, which only holds where no step is a near-tie between two tokens). Generates greedily on --device with
the executor's own steps (the fused graphs on a GPU), then runs the prompt and those tokens through the same weights
in float32 on the CPU in one teacher-forced pass, and prints each step's float32 top-two margin and whether float32
would have chosen the same token.

    python -m bench.probes.near_tie --model M.gguf --prompt "The quick brown fox" [--max-tokens 44]
        [--device cuda] [--row-warps 2] [--dequantize] [--show 8]

`--row-warps N`: decode attention's warps for one row and for a batch's rows (graph_executor/kernels/decode_attention.py
ROW_WARPS / BATCH_WARPS; by default by the query's width) for this run, to see which choices a kernel setting moves.
"""

from __future__ import annotations

import argparse

import torch

from graph_executor.loading.loader import LoadConfig, load_model
from jit_context.sampling_params import SamplingParams
from launch.local import LocalEngine


def margins(model, ids: list[int], prompt_len: int) -> tuple[list[int], list[float]]:
    """Float32 argmax and top-two margin at each generated position (after token prompt_len - 1 + i)."""
    n = len(ids)
    rows = torch.arange(prompt_len - 1, n - 1)  # the positions whose next token was generated
    with torch.inference_mode():
        logits = model(torch.tensor(ids), torch.arange(n), rows, n).float()  # [steps, V]
    top = logits.topk(2, dim=-1)
    return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a model reference (GGUF path, HF folder, dummy:<preset>)")
    ap.add_argument("--prompt", default="The quick brown fox", help="the prompt, tokenized without a chat template")
    ap.add_argument("--max-tokens", type=int, default=44)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dequantize", action="store_true", help="a GGUF dequantized at load (as the cuda test runs it)")
    ap.add_argument("--row-warps", type=int, default=None, help="decode attention's warps for this run")
    ap.add_argument("--show", type=int, default=8, help="print the steps with the smallest margins (default: 8)")
    args = ap.parse_args(argv)
    if args.row_warps is not None:
        from graph_executor.kernels import decode_attention

        decode_attention.ROW_WARPS = decode_attention.BATCH_WARPS = args.row_warps
    engine = LocalEngine(LoadConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    dequantize=args.dequantize, max_context=512, progress=False))
    prompt = engine.tokenizer.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    tokens = list(engine.generator.generate(prompt, params))[-1].token_ids
    del engine
    reference = load_model(LoadConfig(model=args.model, device="cpu", dtype="float32", dequantize=args.dequantize,
                                      max_context=512, progress=False)).model
    want, gaps = margins(reference, prompt + tokens, len(prompt))
    differ = [i for i, (t, w) in enumerate(zip(tokens, want)) if t != w]
    print(f"{args.device} greedy ({len(tokens)} tokens, row warps {args.row_warps or 'default'}) against float32 on "
          f"the CPU: {len(differ)} step(s) choose differently {differ[:10]}")
    print("| step | token | float32 argmax | float32 top-two margin |")
    print("|---|---|---|---|")
    for i in sorted(range(len(tokens)), key=lambda i: gaps[i])[:args.show]:
        print(f"| {i} | {tokens[i]} | {want[i]} | {gaps[i]:.4f} |")


if __name__ == "__main__":
    main()
