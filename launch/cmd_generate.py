"""`hybridrt generate`: one prompt in, streamed text (or one JSON object) out."""

from __future__ import annotations

import argparse
import json
import sys
import time

from launch.options import add_model_flags, add_sampling_flags, load_config, sampling_params


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt",
                       description="Generate a completion for one prompt and stream it to stdout. Instruct "
                                   "models get their chat template unless --no-chat-template.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; - reads it from stdin")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (text, token_ids, finish_reason, prompt_tokens, "
                        "ttft_ms, tokens_per_s) instead of streaming text")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.add_argument("--system", default=None, help="system message (chat models)")
    add_sampling_flags(p, default_temperature=0.0)
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from launch.local import LocalEngine, PromptInput

    params = sampling_params(args)  # validate flags before the (slow) model load
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = LocalEngine(load_config(args), args.tokenizer)
    loaded = engine.loaded
    if not args.quiet:
        what = " (first run: converted and cached the default model)" if loaded.converted_default else ""
        print(f"loaded {loaded.name} [{loaded.source}, {loaded.model.embed_tokens.device}, "
              f"{str(loaded.model.dtype).removeprefix('torch.')}] in {loaded.load_seconds:.1f} s{what}",
              file=sys.stderr)
    start = time.perf_counter()
    if args.system is not None and not args.no_chat_template:
        inp = PromptInput(messages=[{"role": "system", "content": args.system}, {"role": "user", "content": prompt}])
    else:
        inp = PromptInput(prompt=prompt, use_chat_template=not args.no_chat_template)
    ids = engine.prompt_ids(inp)
    result = None
    for item in engine.generator.generate(ids, params, start_time=start):
        if hasattr(item, "finish_reason"):
            result = item
        elif not args.json:
            sys.stdout.write(item.text)
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "ttft_ms": round(result.ttft_ms, 3),
                          "tokens_per_s": round(result.tokens_per_s, 2)}))
    else:
        sys.stdout.write("\n")
    return 0
