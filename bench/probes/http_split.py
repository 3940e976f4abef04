"""Where the OpenAI HTTP API's time to first token goes (issue 12, target 4: HTTP <= native + 0.5 ms), segment by
segment. One `hybridrt serve` without HTTP runs the model; this process runs the HTTP app (`create_app`, as `serve`
does, under uvicorn with serve's settings) with a timing middleware around it and the app's wait for the JIT
context's first event stamped, twice: one app whose client reaches the JIT context over its local stream
(`ipc.local_stream`) and one over ZeroMQ, on one serve; a client process (so that it does not share this one's GIL)
sends streamed chats alternately through each app (httpx, as the bench does) and a native client of each transport. All stamps are CLOCK_MONOTONIC, one clock
for every process on the machine.

Segments of an HTTP request: client -> app (the client's send, uvicorn's parse of the headers), app -> body read (the
request body's arrival: a client that writes it apart from the headers, as httpx does, makes the app wait for it),
body read -> asked (FastAPI's routing, validation and the handler up to its wait for the JIT context's acceptance), asked -> accepted (the request to the
JIT context, its checks, and its Started back), accepted -> headers (the response's set-up), headers (uvicorn writes
them, with the role's event after them), headers -> first token (the prefill and the first token's way to the app,
overlapping the client's parse of the headers), first token's write, written -> client (the socket, httpx, the SSE
parse). The native client's TTFT is the row to compare with.

    python -m bench.probes.http_split [--requests 30] -- --model M --device cuda ...
"""

from __future__ import annotations

import argparse
import contextvars
import json
import subprocess
import sys
import threading
import time

from bench.engines.hybridrt_http import carries_text

MESSAGES = [{"role": "user", "content": "Name three primary colours and say why they are called primary."}]
ROW: contextvars.ContextVar[dict] = contextvars.ContextVar("row")
SEGMENTS = [("client -> app", "client", "app"), ("app -> body read", "app", "body"), ("body read -> asked", "body", "asked"),
            ("asked -> accepted", "asked", "event"), ("accepted -> headers", "event", "headers0"),
            ("headers write", "headers0", "headers1"), ("headers -> first token", "headers1", "body0"),
            ("first token write", "body0", "body1"), ("written -> client", "body1", "first")]


def timed(app, rows: list[dict]):
    """The ASGI app with each chat request's stamps appended to `rows`: app called, response headers and first
    content chunk before and after uvicorn's send."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await app(scope, receive, send)
        row = {"app": time.monotonic()}
        rows.append(row)
        ROW.set(row)

        async def stamped_receive():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False) and "body" not in row:
                row["body"] = time.monotonic()  # the whole body is here (uvicorn calls the app after the headers)
            return message

        async def stamped_send(message):
            kind = message["type"]
            first_body = kind == "http.response.body" and "body0" not in row and any(
                carries_text(event) for event in message.get("body", b"").decode().split("\n\n"))
            if kind == "http.response.start" or first_body:
                prefix = "headers" if kind == "http.response.start" else "body"
                row[f"{prefix}0"] = time.monotonic()
                await send(message)
                row[f"{prefix}1"] = time.monotonic()
                return
            await send(message)

        await app(scope, stamped_receive, stamped_send)
    return wrapped


def stamp_first_event() -> None:
    """Wrap the app's wait for an event so that the first one of each request (the JIT context's Started, for a
    stream) is stamped (before and after)."""
    from launch import http_api

    wait = http_api._next_or_error

    async def stamped(events):
        row = ROW.get(None)
        if row is None or "event" in row:
            return await wait(events)
        row["asked"] = time.monotonic()
        item = await wait(events)
        row["event"] = time.monotonic()
        return item

    http_api._next_or_error = stamped


TRANSPORTS = (("local stream", True), ("ZeroMQ", False))  # the app's and the native row's client, A/B on one serve


def raw_stream(conn, path: str, body: bytes) -> float | None:
    """POST `body` with http.client (headers and body in one write) and read the SSE stream to its end: the time of
    the first event that carries text."""
    conn.request("POST", path, body=body, headers={"content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    first = None
    while line := response.readline():
        if first is None and carries_text(line.decode().strip()):
            first = time.monotonic()
    return first


def client_main(native_address: str, http_urls: list[str], requests: int, max_tokens: int,
                spin_ms: float | None, web_client: str = "httpx") -> None:
    """The client process: one JSON line per request, {"kind", "transport", "client" (sent), "first" (first
    content)}, alternating over the apps (one per transport) and the native clients (one per transport).
    `web_client`: httpx (as the bench and the OpenAI SDK) or raw (http.client: the request in one write)."""
    import http.client
    from urllib.parse import urlsplit

    import httpx

    from launch.client import Client

    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    natives = [Client(native_address, spin_ms=spin_ms, local=local) for _, local in TRANSPORTS]
    try:
        with httpx.Client(timeout=60) as web:
            model = web.get(f"{http_urls[0]}/v1/models").json()["data"][0]["id"]
            body = {"model": model, "messages": MESSAGES, "stream": True} | params
            raws = [http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port) for url in http_urls]
            for i in range(requests + 2):  # the first of each kind warms its path
                for t, ((_, local), url, native) in enumerate(zip(TRANSPORTS, http_urls, natives, strict=True)):
                    for kind in ("http", "native"):
                        start, first = time.monotonic(), None
                        if kind == "http" and web_client == "raw":
                            first = raw_stream(raws[t], "/v1/chat/completions", json.dumps(body).encode())
                        elif kind == "http":
                            with web.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                                r.raise_for_status()
                                for line in r.iter_lines():
                                    if first is None and carries_text(line):
                                        first = time.monotonic()
                        else:
                            for msg in native.generate(messages=MESSAGES, params=params):
                                if first is None and msg.token_ids:
                                    first = time.monotonic()
                            assert (native.local_path is not None) == local, "the native client's transport"
                        print(json.dumps({"kind": kind, "transport": t, "client": start, "first": first,
                                          "warm": i < 2}), flush=True)
    finally:
        for native in natives:
            native.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--requests", type=int, default=30, help="per client kind, alternating (default: 30)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--client-spin-ms", type=float, default=None,
                    help="the native clients' spinning wait, the app's and the native row's (ipc.reply_spin; "
                         "default: theirs)")
    ap.add_argument("--loop", default="auto", help="uvicorn's event loop for the app: auto, asyncio or uvloop")
    ap.add_argument("--http", default="auto", help="uvicorn's HTTP parser for the app: auto, h11 or httptools")
    ap.add_argument("--web-client", choices=("httpx", "raw"), default="httpx",
                    help="the HTTP client: httpx (as the bench and the OpenAI SDK) or raw (http.client, the request's "
                         "headers and body in one write)")
    ap.add_argument("--client", nargs=1 + len(TRANSPORTS), metavar="ADDRESS", help=argparse.SUPPRESS)
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the arguments of `hybridrt serve`")
    args = ap.parse_args(argv)
    if args.client:
        client_main(args.client[0], args.client[1:], args.requests, args.max_tokens, args.client_spin_ms,
                    args.web_client)
        return 0
    import uvicorn

    from bench.probes.serve_ready import running_serve
    from bench.stats import percentile
    from ipc.free_port import free_port
    from launch.client import Client
    from launch.http_api import create_app

    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    http_ports = [free_port() for _ in TRANSPORTS]
    servers = []
    with running_serve(serve_args) as (_, native, facts):
        try:
            while (facts.get("executor") or {}).get("graphs", {}).get("pending"):  # measure once the graphs are there
                time.sleep(0.2)
                with Client(native) as c:
                    facts = c.status()
            rows: list[list[dict]] = [[] for _ in TRANSPORTS]  # per app: its requests' stamps
            stamp_first_event()
            for (_, local), http_port, stamped in zip(TRANSPORTS, http_ports, rows, strict=True):
                app = create_app(native, facts["model"], api_key=None, max_context=facts["max_context"], warm=True,
                                 client_spin_ms=args.client_spin_ms, client_local=local)
                server = uvicorn.Server(uvicorn.Config(timed(app, stamped), host="127.0.0.1", port=http_port,
                                                       log_level="warning", loop=args.loop, http=args.http))
                servers.append(server)
                threading.Thread(target=server.run, daemon=True).start()
                while not server.started:
                    time.sleep(0.05)
            client = subprocess.run([sys.executable, "-m", "bench.probes.http_split", "--requests",
                                     str(args.requests), "--max-tokens", str(args.max_tokens), "--web-client",
                                     args.web_client, "--client", native,
                                     *(f"http://127.0.0.1:{p}" for p in http_ports),
                                     *(["--client-spin-ms", str(args.client_spin_ms)]
                                       if args.client_spin_ms is not None else [])],
                                    capture_output=True, text=True, timeout=600)
            if client.returncode:
                raise SystemExit(f"client failed: {client.stderr[-2000:]}")
            seen = [json.loads(line) for line in client.stdout.splitlines()]
        finally:
            for server in servers:
                server.should_exit = True
    columns = []
    for t, stamped in enumerate(rows):
        web = [r for r in seen if r["kind"] == "http" and r["transport"] == t]
        if len(web) != len(stamped):
            raise SystemExit(f"{len(web)} HTTP requests sent to app {t}, {len(stamped)} stamped by it")
        merged = [server_row | client_row for server_row, client_row in zip(stamped, web) if not client_row["warm"]]
        native_ttft = [(r["first"] - r["client"]) * 1e3 for r in seen
                       if r["kind"] == "native" and r["transport"] == t and not r["warm"]]
        columns.append([[(r[b] - r[a]) * 1e3 for r in merged]
                        for _, a, b in SEGMENTS + [("HTTP TTFT at the client", "client", "first")]] + [native_ttft])
    names = [name for name, _, _ in SEGMENTS] + ["HTTP TTFT at the client", "native TTFT at the client"]
    print(f"| segment | {' | '.join(f'{t} P50 ms | {t} P90 ms' for t, _ in TRANSPORTS)} |  ({args.requests} "
          "streamed chats per app and per native client, alternating; the apps' and native clients' transport to the "
          "JIT context)")
    print("|---|" + "---|---|" * len(TRANSPORTS))
    for i, name in enumerate(names):
        cells = " | ".join(f"{percentile(col[i], 50):.3f} | {percentile(col[i], 90):.3f}" for col in columns)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
