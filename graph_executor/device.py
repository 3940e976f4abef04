"""Device and dtype resolution with clear errors for what this machine cannot run."""

from __future__ import annotations

import torch

from ipc.errors import DeviceError

DEVICES = ("auto", "cuda", "cpu")
DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {name!r} (choose auto, cuda or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("device cuda requested but no CUDA GPU is available here (use --device cpu)")
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
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise DeviceError(f"dtype {name!r} is not supported on {device.type} (supported: {names})")
    return dtype
