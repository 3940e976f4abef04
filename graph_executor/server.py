"""The graph executor process: loads the model, exports its static step buffers, serves step commands.

Started by the supervisor as `python -m graph_executor ...`. It binds the control channel, waits for the JIT
context's handshake, answers with `Ready` (model facts + shared buffer specs), then runs Prefill/Decode steps
and replies `StepDone`. It exits by itself when its JIT context or its supervisor dies.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from contextlib import contextmanager

import torch
import zmq

from graph_executor.loader import LOAD_FORMATS, LoadConfig, LoadedModel, load_model
from graph_executor.runner import ModelRunner, StepBuffers
from ipc.channel import Channel, bind_control
from ipc.errors import HybridrtError, ProtocolError
from ipc.events import StepEvents
from ipc.liveness import process_alive
from ipc.messages import (
    PROTOCOL_VERSION,
    Abort,
    Decode,
    Error,
    Handshake,
    Message,
    Ok,
    Prefill,
    Ready,
    Reset,
    Shutdown,
    Status,
    StatusReply,
    StepDone,
)
from ipc.shared_tensor import CudaIpcTensor, SharedTensor, ShmTensor, dtype_name

POLL_MS = 100  # how often an idle executor checks that its peers are alive
SPIN_US = 20_000  # while a request runs on the GPU, busy-poll this long for the next step before sleeping


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="graph_executor", description="hybridrt graph executor process")
    p.add_argument("--control", required=True, help="control channel address to bind")
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--seed-weights", type=int, default=0)
    p.add_argument("--supervisor-pid", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-graphs", action="store_true", help="run every step eagerly (no CUDA graphs)")
    return p.parse_args(argv)


def export_buffers(vocab_size: int, max_context: int, device: torch.device) -> tuple[StepBuffers, list[SharedTensor]]:
    """Allocate the step buffers once, in memory the JIT context can map (shm on CPU, CUDA IPC on GPU)."""
    shapes = {"input_ids": ((max_context,), torch.int64), "next_token": ((1,), torch.int64),
              "logits": ((vocab_size,), torch.float32)}
    shared: list[SharedTensor] = []
    for name, (shape, dtype) in shapes.items():
        if device.type == "cuda":
            shared.append(CudaIpcTensor.create(name, shape, dtype, device=device.index or 0))
        else:
            shared.append(ShmTensor.create(name, shape, dtype))
    views = {name: s.tensor for name, s in zip(shapes, shared)}
    for view in views.values():
        view.zero_()
    return StepBuffers(**views), shared


class ExecutorServer:
    def __init__(self, channel: Channel, loaded: LoadedModel, supervisor_pid: int | None,
                 graphs: bool = True, quiet: bool = False) -> None:
        self.quiet = quiet
        self.channel = channel
        self.loaded = loaded
        model = loaded.model
        device = model.embed_tokens.device
        buffers, self.shared = export_buffers(model.config.vocab_size, model.max_context, device)
        self.cuda = device.type == "cuda"
        self.graphs = None  # the GraphRunner on the GPU path: it captures while idle and reports its graphs
        if self.cuda and graphs:
            from graph_executor.graphs import GraphRunner  # needs Triton: GPU path only

            self.graphs = GraphRunner(model, buffers)
        self.runner = self.graphs if self.graphs is not None else ModelRunner(model, buffers)
        # GPU hand-over: the JIT context records `jit_event` after writing inputs / sampling; we wait on it
        # before a step and record `exec_event` after it. Neither side's host ever waits for the device.
        self.events = StepEvents.create(device) if self.cuda else None
        self.supervisor_pid = supervisor_pid
        self.peer_pid: int | None = None
        self.busy = False  # a request is between its Prefill and its Reset: no graph capture then

    def ready_message(self) -> Ready:
        model, cfg = self.loaded.model, self.loaded.model.config
        facts = {"load_seconds": round(self.loaded.load_seconds, 3), "source": self.loaded.source,
                 "tokenizer_path": str(self.loaded.tokenizer_path or ""), "executor_pid": os.getpid(),
                 "num_params": cfg.num_params(),
                 "graphs": self.graphs.facts() if self.graphs is not None else {},
                 "events": self.events.handles() if self.events else {}}
        if self.cuda:
            facts["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return Ready(PROTOCOL_VERSION, self.loaded.name, cfg.vocab_size, model.max_context,
                     dtype_name(model.dtype), str(model.embed_tokens.device),
                     {s.spec.name: s.spec for s in self.shared}, sorted(cfg.eos_token_ids), facts)

    def peers_alive(self) -> bool:
        pids = [p for p in (self.peer_pid, self.supervisor_pid) if p is not None]
        return all(process_alive(p) for p in pids)

    def serve(self) -> None:
        while True:
            # Mid-request on the GPU the next step is due within a token time: spin instead of sleeping, so the
            # command is picked up without a thread wake-up. Idle (or on the CPU) it sleeps in the poll.
            spin = SPIN_US if self.cuda and self.busy else 0
            try:
                msg = self.channel.recv(timeout_ms=POLL_MS, spin_us=spin)
            except ProtocolError as e:
                if not self.reply(Error(e.code, str(e))):
                    return
                continue
            if msg is None:
                if not self.peers_alive():
                    print("graph_executor: peer process is gone, exiting", file=sys.stderr)
                    return
                self.capture_when_idle()
                continue
            if isinstance(msg, Shutdown):
                return
            if not self.reply(self.handle(msg)):
                print("graph_executor: peer process is gone, exiting", file=sys.stderr)
                return

    def reply(self, msg: Message) -> bool:
        """Send to the JIT context; False once it is gone."""
        return self.channel.send_while(msg, self.peers_alive, POLL_MS)

    def handle(self, msg: Message) -> Message:
        try:
            if isinstance(msg, Prefill):
                self.busy = True
                with self.ordered():
                    if msg.token_ids is not None:
                        self.runner.buffers.input_ids[: msg.num_tokens].copy_(torch.tensor(msg.token_ids))
                    self.runner.prefill(msg.num_tokens, msg.start_pos)
                return StepDone(msg.request_id, msg.step)
            if isinstance(msg, Decode):
                with self.ordered():
                    self.runner.decode(msg.position)
                return StepDone(msg.request_id, msg.step)
            if isinstance(msg, Handshake):
                self.peer_pid = msg.pid
                return self.ready_message()
            if isinstance(msg, (Reset, Abort)):
                self.busy = False
                return Ok(msg.request_id)
            if isinstance(msg, Status):
                return StatusReply(self.ready_message().facts)
        except (ValueError, HybridrtError) as e:
            return Error("step_failed", str(e), getattr(msg, "request_id", None))
        return Error("unexpected", f"the executor does not handle {type(msg).__name__}")

    @contextmanager
    def ordered(self):
        """Order a step after the JIT context's last GPU work and publish its completion as an event."""
        if self.events:
            torch.cuda.current_stream().wait_event(self.events.jit)
        yield
        if self.events:
            self.events.executor.record()

    def capture_when_idle(self) -> None:
        if self.busy or self.graphs is None:
            return
        name = self.graphs.capture_next()
        if name is not None and not self.quiet:
            print(f"graph_executor: captured {name} in {self.graphs.stats.seconds[name] * 1e3:.0f} ms",
                  file=sys.stderr)

    def close(self) -> None:
        for s in self.shared:
            s.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the finally blocks: unlink shared memory
    ctx = zmq.Context()
    channel = bind_control(ctx, args.control)
    server = None
    try:
        start = time.perf_counter()
        loaded = load_model(LoadConfig(model=args.model, load_format=args.load_format, device=args.device,
                                       dtype=args.dtype, max_context=args.max_context, seed=args.seed_weights,
                                       progress=not args.quiet))
        server = ExecutorServer(channel, loaded, args.supervisor_pid, graphs=not args.no_graphs, quiet=args.quiet)
        if not args.quiet:
            print(f"graph_executor: {loaded.name} ready on {loaded.model.embed_tokens.device} in "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        gc.collect()
        gc.freeze()  # start-up objects (torch, the model) are never scanned again: no long GC pauses mid-stream
        server.serve()
        return 0
    except HybridrtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.close()
        channel.close()
        ctx.term()
