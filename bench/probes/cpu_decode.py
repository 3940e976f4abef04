"""CPU decode speed on the default model: hybridrt's in-process loop vs transformers `generate`, one run.

    python -m bench.probes.cpu_decode [--tokens 128] [--repeats 3]

Same prompt, same greedy tokens (EOS ignored on both sides), same thread count. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from graph_executor.loading.default_model import gguf_path
from graph_executor.loading.loader import LoadConfig
from jit_context.sampling_params import SamplingParams
from launch.local import LocalEngine, PromptInput

PROMPT = "Explain in a few sentences how a CPU cache works."


def time_ours(engine: LocalEngine, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    *_, result = engine.generator.generate(ids, params)
    return time.perf_counter() - start, result.token_ids


def time_hf(model, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=2)
    return time.perf_counter() - start, out[0, len(ids):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    engine = LocalEngine(LoadConfig(device="cpu", dtype="float32", progress=False))
    path = gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = engine.prompt_ids(PromptInput(prompt=PROMPT))
    time_ours(engine, ids, 4), time_hf(hf, ids, 4)  # warm-up
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        t, ours_ids = time_ours(engine, ids, args.tokens)
        ours.append(t)
        t, hf_ids = time_hf(hf, ids, args.tokens)
        theirs.append(t)
    same = ours_ids == hf_ids
    o, h = statistics.median(ours), statistics.median(theirs)
    print(f"SmolLM2-135M-Instruct fp32, CPU ({torch.get_num_threads()} threads), prompt {len(ids)} tokens, "
          f"{args.tokens} new tokens, median of {args.repeats}; identical token ids: {same}")
    print("| engine | time (s) | tokens/s |")
    print("|---|---|---|")
    print(f"| hybridrt (in-process) | {o:.2f} | {args.tokens / o:.1f} |")
    print(f"| transformers generate | {h:.2f} | {args.tokens / h:.1f} |")
    print(f"ratio hybridrt/transformers tokens/s: {h / o:.2f}")


if __name__ == "__main__":
    main()
