"""A soak run against a fresh `hybridrt serve` (CPU): N requests mixing the native client and the HTTP API,
streamed and not, some cancelled part-way; the RSS and open file descriptors of serve and both children are
sampled every 100 requests. Passes when the RSS of each process grows by less than 10 MB after the first 100
requests and the fd counts end where they were after them.

    python -m tests.soak [--requests 1000] [--seed 0]
    python -m tests.soak --long-prompt      (a ~3,500-token prompt over HTTP while /health is polled)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import httpx

from launch.client import Client
from tests.serve_process import ServeProcess

RSS_GROWTH_LIMIT_MB = 10.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def sample(pids: dict[str, int]) -> dict:
    return {name: {"rss_mb": round(_rss_mb(pid), 1), "fds": _fds(pid)} for name, pid in pids.items()}


def one_request(rng: random.Random, client: Client, http: httpx.Client, model: str) -> str:
    kind = rng.choice(["native", "native-stream-cancel", "http", "http-stream", "http-stream-cancel", "tokenize"])
    params = {"max_tokens": rng.randrange(1, 6), "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(100)}
    if kind == "native":
        list(client.generate(prompt=rng.choice(["Hi", "Tell me a joke.", "1 2 3"]), params=params))
    elif kind == "native-stream-cancel":
        stream = client.generate(prompt="Count to one hundred.", params={**params, "max_tokens": 50})
        next(stream)
        stream.close()  # sends CancelRequest
    elif kind == "tokenize":
        client.tokenize(messages=[{"role": "user", "content": "Hello"}])
    else:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": params["max_tokens"] if "cancel" not in kind else 50, "temperature": 0}
        if kind == "http":
            http.post("/v1/chat/completions", json=body).raise_for_status()
        else:
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
                for i, _ in enumerate(reply.iter_lines()):
                    if "cancel" in kind and i >= 2:
                        break  # closing the stream cancels the generation
    return kind


def long_prompt(server: ServeProcess) -> dict:
    """A prompt of ~3,500 tokens through /v1/completions (it prefills for seconds on a CPU) while /health and
    the native status are asked every 0.25 s: every answer must be 200 / a reply, and come within a second."""
    import threading

    prompt = " ".join(f"word{i % 97}" for i in range(1200))  # about 3,500 tokens for SmolLM2's tokenizer
    result: dict = {}

    def complete() -> None:
        start = time.monotonic()
        with httpx.Client(base_url=server.http, timeout=120) as http:
            reply = http.post("/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": prompt,
                                                       "max_tokens": 2, "temperature": 0})
        result.update(status=reply.status_code, seconds=round(time.monotonic() - start, 2),
                      prompt_tokens=reply.json().get("usage", {}).get("prompt_tokens"))

    worker = threading.Thread(target=complete)
    worker.start()
    health, status = [], []
    with httpx.Client(base_url=server.http, timeout=30) as http, Client(server.address, timeout_s=30) as client:
        while worker.is_alive():
            t = time.monotonic()
            code = http.get("/health").status_code
            health.append((code, time.monotonic() - t))
            t = time.monotonic()
            client.status(timeout_s=30)
            status.append(time.monotonic() - t)
            time.sleep(0.25)
    worker.join()
    return {"completion": result, "health_answers": len(health),
            "health_codes": sorted({c for c, _ in health}), "health_max_s": round(max(s for _, s in health), 3),
            "status_max_s": round(max(status), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-prompt", action="store_true", help="only the long-prompt check")
    args = p.parse_args(argv)
    if args.long_prompt:
        with ServeProcess() as server:
            report = long_prompt(server)
        print(json.dumps(report))
        ok = report["completion"].get("status") == 200 and report["health_codes"] == [200]
        return 0 if ok and report["health_max_s"] < 1.0 and report["status_max_s"] < 1.0 else 1
    rng = random.Random(args.seed)
    start = time.monotonic()
    samples: list[dict] = []
    kinds: dict[str, int] = {}
    with ServeProcess() as server:
        children = server.children()
        pids = {"serve": server.proc.pid, **{f"child{i}": pid for i, pid in enumerate(sorted(children))}}
        with Client(server.address, timeout_s=60) as client, httpx.Client(base_url=server.http, timeout=60) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]
            for i in range(1, args.requests + 1):
                kind = one_request(rng, client, http, model)
                kinds[kind] = kinds.get(kind, 0) + 1
                if i % 100 == 0:
                    samples.append({"after": i, **sample(pids)})
                    print(json.dumps(samples[-1]), flush=True)
    first, last = samples[0], samples[-1]
    growth = {name: round(last[name]["rss_mb"] - first[name]["rss_mb"], 1) for name in pids}
    fds_flat = all(last[name]["fds"] <= first[name]["fds"] for name in pids)
    ok = all(g < RSS_GROWTH_LIMIT_MB for g in growth.values()) and fds_flat
    print(json.dumps({"requests": args.requests, "kinds": kinds, "rss_growth_mb_after_first_100": growth,
                      "fds_flat": fds_flat, "ok": ok, "seconds": round(time.monotonic() - start, 1)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
