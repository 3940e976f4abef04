"""Engine `hybridrt-executor`: hybridrt in one process (`LocalEngine`: model runner + generation loop and
sampler), no sockets, every graph captured before the first request. TTFT is prompt ids in -> first sampled
token on the host.
"""

from __future__ import annotations

import time

from bench.procinfo import Timeline, process_memory
from bench.spec import BenchSpec

WARMUP_PROMPT = 16
WARMUP_TOKENS = 4


class ExecutorEngine:
    def __init__(self, spec: BenchSpec, timeline: Timeline) -> None:
        from graph_executor.loading.loader import LoadConfig
        from jit_context.sampling_params import SamplingParams
        from launch.local import LocalEngine

        self.spec = spec
        self._params = SamplingParams
        load = LoadConfig(model=spec.model, device=spec.device, dtype=spec.dtype, max_context=spec.max_context,
                          seed=spec.seed, progress=False, **spec.load_flags)
        before = time.time()
        self.local = LocalEngine(load, spec.tokenizer)
        timeline.mark("weights_ready", at=before + self.local.loaded.load_seconds)
        timeline.mark("ready")
        self.generate(list(range(100, 100 + WARMUP_PROMPT)), WARMUP_TOKENS)
        timeline.mark("warm")

    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        params = self._params(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        *_, result = self.local.generator.generate(prompt_ids, params, start_time=start)
        return result.token_times_ms

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


def open_engine(spec: BenchSpec, name: str, timeline: Timeline) -> ExecutorEngine:
    return ExecutorEngine(spec, timeline)
