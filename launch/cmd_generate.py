"""`hybridrt generate`: one prompt in, streamed text (or one JSON object) out.

By default it starts an ephemeral pair of runtime processes (graph executor + JIT context) and talks to them
through the native client; `--connect` uses a running `hybridrt serve`; `--in-process` runs both parts in
this process (no sockets).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, replace

from ipc.messages import PromptLogprobsChunk
from launch.options import (
    add_api_key_flag,
    add_model_flags,
    add_sampling_flags,
    add_speculative_flags,
    add_step_timeout_flag,
    add_tensor_parallel_flag,
    chat_template,
    load_config,
    sampling_params,
    server_address,
    speculative_config,
    tensor_parallel,
)


@dataclass(frozen=True)
class Outcome:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_ms: float
    tokens_per_s: float
    weight_format: str = ""
    speculation: dict | None = None  # what speculation did (acceptance rate, ...), None when off
    logprobs: list | None = None  # TokenLogprob per token of the reply's text, with --logprobs
    prompt_logprobs: list | None = None  # None, then TokenLogprob per later prompt token, with --prompt-logprobs


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a completion for one prompt",
                       description="Generate a completion for one prompt and stream it to stdout. Instruct "
                                   "models get their chat template unless --no-chat-template.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text; - reads it from stdin")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object at the end (text, token_ids, finish_reason, prompt_tokens, "
                        "ttft_ms, tokens_per_s, weight_format, speculation: its acceptance rate and counts; "
                        "logprobs with --logprobs, prompt_logprobs with --prompt-logprobs) instead of streaming "
                        "text")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each generated token's log-probability and its N most likely alternatives "
                        "(0-20), under the model's raw distribution (as the API's logprobs)")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="with --json: each prompt token's log-probability given the tokens before it (the first "
                        "has none: null) and its N most likely alternatives there (0-20), under the model's raw "
                        "distribution (vLLM's prompt_logprobs); the prompt then runs whole, without prefix reuse")
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    p.add_argument("--system", default=None, help="system message (chat models)")
    p.add_argument("--connect", metavar="ADDR", default=None, type=server_address,
                   help="address of a running `hybridrt serve` (e.g. tcp://127.0.0.1:7461); the model flags "
                        "are then ignored")
    p.add_argument("--in-process", action="store_true",
                   help="run executor and JIT context in this process instead of two processes")
    add_step_timeout_flag(p, note="; not used with --in-process or --connect")
    add_api_key_flag(p)
    add_sampling_flags(p, default_temperature=0.0)
    add_speculative_flags(p)
    add_tensor_parallel_flag(p)
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_params(args)  # validate flags before the (slow) model load
    if args.logprobs is not None:
        if not args.json:
            raise ValueError("--logprobs prints them in the --json object: give --json too")
        params = replace(params, logprobs=args.logprobs)
    if args.prompt_logprobs is not None:
        if not args.json:
            raise ValueError("--prompt-logprobs prints them in the --json object: give --json too")
        params = replace(params, prompt_logprobs=args.prompt_logprobs)
    args.ranks = tensor_parallel(args)
    if args.ranks > 1 and (args.in_process or args.connect):
        raise ValueError("--tensor-parallel starts its own server's ranks: not with --in-process or --connect")
    args.speculation = speculative_config(args)
    template = chat_template(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [{"role": "user", "content": prompt}]
    if args.system is not None:
        messages.insert(0, {"role": "system", "content": args.system})
    stream = print_stream if not args.json else (lambda text: None)
    if args.in_process:
        outcome = run_in_process(args, prompt, messages, params, stream, template)
    else:
        outcome = run_through_server(args, prompt, messages, params, stream, template)
    if args.json:
        print(json.dumps({"text": outcome.text, "token_ids": outcome.token_ids,
                          "finish_reason": outcome.finish_reason, "prompt_tokens": outcome.prompt_tokens,
                          "ttft_ms": round(outcome.ttft_ms, 3), "tokens_per_s": round(outcome.tokens_per_s, 2),
                          "weight_format": outcome.weight_format, "speculation": outcome.speculation,
                          **({"logprobs": [dataclasses.asdict(e) for e in outcome.logprobs]}
                             if outcome.logprobs is not None else {}),
                          **({"prompt_logprobs": [e and dataclasses.asdict(e) for e in outcome.prompt_logprobs]}
                             if outcome.prompt_logprobs is not None else {})}))
    else:
        sys.stdout.write("\n")
    return 0


def print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_in_process(args, prompt, messages, params, stream, template: str | None) -> Outcome:
    from launch.local import LocalEngine, PromptInput

    engine = LocalEngine(load_config(args), args.tokenizer, chat_template=template, speculation=args.speculation,
                         draft_model=args.draft_model)
    loaded = engine.loaded
    if not args.quiet:
        what = " (first run: converted and cached the default model)" if loaded.converted_default else ""
        print(f"loaded {loaded.name} [{loaded.source}, {loaded.model.device}, {loaded.weight_format}] in "
              f"{loaded.load_seconds:.1f} s{what}",
              file=sys.stderr)
    start = time.perf_counter()
    use_chat = not args.no_chat_template and engine.tokenizer is not None and engine.tokenizer.has_chat_template
    inp = PromptInput(messages=messages) if use_chat else PromptInput(prompt=prompt, use_chat_template=False)
    for item in engine.generator.generate(engine.prompt_ids(inp), params, start_time=start):
        if hasattr(item, "finish_reason"):
            r = item
        elif hasattr(item, "text"):  # (not the prompt's scores: they are in the result)
            stream(item.text)
    return Outcome(r.text, r.token_ids, r.finish_reason, r.prompt_tokens, r.ttft_ms, r.tokens_per_s,
                   loaded.weight_format, r.speculation, r.logprobs, r.prompt_logprobs)


def run_through_server(args, prompt, messages, params, stream, template: str | None) -> Outcome:
    from launch.client import Client
    from launch.supervisor import ServerConfig, Supervisor

    supervisor = None
    address = args.connect
    if address is None:
        # If this process dies, the ephemeral pair goes with it (see launch.supervisor).
        supervisor = Supervisor(ServerConfig(load_config(args), tokenizer=args.tokenizer, chat_template=template,
                                             step_timeout_s=args.step_timeout, speculation=args.speculation,
                                             draft_model=args.draft_model, tensor_parallel=args.ranks))
    try:
        if supervisor:
            supervisor.start()  # inside the try: a failure half-way still stops what did start
        with Client(address or supervisor.address, api_key=args.api_key) as client:
            facts = supervisor.wait_ready() if supervisor else client.status()
            if not args.quiet and supervisor:  # what serve prints at ready (model, device, dtype, format, ...)
                from launch.cmd_serve import ready_line

                print(ready_line(facts, supervisor.ready_seconds), file=sys.stderr)
            use_chat = not args.no_chat_template and facts.get("chat_template")
            outcome = stream_request(client, prompt if not use_chat else None, messages if use_chat else None,
                                     params, stream)
            return replace(outcome, weight_format=facts.get("executor", {}).get("weight_format", ""))
    finally:
        if supervisor:
            supervisor.stop()


def stream_request(client, prompt, messages, params, stream) -> Outcome:
    start = time.perf_counter()
    first = None
    logprobs = [] if params.logprobs is not None else None
    prompt_logprobs = [None] if params.prompt_logprobs is not None else None
    for msg in client.generate(prompt, messages=messages, params=params):
        if isinstance(msg, PromptLogprobsChunk):
            prompt_logprobs += msg.prompt_logprobs
            continue
        if first is None:
            first = time.perf_counter()
        if hasattr(msg, "finish_reason"):
            usage, timings = msg.usage, msg.timings
            return Outcome(msg.text, msg.token_ids, msg.finish_reason, usage.get("prompt_tokens", 0),
                           (first - start) * 1e3, timings.get("tokens_per_s", 0.0),
                           speculation=timings.get("speculation"), logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        if logprobs is not None:
            logprobs += getattr(msg, "logprobs", [])  # a LogprobsChunk's
        stream(msg.text)
    raise RuntimeError("the stream ended without a Finished message")
