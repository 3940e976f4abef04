"""What the OpenAI HTTP API costs over the native client (issue 12, target 4): the same streamed chat through both,
alternating, on one `hybridrt serve`; client TTFT and token gaps, and the CPU time each process spends per request
(the launcher runs only the HTTP server, so its CPU time is the HTTP layer's cost whatever the model's speed).

    python -m bench.probes.http_overhead [--requests 30] [--max-tokens 16] -- --model M --device cuda ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import httpx

from bench.engines.hybridrt_http import carries_text
from bench.probes.serve_ready import health, running_serve
from ipc.free_port import free_port
from launch.client import Client

MESSAGES = [{"role": "user", "content": "Name three primary colours and say why they are called primary."}]
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """User + system CPU time of a process (all its threads), in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS


def native(client: Client, max_tokens: int) -> tuple[float, list[float]]:
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    times = []
    start = time.perf_counter()
    for msg in client.generate(messages=MESSAGES, params=params):
        if msg.token_ids:
            times.append(time.perf_counter() - start)
    return times[0] * 1e3, [(b - a) * 1e3 for a, b in zip(times, times[1:])]


def http(client: httpx.Client, url: str, model: str, max_tokens: int, stream: bool) -> tuple[float, list[float]]:
    """Streamed: TTFT at the first event carrying text (the role's leaves at acceptance); not streamed: the whole
    response's time (one 'token')."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
            "ignore_eos": True}
    times = []
    start = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if carries_text(line) or line.startswith("{"):
                times.append(time.perf_counter() - start)
    return times[0] * 1e3, [(b - a) * 1e3 for a, b in zip(times, times[1:])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--requests", type=int, default=30, help="per client kind, alternating (default: 30)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--not-streamed", action="store_true",
                    help="HTTP requests without stream: the HTTP row then times whole responses")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the arguments of `hybridrt serve`")
    args = ap.parse_args(argv)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    with running_serve(serve_args, http_port) as (proc, native_address, _):
        while not health(http_port):
            if proc.poll() is not None:
                raise SystemExit(f"serve exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        with Client(native_address) as nat, httpx.Client(timeout=60) as web:
            status = nat.status()
            jit_pid, model = status["jit_context_pid"], web.get(f"{url}/v1/models").json()["data"][0]["id"]
            while (status.get("executor") or {}).get("graphs", {}).get("pending"):
                time.sleep(0.2)
                status = nat.status()
            runs = {"native": (lambda: native(nat, args.max_tokens)),
                    "http": (lambda: http(web, url, model, args.max_tokens, not args.not_streamed))}
            for run in runs.values():  # warm both paths
                run()
            out = {k: {"ttft": [], "gaps": [], "launcher_cpu": 0.0, "jit_cpu": 0.0} for k in runs}
            for _ in range(args.requests):
                for kind, run in runs.items():
                    before = cpu_ms(proc.pid), cpu_ms(jit_pid)
                    ttft, gaps = run()
                    after = cpu_ms(proc.pid), cpu_ms(jit_pid)
                    o = out[kind]
                    o["ttft"].append(ttft)
                    o["gaps"] += gaps
                    o["launcher_cpu"] += after[0] - before[0]
                    o["jit_cpu"] += after[1] - before[1]
    print(f"| client | TTFT P50 (ms) | TTFT P90 | token gap P50 (ms) | launcher CPU per request (ms) | JIT context "
          f"CPU per request (ms) |  ({args.requests} requests each, {args.max_tokens} tokens, streamed chat)")
    print("|---|---|---|---|---|---|")
    summary = {}
    for kind, o in out.items():
        ttft = sorted(o["ttft"])
        row = {"ttft_p50": statistics.median(ttft), "ttft_p90": ttft[int(0.9 * (len(ttft) - 1))],
               "gap_p50": statistics.median(o["gaps"]) if o["gaps"] else 0.0, "launcher_cpu_ms": o["launcher_cpu"] / args.requests,
               "jit_cpu_ms": o["jit_cpu"] / args.requests}
        summary[kind] = row
        print(f"| {kind} | {row['ttft_p50']:.2f} | {row['ttft_p90']:.2f} | {row['gap_p50']:.3f} | "
              f"{row['launcher_cpu_ms']:.2f} | {row['jit_cpu_ms']:.2f} |")
    print(f"HTTP - native TTFT P50: {summary['http']['ttft_p50'] - summary['native']['ttft_p50']:+.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"serve_args": serve_args, "summary": summary, "raw": out}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
