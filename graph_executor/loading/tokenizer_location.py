"""Where a model's tokenizer files are, without loading the model or importing torch.

The executor reports its tokenizer folder in Ready (`load_model`); the launcher asks here beforehand, so that the
JIT context can load the same folder while the executor still loads the weights instead of after the handshake.
A guess that turns out wrong costs nothing but that load: the JIT context uses what Ready names.
"""

from __future__ import annotations

from pathlib import Path

from graph_executor.loading import cache, default_model
from graph_executor.loading.model_source import DEFAULT, source_of
from ipc.errors import ModelLoadError

# The conversion cache's kind of a GGUF file's tokenizer, converted to HF files (the entry's name: the file's stem)
GGUF_TOKENIZER_KIND = "tokenizer"


def tokenizer_files_in(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists()


def known_tokenizer_folder(model: str, load_format: str = "auto") -> Path | None:
    """The folder `load_model(model)` will report as its tokenizer, when that is known now: an HF folder with
    tokenizer files, or a GGUF file's or the default model's cache entry once converted; else None (a dummy
    model, a GGUF file seen for the first time, a reference that names nothing)."""
    try:
        fmt, found = source_of(model, load_format)
        path = Path(found)
        if fmt == DEFAULT:
            return cache.lookup(default_model.DEFAULT_MODEL_NAME, default_model.CACHE_KIND, path)
        if fmt == "gguf":
            return cache.lookup(path.stem, GGUF_TOKENIZER_KIND, path)
        return path if fmt == "safetensors" and tokenizer_files_in(path) else None
    except (OSError, ModelLoadError):
        return None
