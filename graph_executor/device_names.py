"""Device and dtype names as the command line gives them, checked without torch: the launcher refuses a name that
no machine runs (or cuda on a machine without a GPU) before it starts any process. What this machine's torch
supports beyond the names (bfloat16 on an older GPU) is `graph_executor.device`'s to say, in the executor."""

from __future__ import annotations

from ipc.errors import DeviceError

DEVICES = ("auto", "cuda", "cpu")
DTYPE_ALIASES = {  # every accepted --dtype spelling -> the dtype's canonical (torch) name
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
CANONICAL_DTYPES = ("float16", "bfloat16", "float32")
NO_GPU = "device cuda requested but no CUDA GPU is available here (use --device cpu)"


def unknown_device(name: str) -> DeviceError | None:
    if name not in DEVICES and not name.startswith("cuda:"):
        return DeviceError(f"unknown device {name!r} (choose auto, cuda or cpu)")
    return None


def unsupported_dtype(name: str, device_type: str, allowed: tuple[str, ...]) -> DeviceError:
    return DeviceError(f"dtype {name!r} is not supported on {device_type} (supported: {', '.join(allowed)})")


def check_names(device: str, dtype: str, gpu: bool) -> None:
    """DeviceError for an unknown device, cuda without a GPU (`gpu`: whether the CUDA driver sees one), or a dtype
    name that is none of the accepted spellings: the executor's own messages."""
    if (error := unknown_device(device)) is not None:
        raise error
    if device.startswith("cuda") and not gpu:
        raise DeviceError(NO_GPU)
    if dtype != "auto" and dtype not in DTYPE_ALIASES:
        raise unsupported_dtype(dtype, "cuda" if gpu and device != "cpu" else "cpu", CANONICAL_DTYPES)
