"""Probe: what one grid-wide barrier of the persistent decode step costs (kernels/persistent_step.py `_arrive` and
`_wait`): a kernel of COUNT barriers and nothing else, over grids of 1-4 programs an SM, each as a CUDA graph replay; per
barrier = (time - the same kernel with no barrier) / COUNT.

    python -m bench.probes.grid_barrier [--count 180] [--per-sm 1,2] [--warps 4]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor.kernels.persistent_step import _arrive, _wait


@triton.jit
def _barriers_kernel(sync_ptr, COUNT: tl.constexpr, SYNC: tl.constexpr):
    epoch = 0
    for _ in range(COUNT):
        epoch += 1
        if SYNC:
            _arrive(sync_ptr)
            _wait(sync_ptr, epoch, False)
    if SYNC:
        if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=180, help="barriers a launch (SmolLM2's step: 30 layers x 6)")
    ap.add_argument("--per-sm", default="1,2", help="comma list of programs an SM")
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    counters = torch.zeros(2, dtype=torch.int32, device=device)
    print(f"grid barriers on {torch.cuda.get_device_name()} ({sms} SMs), {args.count} a launch, {args.warps} warps")
    print("| programs | launch with barriers (us) | without (us) | per barrier (us) |")
    print("|---|---|---|---|")
    for per_sm in (int(p) for p in args.per_sm.split(",")):
        grid = (sms * per_sm,)
        times = []
        for sync in (True, False):
            graph = graphed(lambda s=sync: _barriers_kernel[grid](counters, COUNT=args.count, SYNC=s,
                                                                  num_warps=args.warps))
            times.append(time_gpu(graph.replay, device) * 1e6)
        assert int(counters.abs().sum()) == 0
        print(f"| {grid[0]} | {times[0]:.1f} | {times[1]:.1f} | {(times[0] - times[1]) / args.count:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
