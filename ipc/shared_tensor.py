"""Owns tensors shared between processes without copies: POSIX shared memory on CPU, CUDA IPC on GPU.

The exporting process creates (or exports) a `SharedTensor`, sends its `spec` (a TensorSpec, plain data)
in a message, and keeps it alive while importers run; `import_tensor(spec)` gives the other process a torch
view of the same memory.

CPU segments are files in /dev/shm opened and mmapped directly, not through multiprocessing.shared_memory:
its resource_tracker unlinks segments that an *importing* process "leaked" when it exits, and warns. Here
only the owner ever unlinks (on close, or when the owner object is collected), and importers just unmap.
Unmapping is left to the garbage collector: tensors from torch.frombuffer hold a reference to the mmap, and
closing it explicitly under a live view would leave that view pointing at unmapped memory.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import re
import secrets
import stat
import weakref
from pathlib import Path

import torch

from ipc import cuda_ipc
from ipc.errors import SharedTensorError
from ipc.messages import TensorSpec
from ipc.runtime_dir import segment_dir

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_NAME_HINT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The wire name of a torch dtype (or a checked wire name)."""
    if isinstance(dtype, str):
        torch_dtype(dtype)
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot be shared; expected one of {sorted(TORCH_DTYPES)}")
    return _DTYPE_NAMES[dtype]


def _nbytes(spec: TensorSpec) -> int:
    nbytes = spec.numel * torch_dtype(spec.dtype).itemsize
    if nbytes == 0:
        raise ValueError(f"tensor {spec.name!r} has no elements; there is nothing to share")
    return nbytes


class SharedTensor:
    """A tensor whose memory another process can open from `spec`; `close()` drops this process's view."""

    def __init__(self, spec: TensorSpec, tensor: torch.Tensor):
        self._spec = spec
        self._views = [tensor]  # emptied by close(); a list so that a finalizer can empty it too

    @property
    def spec(self) -> TensorSpec:
        return self._spec

    @property
    def tensor(self) -> torch.Tensor:
        if not self._views:
            raise ValueError(f"shared tensor {self._spec.name!r} is closed")
        return self._views[0]

    @property
    def closed(self) -> bool:
        return not self._views

    def close(self) -> None:
        """Drop this object's view; memory goes away once the last view of it is gone."""
        self._views.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._spec
        state = ", closed" if self.closed else ""
        return f"{type(self).__name__}({s.name!r}, {s.dtype}, {list(s.shape)}{state})"


def _unlink_segment(path: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child must not unlink its parent's segment
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _map_new(path: Path, nbytes: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if hasattr(os, "posix_fallocate"):  # out of /dev/shm is an error now, not a SIGBUS at first write
            os.posix_fallocate(fd, 0, nbytes)
        else:
            os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    except OSError as exc:
        os.unlink(path)
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise SharedTensorError(f"no room for {nbytes} bytes of shared memory in {path.parent}") from None
        raise
    finally:
        os.close(fd)  # the mapping keeps its own reference to the file


def _map_existing(path: Path, needed: int) -> mmap.mmap:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SharedTensorError(f"cannot open shared segment {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < needed:
            raise SharedTensorError(f"shared segment {path} holds {st.st_size} bytes, spec needs {needed}")
        return mmap.mmap(fd, st.st_size)
    finally:
        os.close(fd)


class ShmTensor(SharedTensor):
    """A CPU tensor in a POSIX shared-memory segment; the creating process owns (and unlinks) the segment."""

    def __init__(self, spec: TensorSpec, tensor: torch.Tensor, owner_pid: int | None):
        super().__init__(spec, tensor)
        path = segment_dir() / str(spec.handle)
        self._unlinker = weakref.finalize(self, _unlink_segment, path, owner_pid) if owner_pid else None

    @classmethod
    def create(cls, name_hint: str, shape: tuple[int, ...], dtype: str | torch.dtype) -> ShmTensor:
        """A new zero-filled segment named hybridrt-<pid>-<name_hint>-<random>, mapped 0600."""
        if not isinstance(name_hint, str) or not _NAME_HINT.fullmatch(name_hint):
            raise ValueError(f"name_hint {name_hint!r} must be 1-64 of [A-Za-z0-9_-]")
        segment = f"hybridrt-{os.getpid()}-{name_hint}-{secrets.token_hex(4)}"
        spec = TensorSpec(name_hint, dtype_name(dtype), tuple(shape), TensorSpec.SHM, segment)
        mapping = _map_new(segment_dir() / segment, _nbytes(spec))
        return cls(spec, _view(mapping, spec), owner_pid=os.getpid())

    @classmethod
    def open(cls, spec: TensorSpec) -> ShmTensor:
        """Map an existing segment (zero-copy); this process never unlinks it."""
        if spec.kind != TensorSpec.SHM:
            raise ValueError(f"ShmTensor.open needs a {TensorSpec.SHM!r} spec, got {spec.kind!r}")
        if not _SEGMENT_NAME.fullmatch(spec.handle) or spec.handle in (".", ".."):
            raise ValueError(f"bad shared segment name {spec.handle!r}")
        itemsize = torch_dtype(spec.dtype).itemsize
        if spec.offset_bytes % itemsize:
            raise ValueError(f"offset_bytes {spec.offset_bytes} is not a multiple of the itemsize {itemsize}")
        mapping = _map_existing(segment_dir() / spec.handle, spec.offset_bytes + _nbytes(spec))
        return cls(spec, _view(mapping, spec), owner_pid=None)

    @property
    def is_owner(self) -> bool:
        return self._unlinker is not None

    def unlink(self) -> None:
        """Remove the segment's name (owner only; idempotent); existing mappings stay valid until dropped."""
        if self._unlinker is None:
            raise ValueError(f"only the creating process unlinks segment {self._spec.handle!r}")
        self._unlinker()

    def close(self) -> None:
        """Drop this view; the owner also unlinks the segment, so nothing is left in /dev/shm."""
        if self._unlinker is not None:
            self._unlinker()
        super().close()


def _view(mapping: mmap.mmap, spec: TensorSpec) -> torch.Tensor:
    flat = torch.frombuffer(
        mapping, dtype=torch_dtype(spec.dtype), count=spec.numel, offset=spec.offset_bytes
    )
    return flat.view(spec.shape)


class _Lease:
    """Releases a device buffer (free, or unmap) when collected: it is held, through cupy's array and the DLPack
    capsule, by the torch storage of every view, so the memory goes away only after the last view."""

    def __init__(self, buffer: cuda_ipc.DeviceBuffer) -> None:
        weakref.finalize(self, _release_quietly, buffer)


def _release_quietly(buffer: cuda_ipc.DeviceBuffer) -> None:
    try:
        cuda_ipc.release(buffer)
    except Exception:  # at interpreter exit the CUDA context may already be gone: nothing left to free
        pass


def _torch_view(buffer: cuda_ipc.DeviceBuffer, spec: TensorSpec) -> torch.Tensor:
    raw = torch.from_dlpack(buffer.as_cupy(keepalive=_Lease(buffer)))  # [nbytes] uint8 on cuda:device
    nbytes = _nbytes(spec)
    return raw[spec.offset_bytes:spec.offset_bytes + nbytes].view(torch_dtype(spec.dtype)).view(spec.shape)


class CudaIpcTensor(SharedTensor):
    """A CUDA tensor in a device buffer of its own (`ipc.cuda_ipc`, cupy's public runtime API), shared by the
    buffer's CUDA IPC handle; torch sees it through DLPack.

    The exporter's buffer is freed, and an importer's mapping closed, once the last torch view of it is gone
    (also at interpreter exit); `close()` drops this object's view. Keep the exporter alive while importers
    run: freeing a buffer under a mapping leaves the importer reading freed memory.
    """

    @classmethod
    def create(cls, name: str, shape: tuple[int, ...], dtype: str | torch.dtype, device: int = 0) -> CudaIpcTensor:
        """A new zero-filled CUDA tensor in its own buffer, exported."""
        dtype = dtype_name(dtype)
        nbytes = math.prod(shape) * torch_dtype(dtype).itemsize
        buffer = cuda_ipc.allocate(nbytes, device)
        try:
            handle = cuda_ipc.ipc_handle(buffer)
        except BaseException:
            cuda_ipc.release(buffer)
            raise
        spec = TensorSpec(name, dtype, tuple(shape), TensorSpec.CUDA_IPC, handle, device=device,
                          extra={"buffer_bytes": nbytes})
        return cls(spec, _torch_view(buffer, spec))

    @classmethod
    def open(cls, spec: TensorSpec) -> CudaIpcTensor:
        if spec.kind != TensorSpec.CUDA_IPC:
            raise ValueError(f"CudaIpcTensor.open needs a {TensorSpec.CUDA_IPC!r} spec, got {spec.kind!r}")
        if not torch.cuda.is_available():
            raise SharedTensorError(f"cannot open CUDA tensor {spec.name!r}: no CUDA device in this process")
        if spec.offset_bytes % torch_dtype(spec.dtype).itemsize:
            raise ValueError(f"offset_bytes {spec.offset_bytes} is not a multiple of the itemsize")
        size = spec.extra.get("buffer_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or spec.offset_bytes + _nbytes(spec) > size:
            raise SharedTensorError(f"CUDA tensor {spec.name!r} does not fit the buffer its spec names")
        buffer = cuda_ipc.open_handle(spec.handle, size, spec.device)
        return cls(spec, _torch_view(buffer, spec))


def import_tensor(spec: TensorSpec) -> SharedTensor:
    """Open a tensor another process exported, zero-copy."""
    if spec.kind == TensorSpec.SHM:
        return ShmTensor.open(spec)
    return CudaIpcTensor.open(spec)
