"""The graph executor process: `python -m graph_executor ...`, started by the supervisor. It binds the control
channel, loads the model, builds the `ExecutorServer` and runs it; it exits when its JIT context or its
supervisor dies, or on SIGTERM (after unlinking its shared memory). The supervisor's death sends it SIGTERM
at once (PR_SET_PDEATHSIG, armed by `__main__` before the seconds of torch imports); a step in progress is abandoned.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from graph_executor.device import resolve_device
from graph_executor.draft import check_draft
from graph_executor.loading import cache
from graph_executor.loading.load_config import TP_ALLREDUCE
from graph_executor.loading.loader import (
    LOAD_FORMATS,
    LoadConfig,
    LoadedModel,
    check_load_config,
    draft_config,
    load_model,
)
from graph_executor.server import ExecutorServer
from graph_executor.tensor_parallel import TensorParallel
from graph_executor.tp_relay import follow
from ipc.channel import bind_control
from ipc.doorbell import MODES as DOORBELL_MODES
from ipc.doorbell import Doorbell
from ipc.errors import HybridrtError, report_fatal
from ipc.startup import DEFAULT_READY_CAPTURE, StartupPhases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="graph_executor", description="hybridrt graph executor process")
    p.add_argument("--control", required=True, help="control channel address to bind")
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--seed-weights", type=int, default=0)
    p.add_argument("--quantize", default=None)
    p.add_argument("--quantize-group", type=int, default=32)
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="ranks of a tensor-parallel executor (CPU: gloo; GPUs: one per rank, NCCL)")
    p.add_argument("--tp-rank", type=int, default=0, help="this process's rank (0 talks to the JIT context)")
    p.add_argument("--tp-port", type=int, default=0, help="the ranks' rendezvous port on 127.0.0.1")
    p.add_argument("--tp-allreduce", choices=TP_ALLREDUCE, default="nccl",
                   help="the decode step's all-reduces: NCCL's, or one kernel over the ranks' peer memory")
    p.add_argument("--max-num-seqs", type=int, default=1,
                   help="KV slots: sequences held and decoded together")
    p.add_argument("--fit-slots", action="store_true",
                   help="--max-num-seqs is a default: take fewer slots where that many do not fit")
    p.add_argument("--supervisor-pid", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="run every step eagerly (no CUDA graphs)")
    p.add_argument("--draft-model", default=None, help="a draft model for speculative decoding (same tokenizer)")
    p.add_argument("--error-file", default=None,
                   help="write a fatal error's one line here (the supervisor reports it) instead of to stderr")
    p.add_argument("--spawned-at", type=float, default=None,
                   help="the supervisor's wall-clock time at spawn (the imports phase is measured from it)")
    p.add_argument("--capture-before-ready", type=int, default=DEFAULT_READY_CAPTURE, metavar="TOKENS",
                   help="capture the decode graph and the prefill graphs up to TOKENS before ready, so that the first "
                        f"requests run at full speed (default {DEFAULT_READY_CAPTURE}; 0: all while idle, after ready)")
    p.add_argument("--capture-verify", action="store_true",
                   help="capture the verify graphs before ready too (the JIT context speculates: its first requests "
                        "verify proposals)")
    p.add_argument("--doorbell", choices=DOORBELL_MODES, default="auto",
                   help="step commands over shared memory next to the control socket (ipc/doorbell.py): auto = "
                        "on the GPU, on = also on the CPU (tests), off = ZeroMQ only")
    return p.parse_args(argv)



def open_doorbell(mode: str, control: str, device: torch.device) -> Doorbell | None:
    """The executor's doorbell file, next to an ipc:// control socket (the launch's private dir), or None."""
    if mode == "off" or (mode == "auto" and device.type != "cuda") or not control.startswith("ipc://"):
        return None
    return Doorbell.create(control[len("ipc://"):] + ".doorbell")


def rank_device(device: str, tp: TensorParallel) -> str:
    """Where this rank runs: on GPUs rank r takes the r-th GPU from the one named (`cuda`: from GPU 0), one GPU per
    rank as vLLM and gpt-fast place them; on the CPU every rank is "cpu". HybridrtError (one line) when the machine
    has fewer GPUs than ranks."""
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return "cpu"
    first, count = resolved.index or 0, torch.cuda.device_count()
    if first + tp.size > count:
        raise HybridrtError(f"--tensor-parallel {tp.size} runs one rank per GPU: it needs GPUs "
                            f"{first}..{first + tp.size - 1}, this machine shows {count}")
    return f"cuda:{first + tp.rank}"


def join_ranks(tp: TensorParallel, args: argparse.Namespace, device: str) -> None:
    """Join the tensor-parallel process group (rendezvous on 127.0.0.1:--tp-port, hosted by rank 0). On the CPU gloo
    carries everything; on GPUs gloo carries the relay's host header (`tp_relay`) and NCCL the steps' tensors (the
    ids broadcast, the all-reduces and the logits' gather, which the captured graphs hold)."""
    # Long: a rank waits in a collective (gloo: the relay's next header) while the server is idle (a rank that dies
    # ends it at once instead).
    timeout = timedelta(days=30)
    init = f"tcp://127.0.0.1:{args.tp_port}"
    if device == "cpu":
        # The ranks share the machine's cores: each with its own share of threads (the default, every core per rank,
        # oversubscribes them, and a collective then waits for the slowest rank's descheduled threads).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
        dist.init_process_group("gloo", init_method=init, rank=tp.rank, world_size=tp.size, timeout=timeout)
        return
    gpu = torch.device(device)
    torch.cuda.set_device(gpu)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=init, rank=tp.rank, world_size=tp.size,
                            timeout=timeout, device_id=gpu)
    # NCCL's communicator is made by the first collective: here, not inside the first graph capture
    probe = torch.ones(1, device=gpu)
    dist.all_reduce(probe)
    torch.cuda.synchronize(gpu)
    if probe.item() != tp.size:
        raise HybridrtError(f"graph_executor rank {tp.rank}: NCCL's first all-reduce gave {probe.item()}, "
                            f"not {tp.size}")


def load_draft(model: str, target: LoadedModel, args: argparse.Namespace) -> LoadedModel:
    """The draft on the target's device, in its dtype, with its context; HybridrtError if it cannot serve it."""
    draft = load_model(draft_config(model, target, str(target.model.embed_tokens.device), args.seed_weights,
                                    not args.quiet))  # rank 0's GPU under tensor parallelism
    check_draft(draft, target)
    return draft


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    startup = StartupPhases("graph_executor", quiet=args.quiet, spawned_at=args.spawned_at)
    cache.use_for_triton()  # before any kernel compiles: once per machine
    if args.tensor_parallel > 1 and args.tp_rank > 0:
        # A rank > 0 owns no shared memory and no clients: SIGTERM ends it at once, even blocked in a collective
        # with a dead rank, where a Python handler would never run (the supervisor's stop then waited 5 s for it)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally blocks: unlink shared memory
    tp = TensorParallel(args.tp_rank, args.tensor_parallel) if args.tensor_parallel > 1 else None
    ctx = zmq.Context()
    channel = bind_control(ctx, args.control) if tp is None or tp.rank == 0 else None  # rank 0 alone serves
    server = None
    ranks_broken = False  # a collective failed: another rank is gone
    device = "cpu"  # a tensor-parallel rank's device, once known
    try:
        load = LoadConfig(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                          max_context=args.max_context, seed=args.seed_weights, progress=not args.quiet,
                          quantize=args.quantize, quantize_group=args.quantize_group, dequantize=args.dequantize,
                          max_num_seqs=args.max_num_seqs, fit_slots=args.fit_slots,
                          tensor_parallel=args.tensor_parallel, tp_rank=args.tp_rank, tp_allreduce=args.tp_allreduce)
        if args.max_num_seqs > 1 and args.draft_model:
            raise HybridrtError("--draft-model serves speculative decoding, which needs --max-num-seqs 1")
        if tp is not None:
            device = rank_device(args.device, tp)
            load = replace(load, device=device)
            join_ranks(tp, args, device)
        if args.draft_model:  # before the target loads: a bad draft is one line and costs no loaded target
            check_load_config(replace(load, model=args.draft_model, load_format="auto", quantize=None,
                                      dequantize=False))
        loaded = load_model(load)  # a tensor-parallel rank: its part only
        if tp is not None and tp.rank > 0:
            follow(loaded.model, tp, graphs=not args.no_graphs)
            return 0
        for name, seconds in loaded.phases.items():
            startup.add(name, seconds)
        if args.draft_model:
            with startup.phase("draft model"):
                draft = load_draft(args.draft_model, loaded, args)
        else:
            draft = None
        doorbell = open_doorbell(args.doorbell, args.control, loaded.model.device)
        server = ExecutorServer(channel, loaded, args.supervisor_pid, graphs=not args.no_graphs, quiet=args.quiet,
                                draft=draft, doorbell=doorbell, startup=startup, tp=tp)
        server.capture_before_ready(args.capture_before_ready, args.capture_verify)
        gc.collect()
        gc.freeze()  # start-up objects (torch, the model) are never scanned again: no long GC pauses mid-stream
        server.serve()
        return 0
    except HybridrtError as e:
        report_fatal(str(e), args.error_file)
        return 2
    except RuntimeError as e:
        if tp is None or not dist.is_initialized():
            raise
        # A collective failed: another rank is gone (the supervisor names which one exited).
        ranks_broken = True
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        report_fatal(f"graph_executor rank {tp.rank}: a tensor-parallel rank is gone ({first[:200]})", args.error_file)
        if device != "cpu":
            # This GPU may be stuck in a captured NCCL kernel that waits for the dead rank: NCCL's and CUDA's teardown
            # at exit could wait on it. Leave now (the driver ends the context; the supervisor removes our shared
            # memory and runtime files), so that the server ends within the 2 s.
            os._exit(3)
        return 3
    finally:
        # With a rank gone, no more collectives: telling the others to stop, or tearing the group down, may wait on
        # the dead rank's sockets (the supervisor then SIGKILLs this process: CRASH_KILL_GRACE_S after its SIGTERM).
        if server is not None:
            if server.leader is not None and not ranks_broken:
                try:
                    server.leader.stop()
                except RuntimeError:
                    pass  # the others are gone already
            server.close()
        if channel is not None:
            channel.close()
        ctx.term()
        if tp is not None and dist.is_initialized() and not ranks_broken:
            dist.destroy_process_group()
