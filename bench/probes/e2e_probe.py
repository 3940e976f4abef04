"""Where does the two-process TTFT go? Client-side TTFT vs the JIT context's own timings (queue, prefill
enqueued, first token) vs the in-process engine, for short prompts, on one GPU in one run.

    python -m bench.probes.e2e_probe [--model dummy:llama-2-7b] [--mps auto]
"""

from __future__ import annotations

import argparse
import time

from bench.stats import gaps_ms, percentile
from graph_executor.loading.loader import LoadConfig
from jit_context.sampling_params import SamplingParams
from launch.client import Client
from launch.local import LocalEngine
from launch.supervisor import ServerConfig, Supervisor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--mps", default="auto")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    load = LoadConfig(model=args.model, device="cuda", dtype="float16", max_context=1024, progress=False)
    sup = Supervisor(ServerConfig(load, mps=args.mps))
    sup.start()
    sup.wait_ready()
    ids = list(range(1000, 1010))
    params = {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    rows = []
    try:
        with Client(sup.address) as client:
            while client.status()["executor"]["graphs"].get("pending"):
                time.sleep(0.2)
            for _ in range(args.repeats + 2):
                start = time.perf_counter()
                first = None
                for msg in client.generate(token_ids=ids, params=params):
                    first = first or time.perf_counter()
                    timings = getattr(msg, "timings", None)
                rows.append(((first - start) * 1e3, timings))
            decode = list(client.generate(token_ids=ids, params={**params, "max_tokens": 200}))[-1].timings
    finally:
        sup.stop()
    local = LocalEngine(load)
    local_ttft = []
    for _ in range(args.repeats + 2):
        *_, result = local.generator.generate(ids, SamplingParams(**params))
        local_ttft.append(result.ttft_ms)
    med = lambda xs: percentile(xs[2:], 50)  # noqa: E731 - the first two runs warm up
    print(f"mps={sup.mps.running if sup.mps else None} reason={sup.mps.reason if sup.mps else ''}")
    print("| measure (10-token prompt, 1 token) | median ms |")
    print("|---|---|")
    print(f"| client TTFT (two processes) | {med([r[0] for r in rows]):.3f} |")
    print(f"| JIT ttft (receipt -> token on host) | {med([r[1]['ttft_ms'] for r in rows]):.3f} |")
    print(f"| JIT queue | {med([r[1]['queue_ms'] for r in rows]):.3f} |")
    print(f"| JIT prefill enqueued | {med([r[1]['prefill_enqueued_ms'] for r in rows]):.3f} |")
    print(f"| in-process TTFT | {med(local_ttft):.3f} |")
    gaps = gaps_ms(decode["token_times_ms"])
    print(f"JIT-side decode gaps over 200 tokens: p50 {percentile(gaps, 50):.3f} p99 {percentile(gaps, 99):.3f} "
          f"max {max(gaps):.3f}")


if __name__ == "__main__":
    main()
