"""TTFT against the idle time before a request (issues 12 and 13): the bench's steady-state TTFT comes from
back-to-back requests, a user's from requests after a pause. One server, warmed with back-to-back requests, then
requests after each gap; prints per gap the median client TTFT, the JIT context's own, and the stages of the way to
the prefill (`ttft`), so that a slower request after a pause shows which hop pays for it.

    python -m bench.probes.idle_gap --model dummy:smollm2-135m --device cuda [--prompt 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from graph_executor.loading.load_config import LoadConfig
from ipc.messages import Finished
from jit_context.speculative_config import SpeculativeConfig
from launch.client import Client
from launch.supervisor import ServerConfig, Supervisor

GAPS_S = (0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 3.0)


STAGES = ("client TTFT", "JIT context's own TTFT", "its queue", "prefill sent", "executor took it",
          "graph launched", "JIT context saw it queued")


def ttft(client: Client, prompt: list[int]) -> tuple[float, ...]:
    """One token generated: the client's TTFT, then the JIT context's TTFT and the stages of its way to the prefill,
    in ms from the request's arrival in the JIT context (STAGES): its queue, the last prefill chunk sent, the
    executor's taking it up and its graph launched (the executor's status facts, on the same clock), and the JIT
    context seeing it queued. TTFT - the last is the prefill on the card and the first token's sampling and read-back."""
    start = time.perf_counter()
    first = None
    for msg in client.generate(token_ids=prompt, params={"max_tokens": 1, "temperature": 0.0, "ignore_eos": True}):
        first = first or (time.perf_counter() - start) * 1e3
        if isinstance(msg, Finished):
            t = msg.timings
            last = client.status()["executor"].get("last_prefill", {})
            received = t["received_at_s"]

            def since(key: str) -> float:
                return (last[key] - received) * 1e3 if key in last else float("nan")

            return (first, t["ttft_ms"], t["queue_ms"], t.get("prefill_sent_ms", float("nan")),
                    since("handled_at_s"), since("launched_at_s"), t["prefill_enqueued_ms"])
    raise RuntimeError("no Finished message")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=100, help="prompt tokens (default 100)")
    ap.add_argument("--repeats", type=int, default=5, help="requests per gap (default 5)")
    args = ap.parse_args(argv)
    load = LoadConfig(model=args.model, device=args.device, max_context=1024, progress=False)
    supervisor = Supervisor(ServerConfig(load, speculation=SpeculativeConfig("off")))
    prompt = list(range(200, 200 + args.prompt))
    try:
        supervisor.start()
        supervisor.wait_ready()
        with Client(supervisor.address) as client:
            time.sleep(3.0)  # the idle-time captures end
            for _ in range(20):
                ttft(client, prompt)
            print("| idle before the request (ms) | " + " | ".join(f"{name} (ms)" for name in STAGES)
                  + " | after that: prefill, sampling, read-back (ms) |")
            print("|---" * (len(STAGES) + 2) + "|")
            for gap in GAPS_S:
                results = []
                for _ in range(args.repeats):
                    ttft(client, prompt)  # the same state before each gap: right after a request
                    time.sleep(gap)
                    results.append(ttft(client, prompt))
                cols = [statistics.median(r[i] for r in results) for i in range(len(STAGES))]
                rest = statistics.median(r[1] - r[-1] for r in results)
                print(f"| {gap * 1e3:.0f} | " + " | ".join(f"{c:.2f}" for c in cols) + f" | {rest:.2f} |", flush=True)
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
