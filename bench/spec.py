"""What one benchmark run measures: engine and workload names, device-dependent defaults, and `BenchSpec`,
the validated, immutable description of a run that the harness hands (as JSON) to every engine process.

Light on imports on purpose: `hybridrt bench --help` and the parent process read it without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from graph_executor.quant.names import QUANTIZE_METHODS as QUANTIZE_NAMES
from jit_context.speculative_config import METHODS

ENGINES = ("hybridrt", "hybridrt-http", "hybridrt-executor", "hf-eager", "hf-compile")
ENGINE_HELP = {
    "hybridrt": "hybridrt end to end: the two-process server, prompts through its client socket",
    "hybridrt-http": "hybridrt end to end through `hybridrt serve`'s OpenAI HTTP API (streamed, over httpx); runs "
                     "the chat workload only, and only when named",
    "hybridrt-executor": "hybridrt in one process (runner with its graphs + generation loop), no sockets",
    "hf-eager": "HF transformers eager, a generate-equivalent greedy loop with its DynamicCache",
    "hf-compile": "HF transformers StaticCache + torch.compile(mode='reduce-overhead') decode (GPU only)",
}
GPU_ONLY_ENGINES = frozenset({"hf-compile"})  # reduce-overhead means CUDA graphs
OPT_IN_ENGINES = ("hybridrt-http",)  # not in the default list nor in "all": named when wanted
OURS = ("hybridrt", "hybridrt-executor")
PEERS = ("hf-eager", "hf-compile")

WORKLOADS = ("ttft", "decode", "context", "startup", "memory", "overhead", "floors", "speculative", "verify", "chat",
             "concurrency", "turns")
WORKLOAD_HELP = {
    "ttft": "time to first token per prompt length (median, P99, min over --repeats), back to back and each after "
            "0.1 s of idle",
    "decode": "per-token latency over --decode-tokens after a prompt (P50/P90/P99/max, tokens/s, CDF)",
    "context": "per-token latency at each --contexts length (prefill c tokens, time --context-steps steps)",
    "startup": "process start -> weights ready -> ready to serve (-> each graph captured, when reported); the "
               "server's start-up phases per process, and the TTFT of the first 5 requests after ready against "
               "steady state",
    "memory": "peak GPU memory (torch.cuda.max_memory_allocated), graph memory when reported; CPU: peak RSS",
    "overhead": "two-process cost: hybridrt end to end minus hybridrt-executor (TTFT and per-token)",
    "floors": "HBM read bandwidth and matmul rate on this card, hence decode and prefill floors",
    "speculative": "hybridrt engines with a tokenizer: tokens/s on 8 input-grounded and 4 open-ended chat "
                   "prompts (bench/data/spec_prompts.json), greedy, up to --spec-tokens each, with the run's "
                   "--speculative method; tokens kept so runs with and without it can be compared",
    "verify": "hybridrt-executor on a GPU: one verify step of k + 1 tokens (k = 1..8) against one decode step, "
              "graph replays at context 512, and the acceptance rate at which speculating breaks even",
    "chat": "hybridrt engines with a tokenizer: TTFT of a short and a long chat sent as text (the server applies "
            "the chat template and tokenizes), median/P99/min over --repeats; with hybridrt-http, the OpenAI "
            "HTTP client's TTFT against the native client's",
    "concurrency": "the hybridrt engine with --max-num-seqs N >= 2: N streams of --decode-tokens tokens at once "
                   "(each stream's per-token P50 against one stream alone on the same server, aggregate tokens/s), "
                   "and a 100-token prompt arriving while N - 1 streams decode, 6 times at points spread over one of "
                   "their steps (its median TTFT against the idle TTFT, and the running streams' worst token gap "
                   "meanwhile against their P50)",
    "turns": "the hybridrt engine: TTFT of a chat's second turn (the first turn's ~560-token prompt, its 20-token reply "
             "and 20 new tokens) against a fresh 20-token prompt's; with --prefix-reuse the second turn prefills only "
             "what the KV cache does not hold",
}
OPT_IN_WORKLOADS = ("speculative", "chat", "concurrency", "turns")  # not in "all": they need a tokenizer and a longer context
SPECULATIVE_METHODS = METHODS  # jit_context.speculative_config (torch-free, as this file stays)
SPEC_PROMPT_CONTEXT = 384  # room for the longest chat prompt of the speculative workload
VERIFY_CONTEXT = 512  # the verify workload's steps run at this position
ARRIVAL_PROMPT = 100  # the concurrency workload's arriving request (issue 14: a 100-token prompt)
ARRIVALS = 6  # arrivals timed (at least; --repeats if more), spread over one decode step of the running streams
TURN_PROMPT, TURN_REPLY, TURN_NEW = 560, 20, 20  # the turns workload's chat (issue 14: ~600 tokens, 20 new)
MPS_MODES = ("auto", "on", "off")
QUANTIZE_METHODS = QUANTIZE_NAMES  # graph_executor.quant.names (torch-free)
# Generated after each timed decode run but not timed: an engine that reads tokens steps behind (hybridrt's
# decode_ahead: up to 2 on a GPU) hands the last ones over at once as its pipeline drains, which would understate its
# per-token latency.
DRAIN_TOKENS = 2
WARMUP_CONTEXT = 32  # each engine warms up on a 16-token prompt and a few tokens before it is timed
GiB = 1024**3


@dataclass(frozen=True)
class Defaults:
    """Per-device defaults: the real shapes on a GPU, a smoke-sized run on the CPU."""

    model: str
    prompt_lens: tuple[int, ...]
    decode_tokens: int
    decode_prompt_len: int
    contexts: tuple[int, ...]
    context_steps: int
    repeats: int


DEFAULTS = {
    # 256 steps at each context: issue 12's P99 target is over 256 tokens (of 64 steps the P99 is the one worst)
    "cuda": Defaults("dummy:llama-2-7b", (10, 25, 50, 100, 200, 300, 400, 500), 256, 50,
                     (128, 512, 1024, 2048), 256, 10),
    "cpu": Defaults("dummy:smollm2-135m", (10, 25, 50), 32, 16, (32, 64, 128), 16, 1),
}


@dataclass(frozen=True)
class BenchSpec:
    """One run, fully resolved (no 'auto' left); validated on construction."""

    model: str
    device: str  # "cuda", "cuda:N" or "cpu"
    dtype: str  # canonical torch name, e.g. "float16"
    engines: tuple[str, ...]
    workloads: tuple[str, ...]
    prompt_lens: tuple[int, ...]
    decode_tokens: int
    decode_prompt_len: int
    contexts: tuple[int, ...]
    context_steps: int
    repeats: int
    max_context: int
    model_config: dict = field(default_factory=dict)  # HF config.json of the model shapes (peers build from it)
    seed: int = 0  # prompt ids and dummy weights
    timeout_s: float = 240.0
    mps: str = "auto"
    tokenizer: str | None = None
    quantize: str | None = None  # the hybridrt engines' --quantize (the peers run the dtype)
    quantize_group: int = 32
    dequantize: bool = False  # a GGUF model dequantized at load instead of kept packed
    speculative: str = "off"  # the hybridrt engines' --speculative
    num_speculative_tokens: int = 8
    spec_tokens: int = 128  # most tokens per prompt of the speculative workload
    draft_model: str | None = None  # the hybridrt engines' --draft-model (runs with --speculative draft)
    max_num_seqs: int = 1  # the hybridrt engine's server holds this many sequences (the concurrency workload)
    tensor_parallel: int = 1  # the hybridrt engines' server splits the model over this many executor ranks
    tp_allreduce: str = "nccl"  # their ranks' decode all-reduces (LoadConfig.tp_allreduce)
    prefix_reuse: bool = False  # the hybridrt engine's server reuses the KV cache's prefix (the turns workload)

    def __post_init__(self) -> None:
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative!r}")
        _check_positive("spec_tokens", self.spec_tokens, 2)
        _check_positive("max_num_seqs", self.max_num_seqs, 1)
        _check_positive("tensor_parallel", self.tensor_parallel, 1)
        if self.max_num_seqs > 1 and self.speculative != "off":
            raise ValueError("--max-num-seqs > 1 serves requests without speculation: use --speculative off")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("a draft run needs --draft-model, and --draft-model only serves draft runs")
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_METHODS)}, got {self.quantize!r}")
        _check_names(self.engines, ENGINES, "engine")
        _check_names(self.workloads, WORKLOADS, "workload")
        for name in ("prompt_lens", "contexts"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name.replace('_', '-')} must be positive integers, got {values!r}")
        _check_positive("decode_tokens", self.decode_tokens, 2)
        _check_positive("decode_prompt_len", self.decode_prompt_len, 1)
        _check_positive("context_steps", self.context_steps, 2)
        _check_positive("repeats", self.repeats, 1)
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.mps not in MPS_MODES:
            raise ValueError(f"mps must be one of {', '.join(MPS_MODES)}, got {self.mps!r}")
        if self.max_context < self.needed_context:
            raise ValueError(f"max-context {self.max_context} is too small for these workloads "
                             f"(they need {self.needed_context} tokens)")

    @property
    def load_flags(self) -> dict:
        """The LoadConfig fields of the weight format, for the hybridrt engines."""
        return {"quantize": self.quantize, "quantize_group": self.quantize_group, "dequantize": self.dequantize,
                "tp_allreduce": self.tp_allreduce}

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def needed_context(self) -> int:
        """Longest prompt + generated tokens any workload runs, + 1 (Generator keeps one slot spare)."""
        steps = 1 + DRAIN_TOKENS  # the first token, from the prefill, and the untimed drain
        return 1 + max(max(self.prompt_lens) + 1 if "ttft" in self.workloads else 0,
                       self.decode_prompt_len + self.decode_tokens + steps if "decode" in self.workloads else 0,
                       max(self.contexts) + self.context_steps + steps if "context" in self.workloads else 0,
                       SPEC_PROMPT_CONTEXT + self.spec_tokens if "speculative" in self.workloads else 0,
                       SPEC_PROMPT_CONTEXT + 2 if "chat" in self.workloads else 0,
                       VERIFY_CONTEXT + 16 if "verify" in self.workloads and self.on_gpu else 0,
                       self.decode_prompt_len + 2 * self.decode_tokens + steps if "concurrency" in self.workloads
                       else 0, ARRIVAL_PROMPT + 2 if "concurrency" in self.workloads else 0,
                       TURN_PROMPT + TURN_REPLY + TURN_NEW + 2 if "turns" in self.workloads else 0,
                       WARMUP_CONTEXT)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchSpec:
        tuples = ("engines", "workloads", "prompt_lens", "contexts")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


def _check_names(values: tuple[str, ...], known: tuple[str, ...], what: str) -> None:
    if not values:
        raise ValueError(f"no {what}s given (choose from: {', '.join(known)})")
    for v in values:
        if v not in known:
            raise ValueError(f"unknown {what} {v!r} (choose from: {', '.join(known)})")


def _check_positive(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")


def parse_names(text: str, known: tuple[str, ...], what: str, opt_in: tuple[str, ...] = ()) -> tuple[str, ...]:
    """A comma list of names; 'all' means every known one but those only run when named (`opt_in`). Order
    follows `known`, duplicates dropped."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return tuple(n for n in known if n not in opt_in)
    _check_names(tuple(names), known, what)
    return tuple(n for n in known if n in names)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """A comma list of positive integers, sorted, duplicates dropped."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must be a comma list of positive integers, got {text!r}")
    return tuple(sorted(set(values)))
