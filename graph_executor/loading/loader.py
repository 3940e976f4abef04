"""Turn a model reference (HF folder, GGUF file, `dummy:<name>`, the default model) into a `LlamaModel` on a device."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from graph_executor.device import resolve_device, resolve_dtype
from graph_executor.loading import cache, default_model
from graph_executor.loading.config import ModelConfig
from graph_executor.loading.load_config import DEFAULT_MAX_CONTEXT, LOAD_FORMATS, LoadConfig  # noqa: F401
from graph_executor.loading.mapped_weights import map_slots
from graph_executor.loading.model_source import DEFAULT, safetensors_files, source_of
from graph_executor.loading.presets import preset
from graph_executor.loading.shape_rules import QUANTIZE_GGUF, check_part_group
from graph_executor.loading.tokenizer_location import GGUF_TOKENIZER_KIND, tokenizer_files_in
from graph_executor.loading.weight_map import check_complete, copy_into, tie_lm_head, tp_part
from graph_executor.memory import check_fits
from graph_executor.model import LlamaModel
from graph_executor.quant import rows
from graph_executor.quant.apply import quantize_model
from graph_executor.quant.specs import WeightPlan, describe, quantize_plan
from graph_executor.quant.tiles import DEFAULT_KINDS, DEFAULT_SLOTS, tile_model
from graph_executor.tensor_parallel import TensorParallel
from ipc.errors import ModelLoadError


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaModel
    name: str
    source: str  # "safetensors" | "gguf" | "dummy"
    tokenizer_path: Path | None  # folder with tokenizer files or a .gguf; None for dummy weights
    load_seconds: float
    converted_default: bool  # True when this load built the cached copy of the default model
    weight_format: str = ""  # e.g. "float16", "int4-g32+offset (embed_tokens: int8-g32)"; see quant/specs.py
    allocated_bytes: int | None = None  # GPU: torch.cuda.memory_allocated after the load (weights + KV cache)
    phases: dict[str, float] = field(default_factory=dict)  # the load's parts -> seconds, in order

    @property
    def kv_cache_bytes(self) -> int:
        return self.model.kv_caches.nbytes  # every slot's

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (packed slots: codes + scales + offsets), counted from the tensors."""
        m = self.model
        slots = {id(w): rows.nbytes(w) for w in [m.embed_tokens, m.lm_head]
                 + [getattr(layer, n) for layer in m.layers for n in ("qkv_proj", "o_proj", "gate_up_proj",
                                                                       "down_proj")]}
        dense = sum(b.numel() * b.element_size() for name, b in m.named_buffers()
                    if name not in ("rope", "kv_caches") and not name.endswith(("_proj", "embed_tokens", "lm_head")))
        return sum(slots.values()) + dense


def load_model(cfg: LoadConfig) -> LoadedModel:
    start = time.perf_counter()
    phases: dict[str, float] = {}
    lap = _Lap(phases)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source, path, converted = _resolve_source(cfg)
    reader = None
    files: list[Path] = []
    if source == "dummy":
        config = preset(path)
    elif source == "gguf":
        from graph_executor.loading.gguf_loader import gguf_config, open_gguf  # gguf only for GGUF files (start-up)

        reader = open_gguf(path)
        config = gguf_config(reader)
    else:
        config = ModelConfig.from_json_file(Path(path) / "config.json")
        files = safetensors_files(Path(path))  # a folder without its weights is one line before anything is allocated
    plan = _weight_plan(cfg, source, config, reader)
    max_context = _max_context(cfg, config)
    if max_context > config.max_position_embeddings and cfg.progress:
        print(f"warning: --max-context {max_context} is above the {config.max_position_embeddings} positions "
              f"{cfg.model} was trained for: positions past them extrapolate RoPE, and quality may drop",
              file=sys.stderr, flush=True)
    # --quantize loads dense first: the peak is the dense model; a packed GGUF is allocated packed
    tp = TensorParallel(cfg.tp_rank, cfg.tensor_parallel) if cfg.tensor_parallel > 1 else None
    full_config = config
    if tp is not None:
        try:
            config = tp.local_config(config)  # this rank's heads, KV heads and MLP width
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        if cfg.quantize:  # each rank quantizes its part
            try:
                check_part_group(cfg.quantize, cfg.quantize_group, config, tp.size)
            except ValueError as e:
                raise ModelLoadError(str(e)) from None
            plan = quantize_plan(cfg.quantize, cfg.quantize_group, config)
        if cfg.tp_allreduce == "peer":  # every rank here at once: the regions' handles are swapped
            if device.type != "cuda":
                raise ModelLoadError("--tp-allreduce peer needs GPU ranks (CPU ranks sum over gloo)")
            try:
                tp = tp.with_peer_allreduce(config.hidden_size, dtype, device)
            except ValueError as e:
                raise ModelLoadError(str(e)) from None
    slots = _fitting_slots(cfg, config, dtype, max_context, device, None if cfg.quantize else plan)
    lap("config" if converted is None else "config (default model conversion included)")
    model = LlamaModel(config, max_context, device, dtype, plan=None if cfg.quantize or device.type == "cpu"
                       else plan, slots=slots, tp=tp, full_config=full_config)
    lap("allocation (weights and KV cache)")
    if source == "dummy":
        _fill_random(model, cfg.seed + cfg.tp_rank)  # each rank fills its own part (not the whole model's slices)
        lap("weights")
        tokenizer = None
    elif source == "gguf":
        if plan.dequantized and device.type == "cuda" and cfg.progress:
            print(f"dequantizing at load (no packed format for their types): {', '.join(plan.dequantized)}",
                  flush=True)
        _load_gguf(model, reader, cfg.progress)
        lap("weights")
        tokenizer = gguf_tokenizer(Path(path), cfg.progress) if "tokenizer.ggml.tokens" in reader.fields \
            else Path(path)  # no vocabulary inside: nothing to convert (a JIT context then needs --tokenizer)
        lap("tokenizer files")
    else:
        _load_safetensors(model, files, cfg.progress)
        lap("weights")
        tokenizer = Path(path) if tokenizer_files_in(Path(path)) else None
    if cfg.quantize:
        quantize_model(model, plan, cfg.progress)
        lap("quantization")
    if device.type == "cuda" and plan.packed and cfg.tile_packed:
        tile_model(model, DEFAULT_SLOTS, DEFAULT_KINDS)
        lap("tile-major packed weights")
    allocated = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated = torch.cuda.memory_allocated(device)
    name = default_model.DEFAULT_MODEL_NAME if converted is not None else cfg.model
    weight_format = describe(plan, dtype)
    if plan.packed and device.type == "cpu":
        weight_format += f" (dequantized to {str(dtype).removeprefix('torch.')} on the cpu)"
    return LoadedModel(model, name, source, tokenizer, time.perf_counter() - start, bool(converted),
                       weight_format, allocated, phases)


class _Lap:
    """Records the seconds since the previous lap under a name (a load's phases)."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases, self.last = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(now - self.last, 3)
        self.last = now


def gguf_tokenizer(path: Path, progress: bool) -> Path:
    """A folder with the tokenizer files of a GGUF file (its vocabulary, merges, special tokens and chat template),
    converted once per machine into the conversion cache: a JIT context then loads it in well under a second
    instead of parsing the GGUF again (~5-10 s on 2 cores). The GGUF itself when the cache is not usable."""
    def build(out: Path) -> None:
        from transformers import AutoTokenizer

        if progress:
            print(f"caching the tokenizer of {path.name} (once per machine)", file=sys.stderr, flush=True)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True) \
            .save_pretrained(str(out))

    try:
        folder, _ = cache.converted(path.stem, GGUF_TOKENIZER_KIND, path, build, private_fallback=False)
    except Exception:  # noqa: BLE001 - no usable vocabulary in the file: the JIT context reports it if it needs one
        return path
    return folder or path


def _weight_plan(cfg: LoadConfig, source: str, config: ModelConfig, reader) -> WeightPlan:
    """Which slots are stored packed, and how (one line of error for a flag that does not apply)."""
    if cfg.quantize:
        if source == "gguf":
            raise ModelLoadError(QUANTIZE_GGUF)
        try:
            return quantize_plan(cfg.quantize, cfg.quantize_group, config)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    if source == "gguf" and not cfg.dequantize:
        from graph_executor.loading.gguf_loader import gguf_plan

        return gguf_plan(reader, config)
    return WeightPlan()


def draft_config(model: str, target: LoadedModel, device: str, seed: int, progress: bool) -> LoadConfig:
    """How a draft model for `target` loads: the target's device, activation dtype and context; GGUF files keep
    their packed types (a small draft reads few bytes either way)."""
    return LoadConfig(model=model, device=device, dtype=str(target.model.dtype).removeprefix("torch."),
                      max_context=target.model.max_context, seed=seed, progress=progress)


def check_load_config(cfg: LoadConfig) -> ModelConfig:
    """The cheap checks of `load_model` (device, dtype, model reference, config, and on the CPU whether it fits),
    reading no weights, so that a launcher can report bad input in one line before it starts any process."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    _, config = resolve_model_config(cfg.model, cfg.load_format)
    if cfg.quantize:
        source = "gguf" if cfg.load_format == "gguf" or cfg.model.endswith(".gguf") else "other"
        _weight_plan(cfg, source, config, None)
    if device.type == "cpu":  # a GPU's free memory would cost this process a CUDA context: the executor checks
        check_fits(cfg.model, config, dtype, _max_context(cfg, config), device)
    return config


def resolve_model_config(reference: str, load_format: str = "auto") -> tuple[str, ModelConfig]:
    """(name, config) of a model reference as `load_model` resolves it (`dummy:<name>`, the default model, an HF
    folder, a .gguf file), reading no weights and converting nothing; the name is the one `load_model` reports.
    The default model's config is its preset (the converted copy's config.json may not exist yet)."""
    source, path = source_of(reference, load_format)  # the default model: installed, or one clear line now
    if source == "dummy":
        return reference, preset(path)
    if source == DEFAULT:
        return default_model.DEFAULT_MODEL_NAME, preset(default_model.DEFAULT_PRESET)
    if source == "gguf":
        from graph_executor.loading.gguf_loader import gguf_config, open_gguf

        return reference, gguf_config(open_gguf(path))
    config = ModelConfig.from_json_file(Path(path) / "config.json")
    safetensors_files(Path(path))  # a folder without its weights is one line now, not after a process loads torch
    return reference, config


def _fitting_slots(cfg: LoadConfig, config: ModelConfig, dtype: torch.dtype, max_context: int,
                   device: torch.device, plan: WeightPlan | None, available: int | None = None) -> int:
    """cfg.max_num_seqs KV slots, or with `fit_slots` (a default count, one rank) the most of them that fit, halving
    down to one (one line says so); ModelLoadError when none fits. `available`: as check_fits'."""
    slots = cfg.max_num_seqs
    while True:
        try:
            check_fits(cfg.model, config, dtype, max_context, device, available=available, plan=plan, slots=slots)
            break
        except ModelLoadError:
            if not cfg.fit_slots or cfg.tensor_parallel > 1 or slots == 1:
                raise
            slots //= 2
    if slots != cfg.max_num_seqs:
        print(f"note: {cfg.max_num_seqs} KV caches of {max_context} tokens do not fit next to {cfg.model}: serving "
              f"{slots} sequence{'s' if slots > 1 else ''} at once (--max-num-seqs and --max-context set this)",
              file=sys.stderr, flush=True)
    return slots


def _max_context(cfg: LoadConfig, config: ModelConfig) -> int:
    return cfg.max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)


def _resolve_source(cfg: LoadConfig) -> tuple[str, str, bool | None]:
    """(format, path-or-preset, converted?) where converted is None unless this is the default model (converted to
    safetensors once per machine, here)."""
    fmt, path = source_of(cfg.model, cfg.load_format)
    if fmt == DEFAULT:
        folder, converted = default_model.ensure_converted(progress=cfg.progress)
        return "safetensors", str(folder), converted
    return fmt, path, None


def _load_safetensors(model: LlamaModel, files: list[Path], progress: bool) -> None:
    device = str(model.embed_tokens.device)
    loaded: set[str] = set()
    handles = [_open_safetensors(file, device) for file in files]  # safetensors' checks of each file first
    if model.device.type == "cpu" and model.tp is None:  # slots the files hold in place become views of them
        loaded = map_slots(model, files)
    total = sum(len(f.keys()) for f in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
        for file, f in zip(files, handles, strict=True):
            with f:
                for name in f.keys():
                    if name in loaded:
                        bar.update()
                        continue
                    part = tp_part(model, name)  # a tensor-parallel rank reads only its rows or columns
                    try:
                        tensor = f.get_tensor(name) if part is None else f.get_slice(name)[part]
                    except Exception as e:  # safetensors' own error type: a file cut short or damaged
                        raise ModelLoadError(f"cannot read tensor {name!r} of {file}: {e}") from None
                    copy_into(model, name, tensor.to(model.dtype), sliced=True)
                    loaded.add(name)
                    bar.update()
    check_complete(model, loaded)
    tie_lm_head(model)


def _open_safetensors(file: Path, device: str):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as e:  # SafetensorError (a truncated or damaged file), OSError
        raise ModelLoadError(f"cannot read {file}: {e} (a truncated or damaged .safetensors file?)") from None


def _load_gguf(model: LlamaModel, reader, progress: bool) -> None:
    """Packed slots of the model's plan get the file's blocks converted on the device; the rest is dequantized."""
    from graph_executor.loading.gguf_loader import iter_gguf_tensors, weight_tensor_count

    loaded: set[str] = set()
    device = model.device
    # a tensor-parallel rank reads its rows or columns of each tensor (`iter_gguf_tensors`' part_of)
    part_of = (lambda name: tp_part(model, name)) if model.tp is not None else None
    tensors = iter_gguf_tensors(reader, model.full_config, model.plan, device, part_of)
    for name, w in tqdm(tensors, total=weight_tensor_count(reader), desc="loading weights", unit="tensor",
                        disable=not progress):
        if isinstance(w, np.ndarray):  # float32, dequantized by the gguf package
            w = torch.from_numpy(w).to(device=device, dtype=model.dtype)
        copy_into(model, name, w, sliced=part_of is not None)
        loaded.add(name)
    check_complete(model, loaded)
    tie_lm_head(model)


def _fill_random(model: LlamaModel, seed: int) -> None:
    """Random weights in real shapes, made on the target device in the target dtype (fast for 7B)."""
    gen = torch.Generator(device=model.embed_tokens.device).manual_seed(seed)
    for name, buf in model.named_buffers():
        if name in ("rope", "kv_caches"):
            continue
        if name.endswith("norm"):
            buf.fill_(1.0)
        else:
            buf.normal_(0.0, 0.02, generator=gen)
