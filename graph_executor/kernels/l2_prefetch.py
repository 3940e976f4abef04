"""Weights prefetched into L2 from inside a latency-bound kernel of the decode step (Hopper's bulk L2 prefetch).

Why: a decode GEMV pays a ramp (its first bytes arrive a microsecond or two after it starts) that PDL does not
hide, and on LLaMA-2-7B o_proj (33.5 MB a layer) reads at ~2.85 TB/s against ~3.9 for the larger projections
(bench/NOTES.md, issue 12). The decode attention kernel just before it is latency-bound at short contexts (a few
MB of K/V spread over hundreds of programs), so the HBM is mostly idle while it runs: if its programs ask for the
next GEMV's weights to be brought into L2 (`cp.async.bulk.prefetch.L2`: one instruction per program and region,
nothing comes back to the program, the values are not touched), the GEMV finds them there. On a small model
(SmolLM2-135M: a layer's weights are ~4.4 MB) the rest of the layer fits L2 outright.

What may be prefetched: weights only (constant during a step), so a prefetch can never read anything a kernel of
the step writes, and it changes no value: a step with it gives the same bits as without. The budget caps the bytes
per call (L2 is 50 MB on an H200; the attention's own K/V and the residual stream live there too).

Only on sm_90+ (the instruction); the Triton interpreter cannot run inline PTX, so on the CPU the plan is built and
tested but never launched (`supported`).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 4096  # a region is cut into whole chunks, shared out over the programs (the kernels below name it too)
MAX_REGIONS = 4  # regions per call: a kernel takes this many (pointer, chunks) pairs


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@dataclasses.dataclass(frozen=True)
class L2Prefetch:
    """Up to MAX_REGIONS byte ranges to prefetch: each a uint8 view of a weight's storage [n] and how many whole
    CHUNK_BYTES chunks of it to ask for (a tail under one chunk, or past the budget, is left)."""

    regions: tuple[tuple[torch.Tensor, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(chunks for _, chunks in self.regions) * CHUNK_BYTES



def kernel_args(prefetch: L2Prefetch | None, dummy: torch.Tensor) -> tuple[list, int]:
    """What a kernel taking `prefetch_l2`'s arguments is launched with: ([p0, n0, p1, n1, ...] for MAX_REGIONS pairs,
    the unused ones `dummy` and 0; the REGIONS constexpr, 0 for no prefetch)."""
    regions = prefetch.regions if prefetch is not None else ()
    args: list = []
    for i in range(MAX_REGIONS):
        view, chunks = regions[i] if i < len(regions) else (dummy, 0)
        args += [view, chunks]
    return args, len(regions)


def weight_storages(weight: object) -> list[torch.Tensor]:
    """The tensors a projection's weight reads in a step, in order: a dense weight itself, or a packed format's
    tensor fields (codes, scales, offsets: every field that is a tensor)."""
    if isinstance(weight, torch.Tensor):
        return [weight]
    if dataclasses.is_dataclass(weight):
        return [v for f in dataclasses.fields(weight) if isinstance(v := getattr(weight, f.name), torch.Tensor)]
    raise TypeError(f"cannot prefetch a weight of type {type(weight).__name__}")


def plan(weights: list[object], budget_bytes: int) -> L2Prefetch | None:
    """The prefetch of `weights` (in the order the step reads them) up to `budget_bytes`: whole chunks from the
    start of each tensor, the last one cut at the budget; at most MAX_REGIONS tensors; None if nothing fits. A
    tensor whose storage is not 16-byte aligned (the instruction's rule) is skipped."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    left = budget_bytes // CHUNK_BYTES
    regions: list[tuple[torch.Tensor, int]] = []
    for tensor in (t for w in weights for t in weight_storages(w)):
        if left == 0 or len(regions) == MAX_REGIONS:
            break
        if not tensor.is_contiguous() or tensor.data_ptr() % 16:
            continue
        chunks = min(tensor.numel() * tensor.element_size() // CHUNK_BYTES, left)
        if chunks:
            regions.append((tensor.view(-1).view(torch.uint8), chunks))
            left -= chunks
    return L2Prefetch(tuple(regions)) if regions else None


@triton.jit
def _bulk_prefetch(addr, nbytes, on):
    """addr [THREADS] pointers, nbytes [THREADS] int32 (a multiple of 16), on [THREADS] int32: each thread with on != 0
    asks for the nbytes at its address to be brought into L2; nothing is returned. The instruction takes uniform
    operands (SASS UBLKPF): the compiler loops over a warp's distinct addresses, so a caller gives every thread the
    same one and turns on one thread."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r,r", [addr, nbytes, on], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_region(base, chunks, pid, nprog, THREADS: tl.constexpr):
    """Program pid of nprog asks for its share of the `chunks` chunks at `base` (a uint8 pointer) in one instruction
    (issued by one thread: one per program and region)."""
    per = tl.cdiv(chunks, nprog)
    lo = pid * per
    n = tl.minimum(per, chunks - lo)
    lane = tl.arange(0, THREADS)
    first = lane == 0
    addr = base + (lo.to(tl.int64) * 4096 + lane * 0)
    _bulk_prefetch(addr, (tl.maximum(n, 0) * 4096 + lane * 0).to(tl.int32), (first & (n > 0)).to(tl.int32))


@triton.jit
def prefetch_l2(p0, n0, p1, n1, p2, n2, p3, n3, pid, nprog, REGIONS: tl.constexpr, THREADS: tl.constexpr):
    """Called by each of a kernel's nprog programs (pid its index): the regions of an `L2Prefetch` spread over
    them. REGIONS = 0 compiles to nothing (the interpreter and devices before sm_90 take that)."""
    if REGIONS > 0:
        _prefetch_region(p0, n0, pid, nprog, THREADS)
    if REGIONS > 1:
        _prefetch_region(p1, n1, pid, nprog, THREADS)
    if REGIONS > 2:
        _prefetch_region(p2, n2, pid, nprog, THREADS)
    if REGIONS > 3:
        _prefetch_region(p3, n3, pid, nprog, THREADS)
