"""What structured output costs a token (45th session: built on the CPU machine; the GPU prediction is that a
structured request loses decode_ahead 2, ~2,300 against ~2,650 tokens/s on SmolLM2's shape).

One server (a model with SmolLM2's vocabulary and its tokenizer); requests alternate between plain greedy ones
(`ignore_eos`, as many tokens as asked) and ones held to a form that never ends before `max_tokens` (the regex
`[a-z ]*`: each token's mask is computed and applied, and the reply runs to the same length), then the same with a
JSON schema whose string runs long. Per mode: the JIT context's TTFT and token gap P50 / P99 (`Finished.timings`, no
client hop) and the client's tokens per second.

    python -m bench.probes.structured_cost --model dummy:smollm2-135m --tokenizer T [--device cuda] [--requests 20]
        [--max-num-seqs N]
"""

from __future__ import annotations

import argparse
import time

from bench.stats import gaps_ms, percentile
from graph_executor.loading.load_config import LoadConfig
from jit_context.speculative_config import SpeculativeConfig
from launch.client import Client
from launch.supervisor import ServerConfig, Supervisor

# A form that never ends before max_tokens, and a JSON schema whose one string runs long (its mask changes each
# token: the lexer's string state), each against the plain greedy reply of the same length.
FORMS = {"plain": None, "regex": {"regex": "[a-z ]*"},
         "json": {"json": {"type": "object", "required": ["text"], "additionalProperties": False,
                           "properties": {"text": {"type": "string"}}}}}


def one(client: Client, ids: list[int], tokens: int, form: dict | None) -> tuple[float, list[float], float]:
    """(JIT TTFT ms, JIT token gaps ms, client tokens per second after the first)."""
    params = {"max_tokens": tokens, "temperature": 0.0}
    params.update({"ignore_eos": True} if form is None else {"structured": form})
    stamps = []
    for msg in client.generate(token_ids=ids, params=params):
        stamps.append(time.perf_counter())
        timings = getattr(msg, "timings", None)
    stamps = stamps[:-1]  # the Finished message
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return timings["ttft_ms"], gaps_ms(timings["token_times_ms"]), rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="requests per mode (after 2 warm-ups each)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True, help="the tokenizer of the model's vocabulary")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-num-seqs", type=int, default=1,
                    help="the server's slots (1: the batch-1 loop; more: the batch engine, one request at a time)")
    args = ap.parse_args()
    load = LoadConfig(model=args.model, device=args.device, max_context=1024, progress=False,
                      max_num_seqs=args.max_num_seqs)
    sup = Supervisor(ServerConfig(load, tokenizer=args.tokenizer, speculation=SpeculativeConfig("off")))
    sup.start()
    sup.wait_ready()
    ids = list(range(1000, 1010))
    rows: dict[str, list] = {name: [] for name in FORMS}
    try:
        with Client(sup.address) as client:
            while client.status()["executor"]["graphs"].get("pending"):
                time.sleep(0.2)
            for name, form in FORMS.items():
                for _ in range(2):
                    one(client, ids, args.tokens, form)
            for _ in range(args.requests):
                for name, form in FORMS.items():
                    rows[name].append(one(client, ids, args.tokens, form))
    finally:
        sup.stop()
    print(f"| mode | JIT TTFT P50 ms | JIT token gap P50 / P99 ms | client tokens/s P50 |  ({args.requests} requests "
          f"each, alternating, {args.tokens} tokens, {args.model} on {args.device})")
    print("|---|---|---|---|")
    for name, got in rows.items():
        gaps = [g for _, request_gaps, _ in got for g in request_gaps]
        print(f"| {name} | {percentile([t for t, _, _ in got], 50):.3f} | {percentile(gaps, 50):.3f} / "
              f"{percentile(gaps, 99):.3f} | {percentile([r for _, _, r in got], 50):.0f} |")


if __name__ == "__main__":
    main()
