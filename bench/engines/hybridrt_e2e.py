"""Engine `hybridrt`: the two-process runtime end to end. This process starts a private server (supervisor ->
graph executor + JIT context) and sends prompts through the native client socket; TTFT and per-token gaps are
measured here, at the client. The server's own timings come back in `Finished.timings` and are kept as facts.

Prompts go as token ids (the same random ids every engine gets; dummy models have no tokenizer).
"""

from __future__ import annotations

import threading
import time

from bench.procinfo import Timeline
from bench.spec import BenchSpec
from bench.workloads import EngineUnavailable
from ipc.messages import Finished
from launch.client import Client
from launch.supervisor import ServerConfig, Supervisor

WARMUP_PROMPT = 16
WARMUP_TOKENS = 4
FIRST_REQUESTS = 5  # TTFT of the first requests after ready against steady state (issue 13)
FIRST_PROMPT = 100
IDLE_GAP_S = 2.0  # then one request after this long without any
GRAPH_POLL_S = 0.1
# A live report changes with every capture (each takes seconds at most); one frozen this long is stale (a
# server that reports its startup facts only) and the wait ends: about 10 s of captures fit in it.
GRAPH_STALL_S = 30.0


class HybridrtE2EEngine:
    def __init__(self, spec: BenchSpec, timeline: Timeline) -> None:
        from graph_executor.loading.loader import LoadConfig

        self.spec = spec
        load = LoadConfig(model=spec.model, device=spec.device, dtype=spec.dtype, max_context=spec.max_context,
                          seed=spec.seed, progress=False, max_num_seqs=spec.max_num_seqs, **spec.load_flags)
        from jit_context.speculative_config import SpeculativeConfig

        config = ServerConfig(load, tokenizer=spec.tokenizer, ready_timeout_s=spec.timeout_s, mps=spec.mps,
                              speculation=SpeculativeConfig(spec.speculative, spec.num_speculative_tokens),
                              draft_model=spec.draft_model, tensor_parallel=spec.tensor_parallel,
                              prefix_reuse=spec.prefix_reuse)
        self.supervisor = Supervisor(config)
        self.client = None
        self.last_server_timings: dict = {}
        self.last_token_ids: list[int] = []  # the last request's generated ids (the turns workload's reply)
        try:
            timeline.mark("server_start")
            self.supervisor.start()
            self.supervisor.wait_ready()
            timeline.mark("ready")
            self.client = Client(self.supervisor.address, timeout_s=spec.timeout_s)
            # connected before the first timed request (its ZeroMQ socket, and the local stream the status reply
            # names): a new client's connect is not the server's
            self.client.status()
            measure_first = "startup" in spec.workloads
            first, first_server = [], []  # right after ready: the client's TTFT and the JIT context's own
            for _ in range(FIRST_REQUESTS * measure_first):
                first.append(self._first_token_ms())
                first_server.append(self.last_server_timings.get("ttft_ms"))
            if self._wait_for_graphs(spec.timeout_s):
                timeline.mark("graphs_captured")
            self.generate(list(range(100, 100 + WARMUP_PROMPT)), WARMUP_TOKENS)
            timeline.mark("warm")
            self.first_requests = None
            if measure_first:
                steady = sorted(self._first_token_ms() for _ in range(FIRST_REQUESTS))[FIRST_REQUESTS // 2]
                # One request after an idle gap, as a chat user's come: is what the first request pays a first time,
                # or what any request pays after a pause?
                time.sleep(IDLE_GAP_S)
                after_idle = self._first_token_ms()
                self.first_requests = {"prompt_tokens": FIRST_PROMPT, "ttft_ms": [round(t, 3) for t in first],
                                       "server_ttft_ms": first_server,
                                       "steady_ttft_ms": round(steady, 3),
                                       "worst_ratio": round(max(first) / steady, 3),
                                       "after_idle_s": IDLE_GAP_S, "after_idle_ttft_ms": round(after_idle, 3),
                                       "after_idle_server_ttft_ms": self.last_server_timings.get("ttft_ms")}
        except BaseException:
            self.close()
            raise

    def _first_token_ms(self) -> float:
        """Client TTFT of a FIRST_PROMPT-token prompt (one token generated)."""
        return self.generate(list(range(200, 200 + FIRST_PROMPT)), 1)[0]

    def _wait_for_graphs(self, limit_s: float) -> bool:
        """Measure only once the executor has captured its graphs (it captures while idle, after ready).
        Gives up when its report stops changing for GRAPH_STALL_S. True when it reported none pending."""
        last, changed_at = None, time.monotonic()
        deadline = changed_at + limit_s
        while time.monotonic() < deadline:
            graphs = self.client.status().get("executor", {}).get("graphs") or {}
            if not graphs or not graphs.get("pending"):
                return bool(graphs)
            if graphs["pending"] != last:
                last, changed_at = graphs["pending"], time.monotonic()
            elif time.monotonic() - changed_at > GRAPH_STALL_S:
                return False
            time.sleep(GRAPH_POLL_S)
        return False

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        params = {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
        times: list[float] = []
        start = time.perf_counter()
        for msg in self.client.generate(token_ids=prompt_ids, params=params):
            now = (time.perf_counter() - start) * 1e3
            if isinstance(msg, Finished):
                self.last_server_timings = dict(msg.timings)
                self.last_token_ids = list(msg.token_ids)
                if len(times) < len(msg.token_ids):  # tokens that came only with Finished
                    times += [now] * (len(msg.token_ids) - len(times))
            else:
                times += [now] * len(msg.token_ids)
        return times

    def run_concurrent(self, requests: list[tuple[list[int], int, float]]) -> list[list[float]]:
        """Requests (prompt ids, new tokens, start delay in s) sent together from one thread each, each on its own
        client socket; per request its token times in ms from its own start (greedy, EOS ignored)."""
        clients = [Client(self.supervisor.address, timeout_s=self.spec.timeout_s) for _ in requests]
        results: list[list[float] | BaseException] = [[] for _ in requests]
        go = threading.Barrier(len(requests) + 1)

        def one(i: int) -> None:
            prompt, new_tokens, delay = requests[i]
            params = {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
            try:
                go.wait()
                time.sleep(delay)
                times, start = [], time.perf_counter()
                for msg in clients[i].generate(token_ids=prompt, params=params):
                    now = (time.perf_counter() - start) * 1e3
                    count = len(msg.token_ids) - len(times) if isinstance(msg, Finished) else len(msg.token_ids)
                    times += [now] * count
                results[i] = times
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                results[i] = e

        try:
            for c in clients:
                c.status()  # connected before the timed part
            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(requests))]
            for t in threads:
                t.start()
            go.wait()
            for t in threads:
                t.join()
        finally:
            for c in clients:
                c.close()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results

    def generate_chat(self, messages: list[dict], max_tokens: int) -> tuple[list[int], list[float], dict | None]:
        """A chat through the server's tokenizer and template, greedy, EOS respected: token ids, their times at
        this client (ms from the request start) and the server's speculation report."""
        from launch.client import ServerError

        times: list[float] = []
        start = time.perf_counter()
        try:
            for msg in self.client.generate(messages=messages, params={"max_tokens": max_tokens, "temperature": 0.0}):
                now = (time.perf_counter() - start) * 1e3
                if isinstance(msg, Finished):
                    times += [now] * (len(msg.token_ids) - len(times))
                    return msg.token_ids, times, msg.timings.get("speculation")
                times += [now] * len(msg.token_ids)
        except ServerError as e:
            raise EngineUnavailable(f"the server cannot run chats: {e}") from None
        raise RuntimeError("the stream ended without a Finished message")

    def chat_ttft(self, messages: list[dict]) -> float:
        """Client TTFT (ms) of a chat sent as text: the server applies the chat template and tokenizes."""
        from launch.client import ServerError

        start = time.perf_counter()
        try:
            for msg in self.client.generate(messages=messages, params={"max_tokens": 1, "temperature": 0.0}):
                return (time.perf_counter() - start) * 1e3
        except ServerError as e:
            raise EngineUnavailable(f"the server cannot run chats: {e}") from None
        raise RuntimeError("the stream ended without a message")

    def facts(self) -> dict:
        status = self.client.status()
        mps = self.supervisor.mps
        return {"server_status": status, "mps": {"asked": self.spec.mps, "running": bool(mps and mps.running),
                                                 "reason": getattr(mps, "reason", None)},
                "last_request_server_ttft_ms": self.last_server_timings.get("ttft_ms"),
                "graphs": status.get("executor", {}).get("graphs", {}),
                "startup_phases": {"launcher": self.supervisor.startup.facts(),
                                   "graph_executor": status.get("executor", {}).get("startup", {}),
                                   "jit_context": status.get("startup", {})},
                "first_requests": self.first_requests}

    def memory(self) -> dict:
        """The model lives in the executor process; its status carries whatever memory figures it reports."""
        executor = self.client.status().get("executor", {})
        found = {k: v for k, v in executor.items() if k.endswith("_bytes")}
        pool = (executor.get("graphs") or {}).get("graph_pool_bytes")
        return {**found, **({"graph_pool_bytes": pool} if pool is not None else {})}

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
        finally:
            self.supervisor.stop()


def open_engine(spec: BenchSpec, name: str, timeline: Timeline) -> HybridrtE2EEngine:
    return HybridrtE2EEngine(spec, timeline)
