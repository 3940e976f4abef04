"""`hybridrt serve`: start the graph executor and JIT context, print the endpoints, serve until stopped.

Ctrl-C or SIGTERM stops both children cleanly (exit 0). If either child dies, serve reports which and how,
stops the other and exits 1 (no automatic restart: a supervisor such as systemd decides that).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading

from jit_context.request_log import STATS_INTERVAL_S
from launch import API_KEY_ENV
from launch.options import (
    add_max_num_seqs_flag,
    add_model_flags,
    add_prefix_reuse_flag,
    add_speculative_flags,
    add_step_timeout_flag,
    add_tensor_parallel_flag,
    chat_template,
    load_config,
    max_num_seqs,
    port_number,
    positive_seconds,
    speculative_config,
    tensor_parallel,
)
from launch.supervisor import ChildDied, ServerConfig, StopRequested, Supervisor, gpu_requested
from launch.tool_calls import FORMATS as TOOL_CALL_FORMATS

HTTP_SHUTDOWN_TIMEOUT_S = 5.0

DEFAULT_PORT = 7461
DEFAULT_HTTP_PORT = 8000


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the two-process server (native socket + OpenAI-compatible HTTP)",
                       description=__doc__.strip().splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="interface for both sockets (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"native (ZeroMQ) client port; 0 takes a free one, printed when ready (default: "
                        f"{DEFAULT_PORT})")
    p.add_argument("--http-port", type=port_number, default=DEFAULT_HTTP_PORT,
                   help=f"OpenAI-compatible HTTP port; 0 disables HTTP (default: {DEFAULT_HTTP_PORT})")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help="require KEY of every client: `Authorization: Bearer KEY` on the HTTP API, and on the native "
                        f"socket in each request (clients: --api-key or ${API_KEY_ENV}) (default: ${API_KEY_ENV}, "
                        "else no key)")
    p.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model id of the HTTP API (`model` in requests and responses, /v1/models) "
                        "(default: the --model value as given)")
    p.add_argument("--tool-call-parser", choices=("auto", *TOOL_CALL_FORMATS, "none"), default="auto",
                   help='how the HTTP API reads a reply\'s tool calls under tool_choice "auto": auto takes the format '
                        "the chat template teaches (Hermes' <tool_call>, Llama 3's JSON, Mistral's [TOOL_CALLS]); "
                        'none refuses "auto" with tools (a named function and "required" work with any model) '
                        "(default: auto)")
    p.add_argument("--stats-interval", type=positive_seconds, default=STATS_INTERVAL_S, metavar="S",
                   help="seconds between the generation-throughput lines while requests run or wait (not with "
                        f"--quiet; vLLM's VLLM_LOG_STATS_INTERVAL) (default: {STATS_INTERVAL_S:g})")
    p.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds to wait for the model to load before giving up (default: 600)")
    p.add_argument("--mps", choices=("auto", "on", "off"), default="auto",
                   help="run a private CUDA MPS daemon for the two processes (GPU only): auto starts it where "
                        "possible and logs why not otherwise; on fails if it cannot start (default: auto)")
    add_step_timeout_flag(p)
    add_prefix_reuse_flag(p)
    add_max_num_seqs_flag(p)
    add_tensor_parallel_flag(p)
    add_speculative_flags(p)
    add_model_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    seqs = max_num_seqs(args, gpu=gpu_requested(args.device))
    ranks = tensor_parallel(args)
    # Before the children start: a taken port is a one-line error, not a failure after loading. Port 0: the JIT
    # context binds a free one and tells the supervisor (Supervisor.wait_ready), which the ready banner prints.
    if args.port:
        try:
            bind_http_socket(args.host, args.port).close()  # the JIT context binds it for real (ZeroMQ)
        except OSError as e:
            print(f"error: cannot bind the native port tcp://{args.host}:{args.port}: {e.strerror or e}",
                  file=sys.stderr)
            return 1
    config = ServerConfig(load_config(args, seqs), listen=f"tcp://{args.host}:{args.port}",
                          tokenizer=args.tokenizer,
                          chat_template=chat_template(args),
                          ready_timeout_s=args.ready_timeout, mps=args.mps, step_timeout_s=args.step_timeout,
                          api_key=args.api_key,
                          speculation=speculative_config(args, batched=seqs > 1),
                          draft_model=args.draft_model, log_requests=not args.quiet,
                          stats_interval_s=args.stats_interval,
                          prefix_reuse=not args.no_prefix_reuse, tensor_parallel=ranks)
    if args.api_key is None and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach this host can use the "
              "server", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        http_socket = bind_http_socket(args.host, args.http_port) if args.http_port else None
    except OSError as e:
        print(f"error: cannot bind http://{args.host}:{args.http_port}: {e.strerror or e}", file=sys.stderr)
        return 1
    supervisor = Supervisor(config)
    try:
        supervisor.start()
        if args.http_port:
            import_http_server()  # while the children load (~0.4-0.6 s): off the path from ready to serving
        facts = supervisor.wait_ready(stop)
        if http_socket is not None:
            # listening from here: a client that connects as soon as the http line below appears waits in the
            # backlog while the app warms up (~0.5 s on 2 cores), instead of being refused; before ready it still is
            http_socket.listen(2048)
        print(ready_line(facts, supervisor.ready_seconds), flush=True)
        print(f"  native: {supervisor.address}", flush=True)
        if args.http_port:
            print(f"  http:   http://{args.host}:{args.http_port}/v1 (model id "
                  f"{args.served_model_name or facts['model']!r})", flush=True)
            return serve_http(args, supervisor, facts, stop, http_socket)
        return watch(supervisor, stop)
    except ChildDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, StopRequested):
        return 0
    finally:
        supervisor.stop()
        if http_socket is not None:
            http_socket.close()


def ready_line(facts: dict, seconds: float) -> str:
    """What is served, as vLLM and llama-server say it: model, device, dtype, weight format, context, KV cache."""
    executor = facts.get("executor") or {}
    device = facts["device"] + (f" ({executor['device_name']})" if executor.get("device_name") else "")
    details = [f"dtype {facts['dtype']}", f"weights {executor.get('weight_format') or facts['dtype']}",
               f"context {facts['max_context']} tokens"]
    if executor.get("kv_cache_bytes") is not None:
        details.append(f"KV cache {executor['kv_cache_bytes'] / (1 << 20):.1f} MiB")
    seqs = facts.get("max_num_seqs", 1)
    details.append(f"{seqs} requests at once (batched)" if seqs > 1 else "one request at a time")
    if executor.get("tensor_parallel"):
        details.append(f"tensor-parallel over {executor['tensor_parallel']} ranks (KV cache per rank)")
    return f"hybridrt serving {facts['model']} on {device} (ready in {seconds:.1f} s): {', '.join(details)}"


def tool_call_format(parser: str, facts: dict) -> str | None:
    """The HTTP API's tool-call format: --tool-call-parser's, or with "auto" the one the JIT context found in the
    chat template (its status's `tool_call_format`); None for none."""
    if parser == "auto":
        return facts.get("tool_call_format")
    return None if parser == "none" else parser


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only ever reaches this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_http_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound as uvicorn and ZeroMQ bind theirs (SO_REUSEADDR), not yet listening: the HTTP one listens
    once the children are ready and is handed to uvicorn; a trial bind of the native port shows whether the JIT
    context will get it."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says so, and without it
    # Nagle holds each small write (an SSE event, a body after its headers) until the client's delayed ACK:
    # up to 40 ms per response on Linux (44 ms for GET /v1/models before this).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def watch(supervisor: Supervisor, stop: threading.Event) -> int:
    while not stop.wait(0.2):
        supervisor.check_children()
    return 0


def import_http_server() -> None:
    """uvicorn and the HTTP API's modules (FastAPI, pydantic), and anyio's asyncio backend: starlette loads it at the
    first streamed response (its task group), ~30-50 ms inside the first chat's TTFT otherwise."""
    import anyio._backends._asyncio  # noqa: F401
    import uvicorn  # noqa: F401

    import launch.http_api  # noqa: F401


def serve_http(args: argparse.Namespace, supervisor: Supervisor, facts: dict, stop: threading.Event,
               sock: socket.socket) -> int:
    """uvicorn in this thread; a watcher thread ends it when a child dies or SIGTERM arrives."""
    import uvicorn

    from launch.http_api import create_app

    app = create_app(supervisor.address, args.served_model_name or facts["model"], api_key=args.api_key,
                     max_context=facts["max_context"],
                     weight_format=facts.get("executor", {}).get("weight_format"), warm=True,
                     tool_call_format=tool_call_format(args.tool_call_parser, facts))
    # Graceful shutdown waits for open streams; the watcher ends them first (below), the time-out is a backstop.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.http_port, log_level="warning",
                                           timeout_graceful_shutdown=HTTP_SHUTDOWN_TIMEOUT_S))
    failure: list[ChildDied] = []

    def watcher() -> None:
        while not stop.wait(0.2) and not server.should_exit:
            try:
                supervisor.check_children()
            except ChildDied as e:
                failure.append(e)
                break
        if not failure:
            # Stopping (SIGTERM, or Ctrl-C which uvicorn caught): stop the children first, so that the JIT
            # context answers every running request with `shutting_down` and their HTTP streams end, instead
            # of uvicorn's graceful shutdown waiting for whole generations.
            supervisor.stop()
        server.should_exit = True

    threading.Thread(target=watcher, daemon=True).start()
    server.run(sockets=[sock])
    stop.set()
    if failure:
        raise failure[0]
    return 0
