"""One token's all-reduce between tensor-parallel ranks, measured (issue 15's floor for N GPUs):

    decode floor(c) = (one rank's weight bytes read + its KV bytes * c) / bandwidth + all-reduce * (2 * layers + 1)

Each layer of a rank's step ends o_proj and down_proj with an all-reduce of the residual's update ([hidden] in the
activation dtype); the logits' gather at the end costs about one more. What it takes is the collective's latency at
that size, not bandwidth, so it is measured as the steps run it: on GPUs COUNT all-reduces captured in one CUDA graph
over NCCL (or `--how peer`: the one-kernel all-reduce over peer memory, kernels/peer_allreduce.py, that
`--tp-allreduce peer` gives the ranks), one process per GPU, the replay timed with CUDA events; on the CPU (gloo,
eager, a smoke path) with the host clock. Each rank runs in its own process (spawned), as the server's ranks do.

    python -m bench.allreduce --device cuda --ranks 2 --hidden 4096 --dtype float16 [--how peer]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass

from graph_executor.loading.load_config import TP_ALLREDUCE
from ipc.free_port import free_port

COUNT = 64  # all-reduces per graph (per timed pass on the CPU)
REPEATS = 20


@dataclass(frozen=True)
class AllReduceTiming:
    seconds: float  # one all-reduce of `hidden` elements, median over REPEATS passes of COUNT
    ranks: int
    hidden: int
    dtype: str
    how: str

    def to_dict(self) -> dict:
        return asdict(self)


def _rank(rank: int, ranks: int, port: int, device: str, hidden: int, dtype: str, results, how: str = "nccl") -> None:
    import torch
    import torch.distributed as dist

    from graph_executor.tensor_parallel import TensorParallel

    gpu = device.startswith("cuda")
    init = f"tcp://127.0.0.1:{port}"
    if gpu:
        first = torch.device(device).index or 0
        dev = torch.device(f"cuda:{first + rank}")
        torch.cuda.set_device(dev)
        dist.init_process_group("cpu:gloo,cuda:nccl", init_method=init, rank=rank, world_size=ranks, device_id=dev)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=ranks)
    try:
        x = torch.ones(hidden, dtype=getattr(torch, dtype), device=dev)
        dist.all_reduce(x)  # the communicator, before any capture
        reduce = TensorParallel(rank, ranks).with_peer_allreduce(hidden, x.dtype, dev).peer if how == "peer" \
            else dist.all_reduce
        times = []
        if gpu:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    reduce(x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(COUNT):
                    reduce(x)
            graph.replay()
            torch.cuda.synchronize()
            for _ in range(REPEATS):
                dist.barrier(device_ids=[dev.index])  # the ranks start each pass together
                torch.cuda.synchronize()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(begin.elapsed_time(end) / 1e3 / COUNT)
            dist.barrier(device_ids=[dev.index])  # no rank tears down while another's last kernel reads its slot
        else:
            for _ in range(REPEATS):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(COUNT):
                    reduce(x)
                times.append((time.perf_counter() - start) / COUNT)
        if rank == 0:
            results.put(statistics.median(times))
    finally:
        dist.destroy_process_group()


def measure_allreduce(device: str, ranks: int, hidden: int, dtype: str, timeout_s: float = 300.0,
                      how: str = "nccl") -> AllReduceTiming:
    """One all-reduce of `hidden` elements of `dtype` between `ranks` processes (GPUs from `device`'s index, one
    each; or gloo on the CPU); `how`: "nccl" or "peer" (GPUs only). RuntimeError if a rank fails or it takes longer
    than timeout_s."""
    if ranks < 2:
        raise ValueError(f"an all-reduce needs 2 ranks or more, got {ranks}")
    if how not in TP_ALLREDUCE or (how == "peer" and not device.startswith("cuda")):
        raise ValueError(f"how must be nccl, or peer on GPUs, got {how!r} on {device}")
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # a CUDA context cannot be forked
    results = ctx.Queue()
    port = free_port()  # below the ephemeral range: an outgoing connection cannot take it before rank 0 binds
    procs = [ctx.Process(target=_rank, args=(r, ranks, port, device, hidden, dtype, results, how), daemon=True)
             for r in range(ranks)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if alive or failed or results.empty():
        raise RuntimeError(f"all-reduce measurement: ranks {failed or [procs.index(p) for p in alive]} "
                           f"{'timed out' if alive else 'failed'}")
    kind = "peer-memory" if how == "peer" else "NCCL"
    said = (f"median of {REPEATS} graph replays of {COUNT} {kind} all-reduces" if device.startswith("cuda")
            else f"median of {REPEATS} passes of {COUNT} gloo all-reduces (host clock)")
    return AllReduceTiming(results.get(), ranks, hidden, dtype, said)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (GPUs from 0), cuda:N (from N) or cpu (gloo)")
    ap.add_argument("--ranks", type=int, default=2, help="processes, one GPU each (default 2)")
    ap.add_argument("--hidden", type=int, default=4096, help="elements of one token's all-reduce (default 4096)")
    ap.add_argument("--dtype", default="float16", help="torch dtype name (default float16)")
    ap.add_argument("--how", choices=TP_ALLREDUCE, default="nccl",
                    help="NCCL's all-reduce, or the one kernel over peer memory (GPUs) (default nccl)")
    args = ap.parse_args(argv)
    try:
        t = measure_allreduce(args.device, args.ranks, args.hidden, args.dtype, how=args.how)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{t.ranks} ranks, {t.hidden} x {t.dtype}: {t.seconds * 1e6:.2f} us per all-reduce ({t.how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
