"""What scoring a prompt costs (`SamplingParams.prompt_logprobs`, the completions API's echo with logprobs: 47th
session, built on the CPU machine; the scoring step runs the reference forward eagerly, every row's logits a block at
a time, where a plain prompt takes its prefill graph).

One server; per prompt length, requests alternate between a plain one and one that scores its prompt (top 1, as
lm-evaluation-harness asks), each generating one token: the JIT context's TTFT (`Finished.timings`, no client hop) and
the client's whole request, P50 over the rounds, and the scored prompt's rows per second.

    python -m bench.probes.prompt_scoring --model dummy:smollm2-135m [--device cuda] [--lengths 100,500,2000]
        [--requests 10] [--max-num-seqs N]
"""

from __future__ import annotations

import argparse
import time

from bench.stats import percentile
from graph_executor.loading.load_config import LoadConfig
from jit_context.speculative_config import SpeculativeConfig
from launch.client import Client
from launch.supervisor import ServerConfig, Supervisor


def one(client: Client, ids: list[int], scored: bool) -> tuple[float, float]:
    """(JIT TTFT ms, the client's whole request ms) of a one-token request, its prompt scored or not."""
    params = {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True, **({"prompt_logprobs": 1} if scored else {})}
    start = time.perf_counter()
    *_, finished = client.generate(token_ids=ids, params=params)
    return finished.timings["ttft_ms"], (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lengths", default="100,500,2000", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--requests", type=int, default=10, help="rounds per length (after one warm-up each way)")
    ap.add_argument("--max-num-seqs", type=int, default=1, help="the server's slots")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    load = LoadConfig(model=args.model, device=args.device, max_context=max(lengths) + 64, progress=False,
                      max_num_seqs=args.max_num_seqs)
    sup = Supervisor(ServerConfig(load, speculation=SpeculativeConfig("off")))
    sup.start()
    sup.wait_ready()
    rows = []
    try:
        with Client(sup.address) as client:
            while client.status()["executor"]["graphs"].get("pending"):
                time.sleep(0.2)
            for n in lengths:
                ids = [100 + (7 * i) % 20000 for i in range(n)]
                got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                for scored in (False, True):
                    one(client, ids, scored)
                for _ in range(args.requests):
                    for scored in (False, True):
                        got[scored].append(one(client, ids, scored))
                rows.append((n, got))
    finally:
        sup.stop()
    print(f"| prompt tokens | plain TTFT P50 ms | scored TTFT P50 ms | plain request P50 ms | scored request P50 ms | "
          f"scored rows / s |  ({args.requests} rounds, alternating, {args.model} on {args.device})")
    print("|---|---|---|---|---|---|")
    for n, got in rows:
        plain_ttft, scored_ttft = (percentile([t for t, _ in got[s]], 50) for s in (False, True))
        plain_all, scored_all = (percentile([w for _, w in got[s]], 50) for s in (False, True))
        print(f"| {n} | {plain_ttft:.3f} | {scored_ttft:.3f} | {plain_all:.3f} | {scored_all:.3f} | "
              f"{(n - 1) / scored_all * 1e3:.0f} |")


if __name__ == "__main__":
    main()
