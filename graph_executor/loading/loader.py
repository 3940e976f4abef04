"""Turn a model reference (HF folder, GGUF file, `dummy:<name>`, the default model) into a `LlamaModel` on a device."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from graph_executor.device import resolve_device, resolve_dtype
from graph_executor.loading import default_model
from graph_executor.loading.config import ModelConfig
from graph_executor.loading.gguf_loader import gguf_config, iter_gguf_tensors, open_gguf, weight_tensor_count
from graph_executor.loading.presets import preset
from graph_executor.loading.weight_map import check_complete, copy_into
from graph_executor.memory import check_fits
from graph_executor.model import LlamaModel
from ipc.errors import ModelLoadError

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class LoadConfig:
    """What to load and where; validated on construction."""

    model: str = default_model.DEFAULT_MODEL_NAME
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_context: int | None = None  # None: min(model's max positions, DEFAULT_MAX_CONTEXT)
    seed: int = 0  # random weights of `dummy`
    progress: bool = True

    def __post_init__(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {self.max_context}")


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaModel
    name: str
    source: str  # "safetensors" | "gguf" | "dummy"
    tokenizer_path: Path | None  # folder with tokenizer files or a .gguf; None for dummy weights
    load_seconds: float
    converted_default: bool  # True when this load built the cached copy of the default model


def load_model(cfg: LoadConfig) -> LoadedModel:
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source, path, converted = _resolve_source(cfg)
    if source == "dummy":
        config = preset(path)
    elif source == "gguf":
        reader = open_gguf(path)
        config = gguf_config(reader)
    else:
        config = ModelConfig.from_json_file(Path(path) / "config.json")
    max_context = _max_context(cfg, config)
    check_fits(cfg.model, config, dtype, max_context, device)
    model = LlamaModel(config, max_context, device, dtype)
    if source == "dummy":
        _fill_random(model, cfg.seed)
        tokenizer = None
    elif source == "gguf":
        _load_gguf(model, reader, cfg.progress)
        tokenizer = Path(path)
    else:
        _load_safetensors(model, Path(path), cfg.progress)
        tokenizer = Path(path) if (Path(path) / "tokenizer_config.json").exists() else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    name = default_model.DEFAULT_MODEL_NAME if converted is not None else cfg.model
    return LoadedModel(model, name, source, tokenizer, time.perf_counter() - start, bool(converted))


def check_load_config(cfg: LoadConfig) -> ModelConfig:
    """The cheap checks of `load_model` (device, dtype, model reference, config, and on the CPU whether it fits),
    reading no weights, so that a launcher can report bad input in one line before it starts any process."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    _, config = resolve_model_config(cfg.model, cfg.load_format)
    if device.type == "cpu":  # a GPU's free memory would cost this process a CUDA context: the executor checks
        check_fits(cfg.model, config, dtype, _max_context(cfg, config), device)
    return config


def resolve_model_config(reference: str, load_format: str = "auto") -> tuple[str, ModelConfig]:
    """(name, config) of a model reference as `load_model` resolves it (`dummy:<name>`, the default model, an HF
    folder, a .gguf file), reading no weights and converting nothing; the name is the one `load_model` reports.
    The default model's config is its preset (the converted copy's config.json may not exist yet)."""
    if reference.startswith("dummy:") or load_format == "dummy":
        return reference, preset(reference.removeprefix("dummy:"))
    if reference.lower() == default_model.DEFAULT_MODEL_NAME:
        default_model.gguf_path()  # installed, or one clear line now
        return default_model.DEFAULT_MODEL_NAME, preset("smollm2-135m")
    source, path, _ = _resolve_source(LoadConfig(model=reference, load_format=load_format, progress=False))
    if source == "gguf":
        return reference, gguf_config(open_gguf(path))
    return reference, ModelConfig.from_json_file(Path(path) / "config.json")


def _max_context(cfg: LoadConfig, config: ModelConfig) -> int:
    return cfg.max_context or min(config.max_position_embeddings, DEFAULT_MAX_CONTEXT)


def _resolve_source(cfg: LoadConfig) -> tuple[str, str, bool | None]:
    """(format, path-or-preset, converted?) where converted is None unless this is the default model."""
    ref = cfg.model
    if ref.startswith("dummy:") or cfg.load_format == "dummy":
        return "dummy", ref.removeprefix("dummy:"), None
    if ref.lower() == default_model.DEFAULT_MODEL_NAME:
        folder, converted = default_model.ensure_converted(progress=cfg.progress)
        return "safetensors", str(folder), converted
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {ref!r} does not exist (give an HF folder with config.json and *.safetensors, "
            f"a .gguf file, dummy:<name>, or {default_model.DEFAULT_MODEL_NAME})"
        )
    fmt = cfg.load_format
    if fmt == "auto":
        fmt = "gguf" if path.is_file() and path.suffix == ".gguf" else "safetensors"
    if fmt == "gguf" and not path.is_file():
        raise ModelLoadError(f"{ref!r} is not a GGUF file")
    if fmt == "safetensors" and not (path.is_dir() and (path / "config.json").exists()):
        raise ModelLoadError(f"{ref!r} is not an HF model folder (no config.json)")
    return fmt, str(path), None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelLoadError(f"the safetensors index names missing shards: {', '.join(missing)}")
    return files


def _load_safetensors(model: LlamaModel, folder: Path, progress: bool) -> None:
    from safetensors import safe_open

    files = safetensors_files(folder)
    device = str(model.embed_tokens.device)
    loaded: set[str] = set()
    handles = [safe_open(str(file), framework="pt", device=device) for file in files]
    total = sum(len(f.keys()) for f in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
        for f in handles:
            with f:
                for name in f.keys():
                    copy_into(model, name, f.get_tensor(name).to(model.dtype))
                    loaded.add(name)
                    bar.update()
    check_complete(model, loaded)


def _load_gguf(model: LlamaModel, reader, progress: bool) -> None:
    loaded: set[str] = set()
    device = model.embed_tokens.device
    tensors = iter_gguf_tensors(reader, model.config)
    for name, array in tqdm(tensors, total=weight_tensor_count(reader), desc="loading weights", unit="tensor",
                            disable=not progress):
        copy_into(model, name, torch.from_numpy(array).to(device=device, dtype=model.dtype))
        loaded.add(name)
    check_complete(model, loaded)


def _fill_random(model: LlamaModel, seed: int) -> None:
    """Random weights in real shapes, made on the target device in the target dtype (fast for 7B)."""
    gen = torch.Generator(device=model.embed_tokens.device).manual_seed(seed)
    for name, buf in model.named_buffers():
        if name in ("rope", "kv_cache"):
            continue
        if name.endswith("norm"):
            buf.fill_(1.0)
        else:
            buf.normal_(0.0, 0.02, generator=gen)
