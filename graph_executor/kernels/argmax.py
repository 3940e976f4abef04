"""The greedy token of a logits vector in one short kernel on the GPU: `torch.argmax` semantics (NaN is the
largest value, ties go to the first index), for the batch-1 decode loop's hot path.

Why: between two decode steps the card waits for the JIT context's sampling, and torch's argmax over a [V] vector
reduces it in one thread block: 10 us of a 7B int4 token's 21 us between step graphs on an H200
(bench.probes.decode_loop, bench/NOTES.md). Here each of cdiv(V, BLOCK) programs reduces its block to one int64
key (the value's bits made orderable in the high half, the complement of the index in the low half, so the largest
key is the largest value at its first index), folds it into one cell with `atomic_max`, and the last program to
finish (a counter) writes the index and resets the cell and the counter: deterministic, no host sync, graph-safe.
The cell and counter belong to one `Argmax`; calls that share one must be ordered on one stream.

Both processes take it: the JIT context's Sampler for a greedy draw, and the executor when it takes a plain greedy
request's token itself after a decode step (`Decode.argmax`), which also files the token in the step buffers'
`token_ring` at the step's position (read from device memory), where the JIT context finds it later."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EMPTY = -(2**63 - 1)  # the cell between calls: below every key (an element's key is >= -(2**31) << 32)
BLOCK = 4096  # logits a program: 16 KB of float32, 32 a thread on 4 warps


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, host_ptr, cell_ptr, count_ptr, ring_ptr, pos_ptr, V, EMPTY: tl.constexpr,
                   BLOCK: tl.constexpr, HOST: tl.constexpr, RING: tl.constexpr, ADVANCE: tl.constexpr = False):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < V
    x = tl.load(x_ptr + i, mask=ok, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)  # -0.0 ties with +0.0, as in torch
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed int32 order
    ordered = tl.where(x != x, 0x7FFFFFFF, ordered)  # NaN above +inf
    key = (ordered.to(tl.int64) << 32) | (4294967295 - i.to(tl.int64))  # ties: the smaller index wins
    key = tl.where(ok, key, EMPTY)
    tl.atomic_max(cell_ptr, tl.max(key, axis=0), sem="acq_rel")
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        best = tl.atomic_xchg(cell_ptr, EMPTY, sem="acq_rel")  # read and reset for the next call
        index = 4294967295 - (best & 4294967295)
        tl.store(out_ptr, index)
        if HOST:  # the host's copy, through the bus: no copy operation after the kernel on the stream
            tl.store(host_ptr, index)
        if RING > 0:  # filed at the step's position: ring[position % RING]
            position = tl.load(pos_ptr)
            tl.store(ring_ptr + position % RING, index)
            if ADVANCE:  # the next decode's position, set here (no fill on the stream before it); only this
                # program reads or writes it in this kernel, after every other program has passed its atomic
                tl.store(pos_ptr, position + 1)
        tl.atomic_xchg(count_ptr, 0)


class Argmax:
    """argmax of [V] float32 vectors on one device into a caller's [1] int64 tensor (the cell and counter it owns
    start reset and are left reset by every call)."""

    def __init__(self, device: torch.device) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda": the current GPU, as tensors name it (cuda:N)
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.cell = torch.full((1,), EMPTY, dtype=torch.int64, device=self.device)
        self.count = torch.zeros(1, dtype=torch.int32, device=self.device)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, host: torch.Tensor | None = None,
                 ring: torch.Tensor | None = None, position: torch.Tensor | None = None,
                 advance: bool = False) -> torch.Tensor:
        """out [1] int64 = the index of x's largest value ([V] float32, contiguous; NaN counts as largest, ties go
        to the first index). `host`: a [1] int64 tensor in pinned host memory (a GPU's `Argmax`) that the kernel
        writes the index to as well, so that reading the token back needs no copy after it on the stream (an
        event recorded after the call orders the write before the host's read). `ring` [R] int64 and `position` [1]
        int64, on the device: the index is also written to ring[position % R] (the position read on the device);
        `advance` (with them): then position += 1 on the device, the next decode step's position."""
        if x.dim() != 1 or x.dtype != torch.float32 or not x.is_contiguous() or x.numel() == 0 \
                or x.device != self.device:
            raise ValueError(f"x: expected a non-empty contiguous [V] float32 tensor on {self.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        if out.shape != (1,) or out.dtype != torch.int64 or out.device != self.device:
            raise ValueError(f"out: expected a [1] int64 tensor on {self.device}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        if host is not None and (host.shape != (1,) or host.dtype != torch.int64 or host.device.type != "cpu"
                                 or (self.device.type == "cuda" and not host.is_pinned())):
            raise ValueError(f"host: expected a [1] int64 tensor in pinned host memory, got {host.dtype} "
                             f"{tuple(host.shape)} on {host.device}")
        if (ring is None) != (position is None) or ring is not None and (
                ring.dim() != 1 or ring.numel() == 0 or ring.dtype != torch.int64 or ring.device != self.device
                or not ring.is_contiguous()
                or position.shape != (1,) or position.dtype != torch.int64 or position.device != self.device):
            raise ValueError(f"ring and position: expected a [R] and a [1] int64 tensor on {self.device} together, got "
                             f"{None if ring is None else (ring.dtype, tuple(ring.shape), str(ring.device))} and "
                             f"{None if position is None else (position.dtype, tuple(position.shape))}")
        if advance and ring is None:
            raise ValueError("advance: the position moves on only with a ring and position")
        if x.numel() >= 1 << 31:
            raise ValueError(f"x: {x.numel()} values do not fit the kernel's 32-bit index")
        _argmax_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, out, host if host is not None else out, self.cell,
                                                          self.count, ring if ring is not None else out,
                                                          position if position is not None else out, x.numel(),
                                                          EMPTY=EMPTY, BLOCK=BLOCK, HOST=host is not None,
                                                          RING=0 if ring is None else ring.numel(), ADVANCE=advance)
        return out
