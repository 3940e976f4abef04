"""hybridrt through its OpenAI-compatible HTTP API: `hybridrt serve` started as a user starts it (its own process,
HTTP on a free port), chats streamed over httpx (what the openai SDK uses), the TTFT taken at the first
server-sent event that carries text (the role's event leaves before it, with the headers); the same chats also
through the standard library's http.client (a lean client, as curl is: what is left is the server's share; the
difference is httpx's). Runs the chat workload: token-level workloads need token ids, which the HTTP API does not
stream."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import tempfile
import time

from bench.procinfo import Timeline
from bench.serve_command import serve_command
from bench.spec import BenchSpec
from bench.workloads import EngineUnavailable

STOP_TIMEOUT_S = 30.0


def serve_argv(spec: BenchSpec, port: int, http_port: int) -> list[str]:
    """`hybridrt serve` with the run's model, device, weight format and speculation (what the `hybridrt` engine
    passes to its Supervisor)."""
    argv = serve_command(
        port, http_port, "--model", spec.model, "--device", spec.device, "--dtype", spec.dtype,
        "--max-context", str(spec.max_context), "--seed-weights", str(spec.seed), "--mps", spec.mps,
        "--ready-timeout", str(spec.timeout_s), "--speculative", spec.speculative,
        "--num-speculative-tokens", str(spec.num_speculative_tokens), "--max-num-seqs", str(spec.max_num_seqs),
        "--tensor-parallel", str(spec.tensor_parallel), "--tp-allreduce", spec.tp_allreduce, quiet=True,
        prefix_reuse=spec.prefix_reuse)
    if spec.tokenizer:
        argv += ["--tokenizer", spec.tokenizer]
    if spec.quantize:
        argv += ["--quantize", spec.quantize, "--quantize-group", str(spec.quantize_group)]
    if spec.dequantize:
        argv.append("--dequantize")
    if spec.draft_model:
        argv += ["--draft-model", spec.draft_model]
    return argv


def carries_text(event: str) -> bool:
    """Whether a server-sent event line (`data: {...}`) carries generated text: a chat delta's or a completion's."""
    if not event.startswith("data: {"):
        return False
    choices = json.loads(event[6:]).get("choices") or [{}]
    return any((c.get("delta") or {}).get("content") or c.get("text") for c in choices)


class HybridrtHttpEngine:
    def __init__(self, spec: BenchSpec, timeline: Timeline) -> None:
        try:
            import httpx  # the `dev` extra's HTTP client (what the openai SDK uses), not a runtime dependency
        except ImportError:
            raise EngineUnavailable("hybridrt-http needs httpx (pip install httpx)") from None
        from bench.probes.serve_ready import health
        from ipc.free_port import free_port

        self.spec = spec
        port, http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http_port}"
        timeline.mark("server_start")
        # serve's stderr goes to a file: a pipe nobody reads while it serves could fill and stall it
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(serve_argv(spec, port, http_port), stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, text=True)
        self.http = httpx.Client(timeout=spec.timeout_s)  # one keep-alive connection, as an SDK client keeps
        self.lean = http.client.HTTPConnection("127.0.0.1", http_port, timeout=spec.timeout_s)  # keep-alive too
        try:
            deadline = time.monotonic() + spec.timeout_s
            while not health(http_port):
                if self.proc.poll() is not None:
                    self.stderr.seek(0)
                    raise RuntimeError(f"serve exited {self.proc.returncode}: {self.stderr.read()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve was not ready within {spec.timeout_s:.0f} s")
                time.sleep(0.05)
            timeline.mark("ready")
            self.model = self.http.get(f"{self.url}/v1/models").json()["data"][0]["id"]
        except BaseException:
            self.close()
            raise

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        raise EngineUnavailable("hybridrt-http runs the chat workload only (the HTTP API streams text, not "
                                "token ids)")

    def chat_ttft(self, messages: list[dict]) -> float:
        """Client TTFT (ms): a streamed chat completion's first server-sent event."""
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0, "stream": True}
        start = time.perf_counter()
        with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                reply.read()
                raise EngineUnavailable(f"the server cannot run chats: HTTP {reply.status_code}: {reply.text[:300]}")
            first = None
            for line in reply.iter_lines():
                if first is None and carries_text(line):
                    first = (time.perf_counter() - start) * 1e3
        if first is None:
            raise RuntimeError("the stream carried no text")
        return first

    def chat_ttft_http_client(self, messages: list[dict]) -> float:
        """The same chat's TTFT (ms) through http.client: the request in one write, the response read as its chunks
        arrive (then to its end, so that the connection serves the next request)."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                           "stream": True}).encode()
        start = time.perf_counter()
        self.lean.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        reply = self.lean.getresponse()
        if reply.status != 200:
            raise EngineUnavailable(f"the server cannot run chats: HTTP {reply.status}: {reply.read()[:300]!r}")
        first, seen = None, b""
        while data := reply.read1(65536):
            if first is None:
                seen += data
                *events, seen = seen.split(b"\n\n")  # whole events; the rest waits for its end
                if any(carries_text(event.decode()) for event in events):
                    first = (time.perf_counter() - start) * 1e3
        if first is None:
            raise RuntimeError("the stream carried no text")
        return first

    def facts(self) -> dict:
        return {"url": self.url, "model_id": self.model}

    def memory(self) -> dict:
        return {}

    def close(self) -> None:
        self.http.close()
        self.lean.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def open_engine(spec: BenchSpec, name: str, timeline: Timeline) -> HybridrtHttpEngine:
    return HybridrtHttpEngine(spec, timeline)
