"""Device and dtype resolution with clear errors for what this machine cannot run."""

from __future__ import annotations

import torch

from graph_executor.device_names import DTYPE_ALIASES, NO_GPU, unknown_device, unsupported_dtype
from ipc.errors import DeviceError

DTYPE_NAMES = {name: getattr(torch, canonical) for name, canonical in DTYPE_ALIASES.items()}


def resolve_device(name: str) -> torch.device:
    if (error := unknown_device(name)) is not None:
        raise error
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(NO_GPU)
    return torch.device(name)


def supported_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (torch.float16, torch.float32)
    return (torch.float16, torch.bfloat16, torch.float32)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on a GPU and float32 on the CPU (CPU half-precision matmuls are slow)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    allowed = supported_dtypes(device)
    dtype = DTYPE_NAMES.get(name)
    if dtype is None or dtype not in allowed:
        raise unsupported_dtype(name, device.type, tuple(str(d).removeprefix("torch.") for d in allowed))
    return dtype
