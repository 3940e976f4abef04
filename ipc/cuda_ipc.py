"""CUDA IPC through cupy's public runtime API (the project's `cupy-cuda12x`, or `cupy-cuda13x` on CUDA 13):
device memory of its own (one cudaMalloc per shared buffer, outside every caching allocator, so a handle names
exactly that buffer), its IPC handle, and the other process's mapping of it. No torch here: any CUDA process
with cupy can open what the executor exports.

cupy is imported on first use, so that a CPU-only machine never needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ipc.errors import SharedTensorError


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # a GPU machine without the `cuda` extra
        raise SharedTensorError(
            "CUDA IPC needs cupy: pip install 'hybridrt[cuda]' (cupy-cuda12x) or cupy-cuda13x on CUDA 13"
        ) from exc
    return cupy


@dataclass(frozen=True)
class DeviceBuffer:
    """`nbytes` of device memory at `ptr` on `device`: allocated here (owner) or mapped from another process."""

    ptr: int
    nbytes: int
    device: int
    owner: bool

    def as_cupy(self, keepalive: object = None) -> Any:
        """A uint8 cupy array over the whole buffer; it does not own the memory, but keeps `keepalive` alive."""
        cupy = _cupy()
        memory = cupy.cuda.UnownedMemory(self.ptr, self.nbytes, keepalive, self.device)
        return cupy.ndarray((self.nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))


def allocate(nbytes: int, device: int) -> DeviceBuffer:
    """A fresh zeroed cudaMalloc of its own (never a sub-block of a pool)."""
    runtime = _cupy().cuda.runtime
    with _cupy().cuda.Device(device):
        ptr = runtime.malloc(max(nbytes, 1))
        runtime.memset(ptr, 0, max(nbytes, 1))
    return DeviceBuffer(ptr, nbytes, device, owner=True)


def ipc_handle(buffer: DeviceBuffer) -> bytes:
    """The cudaIpcMemHandle (64 bytes) another process opens with `open_handle`."""
    if not buffer.owner:
        raise ValueError("only the process that allocated a buffer exports it")
    with _cupy().cuda.Device(buffer.device):
        return bytes(_cupy().cuda.runtime.ipcGetMemHandle(buffer.ptr))


def open_handle(handle: bytes, nbytes: int, device: int) -> DeviceBuffer:
    """Map another process's buffer; SharedTensorError if the handle is not valid here."""
    cupy = _cupy()
    try:
        with cupy.cuda.Device(device):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess)
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise SharedTensorError(f"cannot open a CUDA IPC handle on device {device}: {exc}") from None
    return DeviceBuffer(ptr, nbytes, device, owner=False)


def release(buffer: DeviceBuffer) -> None:
    """Free an owned buffer, or unmap an opened one. Call only once no view of it is left."""
    cupy = _cupy()
    with cupy.cuda.Device(buffer.device):
        if buffer.owner:
            cupy.cuda.runtime.free(buffer.ptr)
        else:
            cupy.cuda.runtime.ipcCloseMemHandle(buffer.ptr)
