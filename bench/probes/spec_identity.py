"""Check: greedy tokens with speculation on equal plain decoding on the 8 shipped input-grounded prompts x N
tokens, for the n-gram and the draft method (the model drafting for itself), on any device. The CI tests run a
short version on the CPU (2 prompts x 20 tokens, time budget) and this full one on the GPU; this probe runs the
full one anywhere, e.g. once on the CPU machine.

    python -m bench.probes.spec_identity [--device cpu] [--tokens 128] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from graph_executor.loading.loader import LoadConfig
from jit_context.generator import Generator
from jit_context.sampling_params import SamplingParams
from jit_context.speculative_config import SpeculativeConfig
from launch.local import LocalEngine, PromptInput

PROMPTS = json.loads((Path(__file__).resolve().parents[1] / "data/spec_prompts.json").read_text())["grounded"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    load = LoadConfig(model=args.model, device=args.device, dtype="float32", max_context=1024, progress=False)
    engine = LocalEngine(load, draft_model=args.model, speculation=SpeculativeConfig("draft", 8, adaptive=False))
    plain = Generator(engine.runner, engine.tokenizer, engine.generator.eos_token_ids)
    ngram = Generator(engine.runner, engine.tokenizer, engine.generator.eos_token_ids,
                      speculation=SpeculativeConfig("ngram", 8))
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    same = 0
    for i, prompt in enumerate(PROMPTS):
        ids = engine.prompt_ids(PromptInput(messages=[{"role": "user", "content": prompt}]))
        start = time.perf_counter()
        base = list(plain.generate(ids, params))[-1].token_ids
        runs = {name: list(gen.generate(ids, params))[-1] for name, gen in (("ngram", ngram),
                                                                            ("draft", engine.generator))}
        ok = all(r.token_ids == base for r in runs.values())
        same += ok
        rates = ", ".join(f"{n} acceptance {r.speculation['acceptance_rate']}" for n, r in runs.items())
        print(f"prompt {i}: {len(base)} tokens, identical {ok} ({rates}; {time.perf_counter() - start:.0f} s)",
              flush=True)
    print(f"{same}/{len(PROMPTS)} prompts identical with ngram and draft speculation ({args.device}, float32, "
          f"{args.tokens} tokens)")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
