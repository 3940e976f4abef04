"""The JIT context process: `python -m jit_context ...`, started by the supervisor. It connects to its
executor's control channel and queues its Handshake, loads the tokenizer (and its sampling kernels) while the
executor loads, waits for the executor's Ready, imports the shared step buffers, builds the `JitServer` (on a GPU
while the executor still captures its start-up graphs: `Ready.captures_pending`), and runs it once the executor's
second Ready says they are done; it exits when its executor dies (after telling every waiting client) or on
SIGTERM (after answering every running and queued request with `shutting_down`). The supervisor's death sends it
SIGTERM at once (PR_SET_PDEATHSIG, armed by `__main__` before the seconds of torch imports): the request in flight
is abandoned and its client told.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from ipc.channel import Channel, connect_control
from ipc.client_ports import open_client_ports
from ipc.doorbell import Doorbell
from ipc.errors import HybridrtError, report_fatal
from ipc.events import StepEvents
from ipc.liveness import process_alive
from ipc.messages import PROTOCOL_VERSION, Handshake, Ready
from ipc.startup import StartupPhases
from ipc.step_buffers import SharedStepBuffers
from jit_context import SERVER_API_KEY_ENV
from jit_context.remote_executor import DEFAULT_STEP_TIMEOUT_S, ExecutorDied, RemoteExecutor
from jit_context.request_log import STATS_INTERVAL_S, RequestLog
from jit_context.request_side import build_request_side
from jit_context.server import IDLE_POLL_MS, JitServer
from jit_context.speculative_config import SpeculativeConfig, with_draft_cost
from jit_context.tokenizer import Tokenizer, import_tokenizer_modules

FINAL_REPLY_LINGER_MS = 1000  # on exit, let the last replies (errors for every waiting client) leave
GUESSED_VOCAB = 32000  # the vocabulary the early kernel warm-up uses without a tokenizer (Llama 2's)


class Terminated(BaseException):
    """SIGTERM (the supervisor stopping), raised in the main thread wherever it is; a BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way turns it into an ordinary error."""


def _terminate(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the final replies
    raise Terminated


def write_address(path: Path, address: str) -> None:
    """Whole or not at all: the supervisor polls for the file and reads it once it exists."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(address)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jit_context", description="hybridrt JIT context process")
    p.add_argument("--control", required=True, help="the executor's control channel address")
    p.add_argument("--listen", required=True, help="client-facing address to bind")
    p.add_argument("--address-file", default=None,
                   help="write the address bound (a tcp port 0 resolved) here once clients can connect, for the "
                        "supervisor")
    p.add_argument("--local-stream", default=None,
                   help="also listen for clients on this machine at this AF_UNIX path (ipc.local_stream)")
    p.add_argument("--executor-pid", type=int, required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--tokenizer-hint", default=None,
                   help="the tokenizer folder the executor will most likely report: loaded while it loads the model "
                        "(used only if Ready names the same folder)")
    p.add_argument("--cuda-device", default=None,
                   help="the GPU the executor will run on (cuda or cuda:N): this process makes its CUDA context there "
                        "while the executor loads, instead of after the handshake")
    p.add_argument("--prefix-reuse", action="store_true",
                   help="a prompt that starts with what the KV cache holds from the last request prefills only the "
                        "rest (not with a draft model)")
    p.add_argument("--log-requests", action="store_true",
                   help="a line per finished request and the throughput every few seconds on stderr (serve)")
    p.add_argument("--stats-interval", type=float, default=STATS_INTERVAL_S,
                   help="seconds between --log-requests' throughput lines")
    p.add_argument("--error-file", default=None,
                   help="write a fatal error's one line here (the supervisor reports it) instead of to stderr")
    p.add_argument("--chat-template", default=None, help="template text replacing the tokenizer's own")
    p.add_argument("--spawned-at", type=float, default=None,
                   help="the supervisor's wall-clock time at spawn (the imports phase is measured from it)")
    p.add_argument("--quiet", action="store_true", help="no start-up phase lines")
    p.add_argument("--idle-spin-ms", type=float, default=0.0,
                   help="after each request, poll the clients without sleeping for this long (a request that comes "
                        "meanwhile is read without a thread wake-up; holds a core; 0: sleep at once)")
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S,
                   help="seconds to wait for the executor to answer a step before failing the request")
    plain = SpeculativeConfig()  # the defaults of SpeculativeConfig (the supervisor passes every one)
    p.add_argument("--speculative", default=plain.method, help="off, ngram or draft (launch.options explains them)")
    p.add_argument("--num-speculative-tokens", type=int, default=plain.num_tokens)
    p.add_argument("--ngram-min", type=int, default=plain.ngram_min)
    p.add_argument("--ngram-max", type=int, default=plain.ngram_max)
    p.add_argument("--no-adaptive-k", action="store_true")
    args = p.parse_args(argv)
    if not args.step_timeout > 0:
        p.error("--step-timeout must be > 0")
    if not args.stats_interval > 0:
        p.error("--stats-interval must be > 0")
    if not args.idle_spin_ms >= 0:
        p.error("--idle-spin-ms must be >= 0")
    try:
        args.speculation = SpeculativeConfig(args.speculative, args.num_speculative_tokens, args.ngram_min,
                                             args.ngram_max, adaptive=not args.no_adaptive_k)
    except ValueError as e:
        p.error(str(e))
    return args


def _handshake() -> Handshake:
    return Handshake(PROTOCOL_VERSION, "jit_context", os.getpid())


def send_handshake_now(control: Channel) -> bool:
    """Queue the Handshake without waiting (the connecting PAIR queues it before the executor has bound): the executor
    can then answer it as soon as it has its step buffers, while we still load the tokenizer. False if it could not
    be queued at once (`wait_ready` sends it then)."""
    try:
        control.send(_handshake(), timeout_ms=0)
        return True
    except TimeoutError:
        return False


def wait_ready(control: Channel, executor_pid: int, handshake_sent: bool = False) -> Ready:
    """Send the Handshake (unless it was) and return the executor's Ready (whose captures may still be pending)."""
    if not handshake_sent and not control.send_while(_handshake(), lambda: process_alive(executor_pid),
                                                     IDLE_POLL_MS):
        raise ExecutorDied("the graph executor exited before it was ready")
    return await_ready(control, executor_pid)


def await_ready(control: Channel, executor_pid: int) -> Ready:
    """The executor's next Ready, however long it takes while it lives (its start-up captures may compile kernels for
    a minute on a fresh machine)."""
    while True:
        msg = control.recv(timeout_ms=IDLE_POLL_MS)
        if isinstance(msg, Ready):
            if msg.protocol_version != PROTOCOL_VERSION:
                raise HybridrtError(f"executor speaks protocol {msg.protocol_version}, we speak {PROTOCOL_VERSION}")
            return msg
        if msg is None and not process_alive(executor_pid):
            raise ExecutorDied("the graph executor exited before it was ready")


@dataclass(frozen=True)
class Preloaded:
    """A tokenizer loaded before the handshake, and the folder it came from (resolved)."""

    path: Path
    tokenizer: Tokenizer


def make_cuda_context(device: str) -> threading.Thread:
    """Create this process's CUDA context on `device` in a thread (~0.2 s, mostly in the driver), beside the
    tokenizer's load on the main thread; join it before the handshake. No such device: nothing (the executor says
    so, in one line)."""
    def run() -> None:
        try:
            torch.zeros(1, device=device)
        except (RuntimeError, ValueError):
            pass

    thread = threading.Thread(target=run, name="cuda-context", daemon=True)
    thread.start()
    return thread


def warm_up_vocab(preloaded: Preloaded | None) -> int:
    """The vocabulary the early warm-ups use: the preloaded tokenizer's size, else Llama 2's."""
    return preloaded.tokenizer.vocab_size if preloaded is not None else GUESSED_VOCAB


def load_kernels_early(device: str, preloaded: Preloaded | None, speculating: bool) -> None:
    """Run the sampling (and, when speculating, acceptance) paths once on `device` before the handshake, while the
    executor still loads: CUDA loads each kernel's module at its first launch, which the same warm-ups after the
    handshake paid instead (0.21-0.25 s of "tokenizer and sampler" there on the H200, on the path to ready). The
    model's vocabulary is not known yet: the tokenizer's size, or Llama 2's, stands in for it (the kernels are the
    same; the warm-ups after the handshake run again on the real size, then in milliseconds). No GPU: nothing."""
    if not torch.cuda.is_available():
        return  # no such device: the executor says so, in one line
    from jit_context import acceptance, sampler

    vocab = warm_up_vocab(preloaded)
    try:
        target = torch.device(device)
        sampler.warm_up(torch.zeros(vocab, device=target))
        if speculating:
            acceptance.warm_up(vocab, target)
        torch.cuda.synchronize(target)
    except (RuntimeError, ValueError):
        pass  # e.g. no such GPU: the executor says so, in one line


def preload_tokenizer(args: argparse.Namespace, startup: StartupPhases) -> Preloaded | None:
    """Load the tokenizer that --tokenizer names, or the one the executor will most likely report, while the
    executor still loads the model; without either, import what loading one will need."""
    path = args.tokenizer or args.tokenizer_hint
    if not path:
        with startup.phase("tokenizer imports"):
            import_tokenizer_modules()
        return None
    with startup.phase("tokenizer (while the executor loads)"):
        try:
            return Preloaded(Path(path).resolve(), Tokenizer.from_path(path))
        except HybridrtError:
            if args.tokenizer:
                raise  # the one to use: its one-line error now, not after the executor has loaded the model
            return None  # only a guess: the folder Ready names is loaded (and any error reported) after it


def build_server(args: argparse.Namespace, ctx: zmq.Context, control: Channel,
                 startup: StartupPhases | None = None, preloaded: Preloaded | None = None,
                 handshake_sent: bool = False) -> JitServer:
    startup = startup or StartupPhases("jit_context", quiet=True)
    with startup.phase("waiting for the executor (handshake)"):
        ready = wait_ready(control, args.executor_pid, handshake_sent)
    with startup.phase("step buffers and events (IPC)"):
        shared = SharedStepBuffers.open(ready.buffers, ready.vocab_size, ready.max_context, ready.max_num_seqs)
        events = StepEvents.open(ready.events, torch.device(ready.device)) if ready.events is not None else None
        doorbell = Doorbell.open(ready.doorbell) if ready.doorbell is not None else None
    executor = RemoteExecutor(control, shared, ready.max_context, args.executor_pid, events,
                              step_timeout_s=args.step_timeout, doorbell=doorbell)
    try:
        speculation = with_draft_cost(args.speculation, ready.facts.get("num_params", 0), ready.draft_params)
    except ValueError as e:
        raise HybridrtError(str(e)) from None
    with startup.phase("tokenizer and sampler"):
        path = args.tokenizer or ready.tokenizer_path
        early = preloaded.tokenizer if preloaded and path and Path(path).resolve() == preloaded.path else None
        side = build_request_side(executor, ready.model_name, ready.vocab_size, ready.eos_token_ids, path,
                                  args.chat_template, speculation, preloaded=early, prefix_reuse=args.prefix_reuse)
    # Structured output's view of the vocabulary, meanwhile, on a GPU (~0.2 s of host time, else in the first such
    # request's TTFT: ~1,000 GPU steps of a small model); on the CPU, where a step takes tens of ms, at first use.
    if side.grammars is not None and torch.device(ready.device).type == "cuda":
        side.grammars.prepare_in_background()
    ports = open_client_ports(ctx, args.listen, args.local_stream)
    if args.address_file is not None:
        write_address(Path(args.address_file), ports.router.endpoint())
    server = JitServer(ports, executor, side, ready, api_key=os.environ.pop(SERVER_API_KEY_ENV, None) or None,
                       log=RequestLog(args.stats_interval) if args.log_requests else None, startup=startup,
                       idle_spin_ms=args.idle_spin_ms)
    if ready.captures_pending:  # all of the above ran while the executor captured its start-up graphs
        with startup.phase("waiting for the executor's graph captures"):
            final = await_ready(control, args.executor_pid)
        if final.captures_pending or final.buffers != ready.buffers:
            raise HybridrtError("the executor's second Ready does not confirm its first (protocol error)")
        server.executor_ready(final)
    with startup.phase("warm-up request"):
        server.warm_up()
    return server


# Torch threads of this process's own ops (the sampling's, over the vocabulary). One: torch's default of one per core
# made each parallel op leave its pool's threads spinning on cores the executor computes on (CPU machine, SmolLM2's
# shape, two processes: a token 58 ms plain greedy, 64 with a repetition penalty or a structured output's mask, 69
# sampled; with one thread 58 / 58 / 63, bench/NOTES.md 45th session). On a GPU these ops run on the device.
JIT_TORCH_THREADS = 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(JIT_TORCH_THREADS)
    startup = StartupPhases("jit_context", quiet=args.quiet, spawned_at=args.spawned_at)
    signal.signal(signal.SIGTERM, _terminate)
    ctx = zmq.Context()
    control = connect_control(ctx, args.control)
    server = None
    try:
        handshake_sent = send_handshake_now(control)
        context = make_cuda_context(args.cuda_device) if args.cuda_device else None
        preloaded = preload_tokenizer(args, startup)  # while the executor still loads
        if context is not None:
            context.join()
            with startup.phase("sampling kernels (while the executor loads)"):
                load_kernels_early(args.cuda_device, preloaded, args.speculation.enabled)
        server = build_server(args, ctx, control, startup, preloaded, handshake_sent)
        startup.ready()
        gc.collect()
        gc.freeze()  # start-up objects (torch, tokenizer) are never scanned again: no long GC pauses mid-stream
        server.run()
        return 0
    except Terminated:
        if server is not None:  # every request in flight or queued hears why, instead of timing out
            server.fail_everyone("shutting_down", "the server is shutting down")
        return 0
    except ExecutorDied as e:
        report_fatal(str(e), args.error_file)
        return 3
    except HybridrtError as e:
        report_fatal(str(e), args.error_file)
        return 2
    finally:
        if server is not None:
            server.clients.close(linger_ms=FINAL_REPLY_LINGER_MS)  # the final errors just queued
        control.close()
        ctx.term()
