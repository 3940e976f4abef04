"""Create a process's CUDA context while it imports torch, through the CUDA driver's C API (ctypes).

Creating the primary context of an H200 (cuInit, then the context itself) takes ~0.3 s, and torch does it at its
first CUDA call, after its own import of several seconds. A ctypes call releases the GIL, so a thread can make the
context while the main thread imports: torch's runtime API then finds the device's primary context already there
and uses it (the runtime always uses the primary context; retaining it here only adds a reference that lives as
long as the process). Environment that changes what the driver sees (CUDA_VISIBLE_DEVICES, the MPS pipe directory)
is read by cuInit in either case: it is set before the process starts.

Anything that fails here is left to torch to meet and report in its own words: this is only a head start.
"""

from __future__ import annotations

import ctypes
import functools
import threading


def device_ordinal(device: str) -> int | None:
    """The CUDA ordinal a --device value will use if it runs on a GPU (auto: 0), or None for cpu and bad names."""
    if device == "auto" or device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None


@functools.cache  # once per process: the launcher asks whether a GPU is there for several decisions
def initialized_driver() -> ctypes.CDLL | None:
    """The CUDA driver library, initialised (cuInit), or None where there is none or it fails to start."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return driver if driver.cuInit(0) == 0 else None


def gpu_visible() -> bool:
    """Whether the CUDA driver sees a GPU (~10 ms, no torch)."""
    driver, count = initialized_driver(), ctypes.c_int(0)
    return driver is not None and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _retain_primary_context(ordinal: int) -> None:
    driver, dev, ctx = initialized_driver(), ctypes.c_int(0), ctypes.c_void_p()
    if driver is None or driver.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
        return  # no driver or no such GPU: torch says so (auto falls back to the CPU)
    driver.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)


def start(device: str) -> threading.Thread | None:
    """Begin creating the primary context of the GPU that `device` (a --device value) names, in a daemon thread;
    None when it names no GPU. Call it before importing torch."""
    ordinal = device_ordinal(device)
    if ordinal is None:
        return None
    thread = threading.Thread(target=_retain_primary_context, args=(ordinal,), name="cuda-context", daemon=True)
    thread.start()
    return thread


def argv_value(argv: list[str], flag: str, default: str) -> str:
    """The value of `flag` in an argv (`--flag v` or `--flag=v`, the last one wins, as argparse does), read before
    the process's argparse runs (which comes after the imports)."""
    value = default
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
    return value
