"""The HTTP app's own path for a streamed chat, in-process and warm: from the ASGI call to the app's wait for the JIT
context's acceptance (http_split's "app -> body read" + "body read -> asked", without the socket, uvicorn or an idle
pause), timed over many calls, then a cProfile of the same calls by own time. One `hybridrt serve` without HTTP runs
the model; the wait itself is cut short (the request is cancelled there), so only the app's Python is measured.

    python -m bench.probes.http_app_path [--calls 300] -- --model dummy:smollm2-135m --tokenizer T --device cpu
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time

from bench.probes.http_split import MESSAGES


async def _measure(app, body: bytes, calls: int, profile: bool) -> list[float]:
    from launch import http_api

    asked: list[float] = []

    async def stop_at_asked(events):  # the app's first wait: stamp it, cancel the request, answer 503
        asked.append(time.perf_counter())
        await events.aclose()
        raise http_api.ApiError(503, "stopped by the probe")

    http_api._next_or_error = stop_at_asked
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def one() -> float:
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if pending:
                return pending.pop()
            await asyncio.sleep(3600)  # never disconnects

        async def send(_: dict) -> None:
            pass

        start = time.perf_counter()
        await app(scope, receive, send)
        return asked[-1] - start

    async with app.router.lifespan_context(app):
        for _ in range(20):  # warm
            await one()
        times = [await one() for _ in range(calls)]
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                await one()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--no-profile", action="store_true", help="timings only")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the arguments of `hybridrt serve`")
    args = ap.parse_args(argv)
    from bench.probes.serve_ready import running_serve
    from bench.stats import percentile
    from launch.http_api import create_app

    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    with running_serve(serve_args) as (_, native, facts):
        app = create_app(native, facts["model"], api_key=None, max_context=facts["max_context"])
        body = json.dumps({"model": facts["model"], "messages": MESSAGES, "stream": True, "max_tokens": 8}).encode()
        times = asyncio.run(_measure(app, body, args.calls, not args.no_profile))
    ms = [t * 1e3 for t in times]
    print(f"ASGI call -> asked, warm, {len(ms)} calls: P50 {percentile(ms, 50):.3f} ms, P90 {percentile(ms, 90):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
