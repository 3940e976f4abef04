"""Peer engines on HF transformers, random weights in the same shapes as ours (latency does not depend on
values):

- `hf-eager`: a generate-equivalent greedy loop (prefill keeping only the last logits, argmax, one token per
  forward) over a DynamicCache; the token reaches the host each step, as `generate`'s stop checks make it. SDPA's
  cuDNN backend is off in this engine: on Hopper torch (2.11) prefers it, and it builds a plan for every new
  sequence length (~1.4 ms of host time per layer call, measured on an H200 with `bench.probes.hf_eager`), so a
  DynamicCache that grows by one token a step paid a plan build in every layer of every step: 57-97 ms a token on
  LLaMA-2-7B instead of 21-23 (flash / memory-efficient SDPA). The figure then measured plan building, not eager
  PyTorch; the facts record `sdpa_cudnn: false`.
- `hf-compile`: the same loop over a StaticCache with the decode step under
  torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs); prefill runs eagerly, as in HF's recipe.
  It keeps SDPA's backends as torch picks them: its decode step has one length (the StaticCache's), and a prefill
  builds its plan once per prompt length (in the first of the TTFT workload's repeats, hence its P99, not median).
"""

from __future__ import annotations

import contextlib
import inspect
import time

import torch

from bench.procinfo import Timeline, process_memory
from bench.spec import BenchSpec

WARMUP_PROMPT = 16
WARMUP_TOKENS = 6  # reduce-overhead compiles on the first call and records graphs on the next ones


def _no_init_weights():
    """Skip HF's weight init (we fill random values ourselves, much faster); its home moved in transformers 5."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(module, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build_hf_model(hf_config: dict, device: str, dtype: torch.dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(hf_config)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device(device), _no_init_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model = model.to(dtype).eval()
    if config.tie_word_embeddings:
        model.tie_weights()  # skipped along with the init
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def _sync_ms(token: torch.Tensor, start: float) -> float:
    int(token)  # the token on the host: a device sync
    return (time.perf_counter() - start) * 1e3


def make_static_cache(model, max_len: int, device: str, dtype: torch.dtype):
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    if "max_batch_size" in params:  # transformers 4.x
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device=device, dtype=dtype)
    return StaticCache(config=model.config, max_cache_len=max_len)


class HfEngine:
    def __init__(self, spec: BenchSpec, compiled: bool, timeline: Timeline) -> None:
        import transformers

        timeline.mark("imports_done")
        self.spec, self.compiled = spec, compiled
        if spec.on_gpu and not compiled:  # why: the module docstring (per-length cuDNN plans)
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.device, self.dtype = spec.device, getattr(torch, spec.dtype)
        self.model = build_hf_model(spec.model_config, spec.device, self.dtype, spec.seed)
        # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40).
        forward_args = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        if spec.on_gpu:
            torch.cuda.synchronize(spec.device)
        timeline.mark("weights_ready")
        self._facts = {"transformers": transformers.__version__, "attn_implementation":
                       getattr(self.model.config, "_attn_implementation", None),
                       "params": sum(p.numel() for p in self.model.parameters()),
                       "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled() if spec.on_gpu else None}
        if compiled:
            self.cache = make_static_cache(self.model, spec.max_context, spec.device, self.dtype)
            self._step = torch.compile(self._decode_step, mode="reduce-overhead", fullgraph=True)
        timeline.mark("ready")
        start = time.perf_counter()
        for _ in range(2 if compiled else 1):
            self.generate(list(range(100, 100 + WARMUP_PROMPT)), WARMUP_TOKENS)
        self._facts["warmup_compile_s"] = round(time.perf_counter() - start, 3)
        timeline.mark("warm")

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token [1, 1], position [1] -> next token [1, 1]; compiled as one graph."""
        logits = self.model(input_ids=token, position_ids=position.unsqueeze(0), cache_position=position,
                            use_cache=True, **{self._cache_kw: self.cache}).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        return self._generate_static(prompt_ids, new_tokens) if self.compiled else \
            self._generate_dynamic(prompt_ids, new_tokens)

    def _generate_dynamic(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        from transformers import DynamicCache

        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=self.device)  # [1, T]
        cache = DynamicCache()
        logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        times = [_sync_ms(token, start)]
        for _ in range(new_tokens - 1):
            logits = self.model(input_ids=token, use_cache=True, **{self._cache_kw: cache}).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            times.append(_sync_ms(token, start))
        return times

    def _generate_static(self, prompt_ids: list[int], new_tokens: int) -> list[float]:
        self.cache.reset()
        n = len(prompt_ids)
        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=self.device)  # [1, T]
        positions = torch.arange(n, device=self.device)  # [T]
        logits = self.model(input_ids=ids, cache_position=positions, use_cache=True, logits_to_keep=1,
                            **{self._cache_kw: self.cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        times = [_sync_ms(token, start)]
        for i in range(new_tokens - 1):
            position = torch.tensor([n + i], device=self.device)  # [1]
            torch.compiler.cudagraph_mark_step_begin()
            token = self._step(token, position).clone()  # the graph's output buffer is reused by the next replay
            times.append(_sync_ms(token, start))
        return times

    def facts(self) -> dict:
        return dict(self._facts)

    def memory(self) -> dict:
        return process_memory(self.spec.device)

    def close(self) -> None:
        self.model = None


def open_engine(spec: BenchSpec, name: str, timeline: Timeline) -> HfEngine:
    return HfEngine(spec, compiled=name == "hf-compile", timeline=timeline)
