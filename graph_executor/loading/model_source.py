"""Which model a `--model` reference names and in what format, and the checks that need no weights and no torch
(one `error:` line each): the loader resolves references with it, and the launcher checks them with it before it
starts any process, so that a mistyped path, a Hub id or an unknown preset is reported at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

from graph_executor.loading import default_model
from graph_executor.loading.config import ModelConfig
from graph_executor.loading.presets import preset
from graph_executor.loading.shape_rules import QUANTIZE_GGUF, check_group, check_part_group, part_config
from ipc.errors import ModelLoadError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name, as on the Hugging Face Hub
DEFAULT = "default"  # source_of's format for the embedded default model (its GGUF, converted at load)


def source_of(ref: str, load_format: str = "auto") -> tuple[str, str]:
    """(format, path or preset name): "dummy", DEFAULT (path: its GGUF), "gguf" or "safetensors" (an HF folder);
    ModelLoadError, in one line, for a reference that names nothing loadable."""
    if ref.startswith("dummy:") or load_format == "dummy":
        return "dummy", ref.removeprefix("dummy:")
    if ref.lower() == default_model.DEFAULT_MODEL_NAME:
        return DEFAULT, str(default_model.gguf_path())  # installed, or one clear line
    path = Path(ref).expanduser()
    if not path.exists():
        if HUB_ID.fullmatch(ref):
            raise ModelLoadError(
                f"model {ref!r} looks like a Hugging Face Hub id, and hybridrt does not download models: fetch it "
                f"first (e.g. `huggingface-cli download {ref} --local-dir DIR`) and pass --model DIR, or a .gguf file"
            )
        raise ModelLoadError(
            f"model path {ref!r} does not exist (give an HF folder with config.json and *.safetensors, "
            f"a .gguf file, dummy:<name>, or {default_model.DEFAULT_MODEL_NAME})"
        )
    if path.is_file() and path.suffix != ".gguf" and (path.parent / "config.json").exists():
        path = path.parent  # a file of a model folder (its config.json, a .safetensors shard): the folder
    fmt = load_format
    if fmt == "auto":
        fmt = "gguf" if path.is_file() and path.suffix == ".gguf" else "safetensors"
    if fmt == "gguf" and not path.is_file():
        raise ModelLoadError(f"{ref!r} is not a GGUF file")
    if fmt == "safetensors" and not (path.is_dir() and (path / "config.json").exists()):
        raise ModelLoadError(f"{ref!r} is not an HF model folder (no config.json)")
    return fmt, str(path)


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


def check_reference(ref: str, load_format: str = "auto", quantize: str | None = None, quantize_group: int = 32,
                    tensor_parallel: int = 1) -> None:
    """What can be wrong with a reference before any weights are read: it names nothing, an unknown preset, an HF
    folder whose config.json hybridrt cannot run or that holds no weights; `--quantize` on a GGUF file; a
    `--tensor-parallel` split or a `--quantize-group` the model's shapes do not allow (`shape_rules`, from the
    preset or config.json). (A GGUF file's header, and so its shapes, the device, the dtype and whether the model
    fits are the executor's to check, before it allocates.)"""
    fmt, path = source_of(ref, load_format)
    if fmt == "gguf" and quantize:
        raise ModelLoadError(QUANTIZE_GGUF)
    if fmt == "dummy":
        config = preset(path)
    elif fmt == DEFAULT:
        config = preset(default_model.DEFAULT_PRESET)
    elif fmt == "safetensors":
        config = ModelConfig.from_json_file(Path(path) / "config.json")
        safetensors_files(Path(path))
    else:
        return
    try:
        if quantize:
            check_group(quantize, quantize_group, config)
        if tensor_parallel > 1:
            part = part_config(config, tensor_parallel)
            if quantize:
                check_part_group(quantize, quantize_group, part, tensor_parallel)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
