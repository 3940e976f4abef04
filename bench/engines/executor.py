"""Engine `hybridrt-executor`: hybridrt in one process (`LocalEngine`: model runner + generation loop and
sampler), no sockets, every graph captured before the first request. TTFT is prompt ids in -> first sampled
token on the host.
"""

from __future__ import annotations

import time

from bench.procinfo import Timeline, process_memory
from bench.spec import VERIFY_CONTEXT, BenchSpec
from bench.workloads import EngineUnavailable, prompt_ids

WARMUP_PROMPT = 16
WARMUP_TOKENS = 4


class ExecutorEngine:
    def __init__(self, spec: BenchSpec, timeline: Timeline) -> None:
        from graph_executor.loading.loader import LoadConfig
        from jit_context.sampling_params import SamplingParams
        from jit_context.speculative_config import SpeculativeConfig
        from launch.local import LocalEngine

        if spec.tensor_parallel > 1:
            raise EngineUnavailable("the in-process engine runs one rank: --tensor-parallel needs the server engines")
        self.spec = spec
        self._params = SamplingParams
        load = LoadConfig(model=spec.model, device=spec.device, dtype=spec.dtype, max_context=spec.max_context,
                          seed=spec.seed, progress=False, **spec.load_flags)
        before = time.time()
        speculation = SpeculativeConfig(spec.speculative, spec.num_speculative_tokens)
        self.local = LocalEngine(load, spec.tokenizer, speculation=speculation, draft_model=spec.draft_model)
        timeline.mark("weights_ready", at=before + self.local.loaded.load_seconds)
        timeline.mark("ready")
        self.generate(list(range(100, 100 + WARMUP_PROMPT)), WARMUP_TOKENS)
        timeline.mark("warm")

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        params = self._params(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        *_, result = self.local.generator.generate(prompt_ids, params, start_time=start)
        return result.token_times_ms

    def generate_chat(self, messages: list[dict], max_tokens: int) -> tuple[list[int], list[float], dict | None]:
        """A chat through the tokenizer's template, greedy, EOS respected: token ids, their times (ms from the
        request start) and what speculation did."""
        from launch.local import PromptInput

        if self.local.tokenizer is None:
            raise EngineUnavailable("the model has no tokenizer (pass --tokenizer)")
        start = time.perf_counter()
        ids = self.local.prompt_ids(PromptInput(messages=messages))
        *_, result = self.local.generator.generate(ids, self._params(max_tokens=max_tokens, temperature=0.0),
                                                   start_time=start)
        return result.token_ids, result.token_times_ms, result.speculation

    def verify_cost(self) -> dict:
        """One verify step of k + 1 tokens (k = 1..8) against one decode step, each replayed back to back at
        position VERIFY_CONTEXT after a prompt of that length (CUDA events over REPLAYS replays), and the
        acceptance rate a at which a verify step yields as many tokens per unit of time as decoding:
        1 + a + ... + a^k = verify ms / decode ms."""
        import torch

        runner = self.local.runner
        if not hasattr(runner, "verify") or not hasattr(runner, "graphs"):
            return {"skipped": "needs the GPU path's graphs"}
        runner.capture_all()
        b, n = runner.buffers, VERIFY_CONTEXT
        ids = prompt_ids(n + 16, self.spec.model_config["vocab_size"], self.spec.seed)
        b.input_ids[:n + 16].copy_(torch.tensor(ids))
        runner.prefill(n)
        b.next_token.fill_(ids[n])

        def timed(step) -> float:
            for _ in range(5):
                step()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPLAYS):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / REPLAYS

        decode_ms = timed(lambda: runner.decode(n))
        port = self.local.port
        if port.draft is not None:  # the draft's cache holds the prompt too, as after a request's first verify
            port.draft.runner.prefill(n)
        rows = {}
        for k in range(1, 9):
            ms = timed(lambda: runner.verify(n, k + 1))
            rows[str(k)] = {"verify_ms": round(ms, 4), "vs_decode": round(ms / decode_ms, 4),
                            "break_even_acceptance": break_even(ms / decode_ms, k)}
            if port.draft is not None:  # the draft runs over one new token and proposes k, then the verify
                ms = timed(lambda: port.verify(n, k + 1, draft_start=n))
                rows[str(k)].update(with_draft_ms=round(ms, 4), with_draft_vs_decode=round(ms / decode_ms, 4),
                                    with_draft_break_even=break_even(ms / decode_ms, k))
        return {"context": n, "replays": REPLAYS, "decode_ms": round(decode_ms, 4), "k": rows,
                "draft_model": self.spec.draft_model}

    def _graphs(self) -> dict:
        """The GPU path's capture facts (captured: name -> seconds, pending, graph_pool_bytes); {} when eager."""
        report = getattr(self.local.runner, "facts", None)
        return report() if callable(report) else {}

    def facts(self) -> dict:
        return {"load_seconds": round(self.local.loaded.load_seconds, 3), "source": self.local.loaded.source,
                "runner": type(self.local.runner).__name__, "max_context": self.local.runner.max_context,
                "graphs": self._graphs()}

    def memory(self) -> dict:
        pool = self._graphs().get("graph_pool_bytes")
        loaded = self.local.loaded
        weights = {"weight_bytes": loaded.weight_bytes}
        if loaded.allocated_bytes is not None:  # what the GPU holds after load, less the KV cache
            kv = loaded.model.kv_cache
            weights["weights_resident_bytes"] = loaded.allocated_bytes - kv.numel() * kv.element_size()
        return {**process_memory(self.spec.device), **weights,
                **({"graph_pool_bytes": pool} if pool is not None else {})}

    def close(self) -> None:
        self.local = None


REPLAYS = 50


def break_even(cost: float, k: int) -> float | None:
    """The a in [0, 1) with 1 + a + ... + a^k = cost (expected tokens per verify of k proposals with a per-token
    acceptance rate a); 0 when the verify costs no more than a decode, None when even a = 1 does not pay."""
    if cost <= 1:
        return 0.0
    if cost >= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(k + 1)) < cost:
            lo = mid
        else:
            hi = mid
    return round(lo, 4)


def open_engine(spec: BenchSpec, name: str, timeline: Timeline) -> ExecutorEngine:
    return ExecutorEngine(spec, timeline)
