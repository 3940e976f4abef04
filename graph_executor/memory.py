"""Will the model fit? Weights plus the static KV cache against the memory available on the target device,
checked before anything is allocated, so that a model too big is one clear line rather than an OOM kill."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from graph_executor.loading.config import ModelConfig
from graph_executor.quant.specs import WeightPlan, weight_bytes
from ipc.errors import ModelLoadError

HEADROOM_BYTES = 256 << 20  # activations, workspaces, the allocator's slack (graphs add ~0.1 GiB on a GPU)
GIB = 1024**3


def needed_bytes(config: ModelConfig, dtype: torch.dtype, max_context: int,
                 plan: WeightPlan | None = None, slots: int = 1) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes) that loading `config` with `slots` caches of `max_context` positions
    allocates; `plan`: the weights' storage formats (None: all dense in `dtype`)."""
    elt = torch.empty((), dtype=dtype).element_size()
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * max_context * elt * slots
    return weight_bytes(config, plan or WeightPlan(), dtype), kv


def required_bytes(config: ModelConfig, dtype: torch.dtype, max_context: int,
                   plan: WeightPlan | None = None, slots: int = 1) -> int:
    """What one process needs to hold `config` with a `max_context` cache: weights + KV cache + headroom. The one
    rule of "will it fit", for loading and for the bench alike."""
    weights, kv = needed_bytes(config, dtype, max_context, plan, slots)
    return weights + kv + HEADROOM_BYTES


def available_bytes(device: torch.device) -> int | None:
    """Free memory on a GPU, MemAvailable on the host; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo; None where there is no procfs."""
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def check_fits(name: str, config: ModelConfig, dtype: torch.dtype, max_context: int, device: torch.device,
               available: int | None = None, plan: WeightPlan | None = None, slots: int = 1) -> None:
    """ModelLoadError when the weights and KV cache can't fit in what `device` has free; `available` (bytes)
    replaces asking the device, e.g. a GPU's free memory read by a process that must not hold a CUDA context."""
    if device.type == "cpu":
        plan = None  # the CPU path dequantizes packed weights at load
    weights, kv = needed_bytes(config, dtype, max_context, plan, slots)
    need = required_bytes(config, dtype, max_context, plan, slots)
    available = available_bytes(device) if available is None else available
    if available is None or need <= available:
        return
    where = "free GPU memory" if device.type == "cuda" else "available RAM"
    dtype_name = str(dtype).removeprefix("torch.")
    raise ModelLoadError(
        f"{name} ({dtype_name}) does not fit on {device.type}: it needs about {need / GIB:.1f} GiB (weights "
        f"{weights / GIB:.1f} GiB + KV cache for {max_context} tokens"
        f"{f' x {slots} sequences' if slots > 1 else ''} {kv / GIB:.1f} GiB + headroom) but "
        f"{where} is {available / GIB:.1f} GiB; try a smaller --max-context"
        f"{', --max-num-seqs' if slots > 1 else ''} or --dtype, or another device"
    )
