"""How long `hybridrt serve` takes from the command to a working HTTP endpoint, as a user sees it (issue 13).

    python -m bench.probes.serve_ready --runs 3 -- --model /path/model.gguf --device cuda

Each run starts `python -m launch.cli serve ARGS` as a fresh process (nothing imported in advance), polls
GET /health until it answers 200, sends one streamed chat completion right away (its TTFT: the first request
after ready) and a few more (steady state), then stops the server with SIGTERM and waits for it to exit.
Run 1 on an uncached model includes its conversion; later runs show the cached start. The phase lines the two
children print (one per start-up phase) are kept per run. Prints one table row per run.

Before each start, the host's floor is timed the same way: a fresh `python -c "import torch"` that also makes a
CUDA context when the serve runs on a GPU (what each of serve's two children must do before anything else), so
"ready - floor" says what hybridrt itself adds on this host, whose imports swing by seconds between hosts and runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench.engines.hybridrt_http import carries_text
from bench.serve_command import serve_command
from ipc.free_port import free_port

CHAT = {"messages": [{"role": "user", "content": "Name three primary colours."}], "max_tokens": 8,
        "temperature": 0.0, "stream": True}


@contextlib.contextmanager
def running_serve(serve_args: list[str], http_port: int = 0):
    """`hybridrt serve` with `serve_args` (quiet, stdout discarded) on a free native port and `http_port` (0: no
    HTTP), for a probe: yields (the process, its native address, its status facts) once its status answers
    (SystemExit with the tail of its stderr if it exits first); SIGTERM when the block ends, SIGKILL 30 s later."""
    from launch.client import Client

    port = free_port()
    native = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(serve_command(port, http_port, *serve_args, quiet=True), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        facts = None
        while facts is None:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited: {proc.stderr.read()[-2000:]}")
            try:
                with Client(native) as c:
                    facts = c.status()
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.2)
        yield proc, native, facts
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def model_id(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5.0) as r:
        return json.load(r)["data"][0]["id"]


def chat_ttft_ms(port: int, model: str) -> float:
    """Client-side time to the first streamed chunk that carries text (SSE over urllib, no client library)."""
    body = json.dumps({**CHAT, "model": model}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if first is None and carries_text(line.decode()):  # not the role's event: it leaves at acceptance
                first = time.perf_counter()
    if first is None:
        raise RuntimeError("the chat stream carried no content")
    return (first - start) * 1e3


FLOOR_CODE = {"cuda": "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()", "cpu": "import torch"}


def device_of(serve_args: list[str]) -> str:
    """The device `serve` will use, from its arguments: "cuda" or "cpu" (auto, the default: cuda when present)."""
    value = "auto"
    for i, a in enumerate(serve_args):
        if a == "--device" and i + 1 < len(serve_args):
            value = serve_args[i + 1]
        elif a.startswith("--device="):
            value = a.split("=", 1)[1]
    if value == "auto":
        return "cuda" if _cuda_present() else "cpu"
    return "cuda" if value.startswith("cuda") else "cpu"


def _cuda_present() -> bool:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True)
    return out.stdout.strip() == "True"


def floor_s(device: str) -> float:
    """Seconds for a fresh interpreter to import torch (and make a CUDA context on "cuda"), from the command."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_CODE[device]], check=True)
    return time.perf_counter() - start


def one_run(serve_args: list[str], timeout_s: float, steady: int) -> dict:
    port, http_port = free_port(), free_port()
    cmd = serve_command(port, http_port, *serve_args)  # no prefix reuse: the steady requests repeat the first chat
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not health(http_port):
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {proc.stderr.read().strip()[-2000:]}")
            if time.perf_counter() - start > timeout_s:
                raise RuntimeError(f"not ready after {timeout_s:.0f} s")
            time.sleep(0.02)
        ready_s = time.perf_counter() - start
        model = model_id(http_port)
        first = chat_ttft_ms(http_port, model)
        later = sorted(chat_ttft_ms(http_port, model) for _ in range(steady))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    ready_line = next((ln for ln in out.splitlines() if ln.startswith("hybridrt serving")), "")
    phases = [ln for ln in err.splitlines() if ln.startswith(("graph_executor:", "jit_context:"))]
    return {"ready_s": ready_s, "first_ttft_ms": first, "steady_ttft_ms": later[len(later) // 2],
            "ready_line": ready_line, "phases": phases, "exit": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh starts, one after another (default: 3)")
    ap.add_argument("--steady", type=int, default=5, help="chat requests after the first one (default: 5)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for /health per run")
    ap.add_argument("--json", type=str, default=None, help="also write the runs to this file")
    ap.add_argument("--no-floor", action="store_true", help="don't time the host's floor (torch import + context)")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the arguments of `hybridrt serve`")
    args = ap.parse_args(argv)
    serve_args = [a for a in args.serve_args if a != "--"] if args.serve_args[:1] == ["--"] else args.serve_args
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    runs = []
    device = device_of(serve_args)
    print(f"| run | ready from command (s) | floor: import torch{' + CUDA context' if device == 'cuda' else ''} (s) "
          "| ready - floor (s) | first chat TTFT (ms) | steady chat TTFT (ms) | first/steady |")
    print("|---|---|---|---|---|---|---|")
    for i in range(args.runs):
        floor = None if args.no_floor else floor_s(device)
        r = one_run(serve_args, args.timeout, args.steady)
        r["floor_s"] = floor
        runs.append(r)
        fl = "-" if floor is None else f"{floor:.2f}"
        gap = "-" if floor is None else f"{r['ready_s'] - floor:.2f}"
        print(f"| {i + 1} | {r['ready_s']:.2f} | {fl} | {gap} | {r['first_ttft_ms']:.2f} | "
              f"{r['steady_ttft_ms']:.2f} | {r['first_ttft_ms'] / r['steady_ttft_ms']:.2f} |", flush=True)
    print(runs[-1]["ready_line"])
    for line in runs[-1]["phases"]:
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"serve_args": serve_args, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
