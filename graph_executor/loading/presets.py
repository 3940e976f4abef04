"""Built-in model shapes for `dummy:<name>`: random weights in real shapes, for benchmarks."""

from __future__ import annotations

from graph_executor.loading.config import ModelConfig, RopeScaling
from ipc.errors import ModelLoadError

_LLAMA3_ROPE = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32, 128, 4096, 1e-5, 10000.0,
                              bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-13b": ModelConfig("llama", 32000, 5120, 13824, 40, 40, 40, 128, 4096, 1e-5, 10000.0,
                               bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-70b": ModelConfig("llama", 32000, 8192, 28672, 80, 64, 8, 128, 4096, 1e-5, 10000.0,
                               bos_token_id=1, eos_token_ids=(2,)),  # 138 GB in fp16: --tensor-parallel 2 on H200s
    "llama-3-8b": ModelConfig("llama", 128256, 4096, 14336, 32, 32, 8, 128, 8192, 1e-5, 500000.0,
                              bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "llama-3.2-1b": ModelConfig("llama", 128256, 2048, 8192, 16, 32, 8, 64, 131072, 1e-5, 500000.0,
                                rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True,
                                bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "mistral-7b": ModelConfig("mistral", 32000, 4096, 14336, 32, 32, 8, 128, 32768, 1e-5, 10000.0,
                              sliding_window=4096, bos_token_id=1, eos_token_ids=(2,)),
    "qwen2.5-7b": ModelConfig("qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 32768, 1e-6, 1000000.0,
                              qkv_bias=True, bos_token_id=151643, eos_token_ids=(151645, 151643)),
    "tinyllama-1.1b": ModelConfig("llama", 32000, 2048, 5632, 22, 32, 4, 64, 2048, 1e-5, 10000.0,
                                  bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-135m": ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192, 1e-5, 100000.0,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}


def preset(name: str) -> ModelConfig:
    key = name.lower()
    if key not in PRESETS:
        raise ModelLoadError(f"unknown dummy model {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[key]
