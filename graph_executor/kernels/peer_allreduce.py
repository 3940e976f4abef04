"""One-shot all-reduce over peer memory for a token's small vectors (issue 15: tensor parallelism at batch 1).

Why: a decode step all-reduces two hidden-size vectors a layer (8 KB for LLaMA-2-7B in fp16); NCCL's latency for
that size, ~8-15 us inside a graph, would be 0.5-1.0 ms of a two-GPU 7B step of ~1.9 ms (bench/NOTES.md,
fourteenth session). vLLM's and TensorRT-LLM's custom all-reduce read the peers' vectors straight over NVLink in one
kernel instead (~3-5 us at this size). This is that kernel, in Triton, captured in the decode graphs like any other.

The protocol (one program per rank, every rank the same sequence of calls, as SPMD collectives are):
- Each rank owns a data buffer [2, capacity] (two slots, used by the call's epoch parity) and a flag array
  [MAX_RANKS] int64 (64-bit epochs: 34k calls a second would wrap 32 bits in a day), both exported to the other
  ranks (CUDA IPC; on the CPU, shared-memory files: the protocol's tests run the same kernel under Triton's
  interpreter in several processes).
- A call reads its rank's epoch (device memory: a graph replays the same arguments) and takes e = epoch + 1; it
  stores x into its own slot e % 2, then (after a barrier, with release semantics at system scope) writes e into
  every rank's flag for it; it waits (acquire) until every rank's flag in its own array reaches e; then it sums
  every rank's slot e % 2 in rank order (float32; the same bits on every rank, as the ranks must stay in step) into
  x, and stores e.
- Two slots suffice: a rank overwrites slot e % 2 at call e only after call e - 1 saw every rank's flag >= e - 1,
  and a rank raises its flag to e - 1 only after its call e - 2, whose reads of that slot came first in its stream.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

MAX_RANKS = 8


@triton.jit
def _one_shot_kernel(x_ptr, n, epoch_ptr, b0, b1, b2, b3, b4, b5, b6, b7, f0, f1, f2, f3, f4, f5, f6, f7,
                     RANK: tl.constexpr, CAP: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1  # int64: never wraps
    slot = (epoch & 1) * CAP
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    buffers = (b0, b1, b2, b3, b4, b5, b6, b7)  # every rank's slots, in rank order (RANK's own among them)
    flags = (f0, f1, f2, f3, f4, f5, f6, f7)
    tl.store(buffers[RANK] + slot + offs, x, mask=mask)
    tl.debug_barrier()  # every thread's part of x stored before the flags say so
    for r in tl.static_range(N):
        tl.atomic_xchg(flags[r] + RANK, epoch, sem="release", scope="sys")
    for r in tl.static_range(N):
        seen = tl.atomic_add(flags[RANK] + r, 0, sem="acquire", scope="sys")
        while seen < epoch:
            seen = tl.atomic_add(flags[RANK] + r, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(N):
        acc += tl.load(buffers[r] + slot + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(epoch_ptr, epoch)


@dataclass(frozen=True)
class PeerRegion:
    """One rank's exported memory: its data slots [2, capacity] and its flags [MAX_RANKS] int64, as tensors of this
    process (its own, or mapped from the rank that owns them)."""

    data: torch.Tensor
    flags: torch.Tensor


class SharedFileMemory:
    """CPU ranks' peer memory: files in a shared-memory folder, opened by each rank (`torch.from_file(shared=)`);
    a region's handle is its two files' names. The interpreter's kernel then reads and writes the same pages in
    every process."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder or "/dev/shm")
        self.owned: list[Path] = []

    def allocate(self, capacity: int, dtype: torch.dtype) -> tuple[PeerRegion, bytes]:
        stem = f"hybridrt-ar-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        paths = [self.folder / f"{stem}.data", self.folder / f"{stem}.flags"]
        sizes = [2 * capacity * dtype.itemsize, 8 * MAX_RANKS]
        for path, size in zip(paths, sizes, strict=True):
            path.write_bytes(b"\0" * size)
            self.owned.append(path)
        return self.open(stem.encode(), capacity, dtype), stem.encode()

    def open(self, handle: bytes, capacity: int, dtype: torch.dtype) -> PeerRegion:
        stem = handle.decode()
        if "/" in stem or not stem.startswith("hybridrt-ar-"):
            raise ValueError(f"not a peer all-reduce region: {stem!r}")
        data = torch.from_file(str(self.folder / f"{stem}.data"), shared=True, size=2 * capacity, dtype=dtype)
        flags = torch.from_file(str(self.folder / f"{stem}.flags"), shared=True, size=MAX_RANKS, dtype=torch.int64)
        return PeerRegion(data.view(2, capacity), flags)

    def close(self) -> None:
        for path in self.owned:
            path.unlink(missing_ok=True)
        self.owned.clear()


class CudaIpcMemory:
    """GPU ranks' peer memory: a cudaMalloc of its own per region (ipc/cuda_ipc.py), mapped by the other ranks
    through its IPC handle (peer access over NVLink, enabled lazily by the driver)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.buffers = []

    def _index(self) -> int:
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def allocate(self, capacity: int, dtype: torch.dtype) -> tuple[PeerRegion, bytes]:
        from ipc import cuda_ipc

        buffer = cuda_ipc.allocate(self._nbytes(capacity, dtype), self._index())
        self.buffers.append(buffer)
        # the zeroing (cudaMemset, on the legacy stream) done before any peer can see the handle and raise a flag
        torch.cuda.synchronize(self._index())
        return self._region(buffer, capacity, dtype), cuda_ipc.ipc_handle(buffer)

    def open(self, handle: bytes, capacity: int, dtype: torch.dtype) -> PeerRegion:
        from ipc import cuda_ipc

        buffer = cuda_ipc.open_handle(handle, self._nbytes(capacity, dtype), self._index())
        self.buffers.append(buffer)
        return self._region(buffer, capacity, dtype)

    @staticmethod
    def _nbytes(capacity: int, dtype: torch.dtype) -> int:
        return 2 * capacity * dtype.itemsize + 8 * MAX_RANKS

    def _region(self, buffer, capacity: int, dtype: torch.dtype) -> PeerRegion:
        device = torch.device("cuda", self._index())
        raw = torch.as_tensor(buffer.as_cupy(), device=device)  # [nbytes] uint8, not owning the memory
        if raw.data_ptr() != buffer.ptr or raw.device != device:
            # (a torch that took a peer GPU's mapping for that GPU's memory would have copied it: flags in a copy
            # hang every rank)
            raise RuntimeError(f"the peer region at {buffer.ptr:#x} was not mapped as a tensor in place on {device}")
        data_bytes = 2 * capacity * dtype.itemsize  # (a multiple of 8 for the flags)
        return PeerRegion(raw[:data_bytes].view(dtype).view(2, capacity), raw[data_bytes:].view(torch.int64))

    def close(self) -> None:
        from ipc import cuda_ipc

        for buffer in reversed(self.buffers):
            cuda_ipc.release(buffer)
        self.buffers.clear()


class PeerAllReduce:
    """Sums a [n <= capacity] vector over `size` ranks, in place, in one kernel per call (`__call__`).

    `exchange(handle) -> every rank's handle, in rank order`: how the ranks swap their regions' handles once at
    start (TensorParallel: an all-gather of the bytes over the process group). `memory`: CudaIpcMemory on GPUs,
    SharedFileMemory for CPU processes."""

    def __init__(self, rank: int, size: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 exchange: Callable[[bytes], list[bytes]], memory: SharedFileMemory | CudaIpcMemory) -> None:
        if not 1 <= size <= MAX_RANKS or not 0 <= rank < size:
            raise ValueError(f"the peer all-reduce runs 1..{MAX_RANKS} ranks, got rank {rank} of {size}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.rank, self.size, self.capacity, self.dtype = rank, size, capacity, dtype
        self.memory = memory
        capacity = -(-capacity // 4) * 4  # a multiple of 4: the int64 flags after [2, capacity] stay 8-byte aligned
        self.capacity_padded = capacity
        try:
            own, handle = memory.allocate(capacity, dtype)
            handles = exchange(handle)
            if len(handles) != size or handles[rank] != handle:
                raise ValueError("the exchange must give every rank's handle in rank order")
            self.regions = [own if r == rank else memory.open(h, capacity, dtype) for r, h in enumerate(handles)]
        except BaseException:
            memory.close()
            raise
        self.epoch = torch.zeros(1, dtype=torch.int64, device=device)  # [1]: calls made (this rank's, in memory)
        self.calls = 0  # kernels launched (or captured into a graph) by this rank
        self.block = triton.next_power_of_2(capacity)
        self.warps = max(1, min(8, self.block // 256))

    def takes(self, x: torch.Tensor) -> bool:
        """Whether `__call__` runs x (the dtype, contiguous, at most `capacity` elements)."""
        return x.dtype == self.dtype and x.numel() <= self.capacity and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n] (contiguous, this rank's dtype, n <= capacity) <- the sum of every rank's x."""
        if not self.takes(x):
            raise ValueError(f"peer all-reduce takes a contiguous {self.dtype} vector of <= {self.capacity} elements, "
                             f"got {x.dtype} {tuple(x.shape)}")
        self.calls += 1
        padded = self.regions + [self.regions[0]] * (MAX_RANKS - self.size)
        # (RANK a constant: each rank's process compiles its own variant, which indexes its own slots statically)
        _one_shot_kernel[(1,)](x, x.numel(), self.epoch, *(r.data for r in padded), *(r.flags for r in padded),
                               RANK=self.rank, CAP=self.capacity_padded, N=self.size, BLOCK=self.block,
                               num_warps=self.warps)
        return x

    def close(self) -> None:
        """Free and unmap the regions: for tests and probes, once every rank is past its last call (a barrier) and
        no captured graph will replay a call; a server leaves them to its process's exit."""
        self.regions = []
        self.memory.close()
