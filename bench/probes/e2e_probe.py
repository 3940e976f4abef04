"""Where does the two-process TTFT go? Client-side TTFT vs the JIT context's own timings (queue, prefill
enqueued, first token) vs the in-process engine, for short prompts, on one GPU in one run.

    python -m bench.probes.e2e_probe [--model dummy:llama-2-7b] [--mps auto] [--doorbell off,on] [--prompts 10,100]
        [--idle-spin-ms 0,20]

Each prompt length is timed on the same server (and in-process engine), requests back to back: client TTFT minus
the in-process TTFT is the two processes' cost at that length.
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


def two_process(load: LoadConfig, mps: str, doorbell: str, repeats: int, prompts: list[list[int]],
                idle_spin_ms: float = 0.0) -> list[dict]:
    """Per prompt: client TTFT of a 1-token request, the request's way in (generate() called -> queued in the JIT
    context) and the JIT context's own timings, medians over `repeats` runs (after two warm-ups); the JIT side's token
    gaps over 200 greedy tokens after the first prompt. `idle_spin_ms`: the JIT context's (ServerConfig)."""
    params = {"max_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    sup = Supervisor(ServerConfig(load, mps=mps, doorbell=doorbell, jit_idle_spin_ms=idle_spin_ms))
    sup.start()
    sup.wait_ready()
    # read now: stop() marks the daemon stopped
    mps_state = f"{sup.mps.running if sup.mps else None} {sup.mps.reason if sup.mps else ''}".strip()
    per_prompt = []
    try:
        with Client(sup.address) as client:
            while client.status()["executor"]["graphs"].get("pending"):
                time.sleep(0.2)
            for ids in prompts:
                rows = []
                for _ in range(repeats + 2):
                    start = time.perf_counter()
                    first = None
                    for msg in client.generate(token_ids=ids, params=params):
                        first = first or time.perf_counter()
                        timings = getattr(msg, "timings", None)
                    rows.append(((first - start) * 1e3, timings, (timings["received_at_s"] - start) * 1e3))
                per_prompt.append(rows)
            decode = list(client.generate(token_ids=prompts[0], params={**params, "max_tokens": 200}))[-1].timings
    finally:
        sup.stop()
    med = lambda xs: percentile(xs[2:], 50)
    gaps = gaps_ms(decode["token_times_ms"])
    return [{"mps": mps_state, "tokens": len(ids), "client": med([r[0] for r in rows]), "way_in": med([r[2] for r in rows]),
             "jit_ttft": med([r[1]["ttft_ms"] for r in rows]), "queue": med([r[1]["queue_ms"] for r in rows]),
             "enqueued": med([r[1]["prefill_enqueued_ms"] for r in rows]),
             "gap_p50": percentile(gaps, 50), "gap_p99": percentile(gaps, 99), "gap_max": max(gaps)}
            for ids, rows in zip(prompts, per_prompt)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-2-7b")
    ap.add_argument("--mps", default="auto")
    ap.add_argument("--doorbell", default="auto", help="comma list of the servers' doorbell modes (off,on,auto)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (with float32) for a smoke run")
    ap.add_argument("--prompts", default="10", help="prompt lengths, comma-separated (token ids 1000, 1001, ...)")
    ap.add_argument("--idle-spin-ms", default="0",
                    help="comma list of the JIT context's idle spin windows (ServerConfig.jit_idle_spin_ms), a server each")
    args = ap.parse_args()
    dtype = "float16" if args.device != "cpu" else "float32"
    load = LoadConfig(model=args.model, device=args.device, dtype=dtype, max_context=1024, progress=False)
    prompts = [list(range(1000, 1000 + int(n))) for n in args.prompts.split(",")]
    runs = {(mode, float(spin)): two_process(load, args.mps, mode, args.repeats, prompts, float(spin))
            for mode in args.doorbell.split(",") for spin in args.idle_spin_ms.split(",")}
    local = LocalEngine(load)
    local_ttft = {}
    for ids in prompts:
        times = []
        for _ in range(args.repeats + 2):
            *_, result = local.generator.generate(ids, SamplingParams(max_tokens=1, temperature=0.0,
                                                                      ignore_eos=True))
            times.append(result.ttft_ms)
        local_ttft[len(ids)] = percentile(times[2:], 50)
    print("| doorbell | JIT idle spin ms | MPS | prompt tokens | in-process TTFT | client TTFT | client - in-process "
          "| request's way in | JIT ttft (receipt -> token on host) | JIT queue | JIT prefill enqueued "
          "| JIT decode gap p50 / p99 / max (200 tokens) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (mode, spin), rows in runs.items():
        for r in rows:
            local_ms = local_ttft[r["tokens"]]
            print(f"| {mode} | {spin:g} | {r['mps']} | {r['tokens']} | {local_ms:.3f} | {r['client']:.3f} | "
                  f"{r['client'] - local_ms:.3f} | {r['way_in']:.3f} | {r['jit_ttft']:.3f} | {r['queue']:.3f} | "
                  f"{r['enqueued']:.3f} | {r['gap_p50']:.3f} / {r['gap_p99']:.3f} / {r['gap_max']:.3f} |")


if __name__ == "__main__":
    main()
