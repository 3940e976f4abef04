"""From what the user asked (`BenchOptions`, 'auto' and None allowed) to a `BenchSpec` this machine can run:
device and dtype resolved, device defaults filled in, GPU-only engines refused on a CPU, and the model
checked against free GPU memory (or RAM) before any engine process starts, by the rules loading uses:
the loader's model resolution and graph_executor.memory's `check_fits`.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.envinfo import REPO_ROOT, card_slug, gpu_info
from bench.model_info import weight_plan
from bench.spec import (
    DEFAULTS,
    ENGINES,
    GPU_ONLY_ENGINES,
    OPT_IN_ENGINES,
    OPT_IN_WORKLOADS,
    OURS,
    WORKLOADS,
    BenchSpec,
    parse_ints,
    parse_names,
)
from graph_executor.loading import default_model
from graph_executor.loading.loader import resolve_model_config
from graph_executor.memory import check_fits, host_available_bytes
from graph_executor.tensor_parallel import TensorParallel
from ipc.errors import DeviceError, HybridrtError

CONTEXT_ROUND = 256  # default max context: what the workloads need, rounded up to this
# The GPU path captures its prefill buckets (every 32 rows) below the max context only: the default context leaves a
# bucket's room above what the workloads need, so that the longest prompt's bucket is a graph too (a 500-token prompt
# with a context of 512 ran as a 480-row chunk and a 20-row extend: 16.3 ms against 11.7 on the H200).
BUCKET_ROOM = 32


@dataclass(frozen=True)
class BenchOptions:
    """Flags as given; None means the device's default."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    engines: str | None = None  # comma list; None: every engine this device runs
    workloads: str = "all"
    prompt_lens: str | None = None
    decode_tokens: int | None = None
    decode_prompt_len: int | None = None
    contexts: str | None = None
    context_steps: int | None = None
    repeats: int | None = None
    max_context: int | None = None
    seed: int = 0
    timeout_s: float = 240.0
    mps: str = "auto"
    tokenizer: str | None = None
    quantize: str | None = None
    quantize_group: int = 32
    dequantize: bool = False
    peers: bool = True  # False: only the hybridrt engines (a quantized run: the peers run the dtype only)
    speculative: str = "off"
    num_speculative_tokens: int = 8
    spec_tokens: int = 128
    draft_model: str | None = None
    max_num_seqs: int = 1
    tensor_parallel: int = 1
    tp_allreduce: str = "nccl"
    prefix_reuse: bool = False


def resolve_device_name(name: str) -> str:
    from graph_executor.device import resolve_device

    return str(resolve_device(name))


def resolve_dtype_name(name: str, device: str) -> str:
    """Canonical dtype name; on a GPU without touching CUDA (the parent must not hold a CUDA context)."""
    from graph_executor.device import DTYPE_NAMES, resolve_dtype

    if not device.startswith("cuda"):
        return str(resolve_dtype(name, torch.device(device))).removeprefix("torch.")
    if name == "auto":
        return "float16"
    if name not in DTYPE_NAMES:
        raise DeviceError(f"dtype {name!r} is not supported (choose float16, bfloat16 or float32)")
    return str(DTYPE_NAMES[name]).removeprefix("torch.")


def _engines(text: str | None, device: str) -> tuple[str, ...]:
    on_gpu = device.startswith("cuda")
    engines = (parse_names(text, ENGINES, "engine", OPT_IN_ENGINES) if text
               else tuple(e for e in ENGINES if (on_gpu or e not in GPU_ONLY_ENGINES) and e not in OPT_IN_ENGINES))
    for e in engines:
        if e in GPU_ONLY_ENGINES and not on_gpu:
            raise DeviceError(f"engine {e} needs a CUDA GPU (torch.compile reduce-overhead captures CUDA graphs); "
                              f"this run is on {device}")
    return engines


def resolve_spec(opts: BenchOptions) -> BenchSpec:
    device = resolve_device_name(opts.device)
    d = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    engines = _engines(opts.engines, device)
    if not opts.peers:
        engines = tuple(e for e in engines if e in OURS or e in OPT_IN_ENGINES)
        if not engines:
            raise HybridrtError("--quantize runs only the hybridrt engines; --engines names none of them")
    workloads = parse_names(opts.workloads, WORKLOADS, "workload", OPT_IN_WORKLOADS)
    model = opts.model or d.model
    name, cfg = resolve_model_config(model)
    if name == default_model.DEFAULT_MODEL_NAME:  # converted here, once, so no engine's timed start-up does it
        default_model.ensure_converted(progress=False)
    # First with an unbounded context, to learn what the workloads need.
    spec = BenchSpec(
        model=model, device=device, dtype=resolve_dtype_name(opts.dtype, device), engines=engines,
        workloads=workloads,
        prompt_lens=parse_ints(opts.prompt_lens, "prompt-lens") if opts.prompt_lens else d.prompt_lens,
        decode_tokens=_pick(opts.decode_tokens, d.decode_tokens),
        decode_prompt_len=_pick(opts.decode_prompt_len, d.decode_prompt_len),
        contexts=parse_ints(opts.contexts, "contexts") if opts.contexts else d.contexts,
        context_steps=_pick(opts.context_steps, d.context_steps), repeats=_pick(opts.repeats, d.repeats),
        max_context=1 << 30, model_config=cfg.to_hf_dict(), seed=opts.seed, timeout_s=opts.timeout_s,
        mps=opts.mps, tokenizer=opts.tokenizer, quantize=opts.quantize, quantize_group=opts.quantize_group,
        dequantize=opts.dequantize, speculative=opts.speculative,
        num_speculative_tokens=opts.num_speculative_tokens, spec_tokens=opts.spec_tokens,
        draft_model=opts.draft_model if opts.speculative == "draft" else None, max_num_seqs=opts.max_num_seqs,
        tensor_parallel=opts.tensor_parallel, tp_allreduce=opts.tp_allreduce, prefix_reuse=opts.prefix_reuse,
    )
    limit, needed = cfg.max_position_embeddings, spec.needed_context
    if max(needed, opts.max_context or 0) > limit:
        raise HybridrtError(f"{model} supports a context of {limit} tokens; these workloads need {needed} "
                            f"(max-context {opts.max_context or 'default'}): use shorter --prompt-lens, "
                            f"--contexts or --decode-tokens")
    rounded = min(-(-(needed + BUCKET_ROOM) // CONTEXT_ROUND) * CONTEXT_ROUND, limit)
    spec = dataclasses.replace(spec, max_context=opts.max_context or rounded)  # validates it again
    if spec.quantize and model.endswith(".gguf"):
        raise HybridrtError("--quantize applies to HF checkpoints and dummy models; a GGUF file is already "
                            "quantized (--dequantize runs it in --dtype)")
    try:
        weight_plan(spec)  # a --quantize-group that does not divide the model's sizes fails here
    except ValueError as e:
        raise HybridrtError(str(e)) from None
    available = free_bytes(spec)
    if available is not None:  # unknown: skipped (asking CUDA would give this process a context)
        if spec.tensor_parallel > 1 and device.startswith("cuda"):  # each GPU holds one rank's part
            try:
                cfg = TensorParallel(0, spec.tensor_parallel).local_config(cfg)
            except ValueError as e:
                raise HybridrtError(str(e)) from None
        check_fits(model, cfg, getattr(torch, spec.dtype), spec.max_context, torch.device(device), available)
    return spec


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


def free_bytes(spec: BenchSpec) -> int | None:
    """Free GPU memory (from nvidia-smi: the parent must not hold a CUDA context) or available RAM; None where
    unknown."""
    if not spec.on_gpu:
        return host_available_bytes()
    gpu = gpu_info(spec.device)
    return gpu.free_bytes if gpu else None


def default_out_dir(spec: BenchSpec) -> Path:
    """bench/results/<date>-<card>-<model>/; a numbered suffix keeps earlier runs of the same day."""
    card = "cpu"
    if spec.on_gpu:
        gpu = gpu_info(spec.device)
        card = card_slug(gpu.name) if gpu else "gpu"
    model = Path(spec.model.removeprefix("dummy:")).name.removesuffix(".gguf").lower()
    base = REPO_ROOT / "bench" / "results" / f"{datetime.date.today().isoformat()}-{card}-{model}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path

