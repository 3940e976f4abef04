"""Issue 11: n-gram proposal rules compared offline, on a model's real greedy replies to the bench's speculative
prompts (bench/data/spec_prompts.json), without a GPU.

The replies are generated once, in process and without speculation (greedy, so they are what any speculating run
produces too); then each rule is replayed over them: at every step the rule proposes up to k tokens from the
sequence so far, the step keeps the proposals that match the reply and adds one token (a verify step), or adds one
token with no proposal (a decode step). Reported per prompt kind: verify steps, tokens per verify, acceptance, and
a modelled speed-up = tokens / (verifies x VERIFY_COST + decodes), where VERIFY_COST is a verify step's time in
decode steps (1.26 for SmolLM2-135M on an H200, flat in k: bench/NOTES.md, issue 11). The rules: `shipped`
(`NgramProposer`: the most recent earlier occurrence of the longest matching suffix with k tokens after it, else the
most recent) and `most-recent` (the rule before the sixteenth session), each at several k.

    python -m bench.probes.proposer_replay [--model M] [--device cpu] [--max-tokens 128] [--k 4,8,12,16]
"""

from __future__ import annotations

import argparse
import json

from bench.workloads import SPEC_PROMPTS
from graph_executor.loading import default_model
from graph_executor.loading.loader import LoadConfig
from jit_context.proposers import NgramProposer
from jit_context.request_side import PromptInput
from jit_context.sampling_params import SamplingParams
from jit_context.speculative_config import SpeculativeConfig
from launch.local import LocalEngine

VERIFY_COST = 1.26


def most_recent(seq: list[int], k: int, n_min: int = 2, n_max: int = 4) -> list[int]:
    """The rule before: what followed the most recent earlier occurrence of the longest matching suffix."""
    for n in range(min(n_max, len(seq) - 1), n_min - 1, -1):
        suffix = seq[-n:]
        for end in range(len(seq) - 2, n - 2, -1):
            if seq[end - n + 1:end + 1] == suffix:
                return seq[end + 1:end + 1 + k]
    return []


def shipped(seq: list[int], k: int) -> list[int]:
    proposer = NgramProposer()
    proposer.reset(seq)
    return proposer.propose(k)


def replay(rule, rows: list[dict], k: int) -> dict:
    tokens = verifies = decodes = drafted = accepted = 0
    for row in rows:
        prompt, reply = row["prompt"], row["reply"]
        pos = 0
        while pos < len(reply):
            proposal = rule(prompt + reply[:pos], k)
            kept = 0
            while kept < len(proposal) and pos + kept < len(reply) and proposal[kept] == reply[pos + kept]:
                kept += 1
            step = min(kept + 1, len(reply) - pos) if proposal else 1
            if proposal:
                verifies, drafted, accepted = verifies + 1, drafted + len(proposal), accepted + kept
            else:
                decodes += 1
            pos, tokens = pos + step, tokens + step
    cost = verifies * VERIFY_COST + decodes
    return {"tokens": tokens, "verifies": verifies, "acceptance": accepted / drafted if drafted else 0.0,
            "tokens_per_verify": (tokens - decodes) / verifies if verifies else 0.0, "speedup": tokens / cost}


def replies(model: str, device: str, max_tokens: int) -> dict[str, list[dict]]:
    engine = LocalEngine(LoadConfig(model=model, device=device, max_context=4096, progress=False),
                         speculation=SpeculativeConfig("off"))
    prompts = json.loads(SPEC_PROMPTS.read_text())
    out = {}
    for kind in ("grounded", "open"):
        out[kind] = []
        for text in prompts[kind]:
            ids = engine.side.prompt_ids(PromptInput(messages=[{"role": "user", "content": text}]))
            *_, result = engine.generator.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
            out[kind].append({"prompt": ids, "reply": result.token_ids})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded default model (SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", default="4,8,12,16", help="comma list of proposal lengths")
    args = ap.parse_args(argv)
    data = replies(args.model or str(default_model.gguf_path()), args.device, args.max_tokens)
    print(f"| prompts | rule | k | tokens | verify steps | tokens per verify | acceptance | modelled speed-up |  "
          f"(a verify = {VERIFY_COST} decode steps)")
    print("|---|---|---|---|---|---|---|---|")
    for kind, rows in data.items():
        for name, rule in (("most-recent", most_recent), ("shipped", shipped)):
            for k in (int(x) for x in args.k.split(",")):
                r = replay(rule, rows, k)
                print(f"| {kind} | {name} | {k} | {r['tokens']} | {r['verifies']} | {r['tokens_per_verify']:.2f} | "
                      f"{r['acceptance']:.3f} | {r['speedup']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
