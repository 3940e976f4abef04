"""The supervisor: starts the graph executor and JIT context processes, waits for ready, watches them, and
stops them (and cleans their shared memory) however they end.

Children never outlive the supervisor, however it ends (a signal, an exception, SIGKILL, a time-out killing
it), and nothing is left behind within 3 s:
- each child arms PR_SET_PDEATHSIG = SIGTERM first thing (`ipc/parent_death.py`, from the supervisor's pid in
  its environment, before its slow imports), so the kernel stops it the moment the supervisor dies: the JIT
  context answers its clients `shutting_down` and abandons the request in flight, the executor unlinks its
  shared memory. Elsewhere than Linux, their liveness watch of each other and of the supervisor (the
  executor polls the supervisor's pid) does the same, more slowly. The children must be started from a thread
  that lives as long as the supervisor (the kernel signals when the forking *thread* exits): the main one.
- a reaper (`launch/reaper.py`), started first in its own session and told on a pipe what exists (runtime
  directory, children, their segments, the MPS daemon), sees end-of-file when the supervisor dies without
  saying `done`: it SIGKILLs a child still alive after 1.5 s, unlinks the segments, quits the MPS daemon
  (which forked away from us, so no parent-death signal reaches it) and removes the runtime directory.
An orderly `stop()` does all of that itself and then tells the reaper `done`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from graph_executor.device_names import check_names
from graph_executor.loading.load_config import LoadConfig
from graph_executor.loading.model_source import check_reference
from graph_executor.loading.tokenizer_location import known_tokenizer_folder
from ipc.cuda_context import gpu_visible
from ipc.doorbell import MODES as DOORBELL_MODES
from ipc.errors import HybridrtError
from ipc.free_port import free_port
from ipc.parent_death import SUPERVISOR_PID_ENV
from ipc.runtime_dir import RuntimeDir, segment_dir
from ipc.startup import DEFAULT_READY_CAPTURE, StartupPhases
from jit_context import DEFAULT_STEP_TIMEOUT_S, SERVER_API_KEY_ENV
from jit_context.request_log import STATS_INTERVAL_S
from jit_context.speculative_config import SpeculativeConfig
from launch.mps import MpsDaemon
from launch.options import load_argv

STOP_GRACE_S = 5.0
PEER_EXIT_GRACE_S = 2.0  # once one child died, the other gets this long to tell its clients and exit by itself
# After a child died, an executor process still there past PEER_EXIT_GRACE_S gets this long after SIGTERM: one blocked
# in a collective with a dead rank cannot run its SIGTERM handler (seen in CI: the server then ended 7.2 s after a
# rank was killed, 2 s of grace plus STOP_GRACE_S). Its shared memory is removed here (`_remove_leftover_segments`).
CRASH_KILL_GRACE_S = 0.5


class ChildDied(HybridrtError):
    """A runtime process exited while the server was running or starting."""


@dataclass(frozen=True)
class ServerConfig:
    load: LoadConfig
    listen: str | None = None  # client-facing address; None: an ipc:// socket in the runtime dir
    tokenizer: str | None = None
    chat_template: str | None = None  # template text replacing the tokenizer's own
    ready_timeout_s: float = 600.0
    mps: str = "auto"  # auto | on | off: a private MPS daemon for the two processes (GPU only)
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S  # a step the executor has not answered by then fails its request
    api_key: str | None = field(default=None, repr=False)  # required of every native (and HTTP) client if set
    speculation: SpeculativeConfig = field(default_factory=SpeculativeConfig)  # the JIT context's decode loop
    prefix_reuse: bool = False  # the JIT context skips the prefill of a prompt's start the KV cache holds
    draft_model: str | None = None  # the executor's draft model (--speculative draft)
    doorbell: str = "auto"  # auto | on | off: step commands over shared memory (auto: GPU only; on: tests on CPU)
    log_requests: bool = False  # the JIT context logs each finished request and the throughput (serve)
    stats_interval_s: float = STATS_INTERVAL_S  # between those throughput lines
    # prompt tokens whose prefill graphs (and decode's) the executor captures before ready (GPU; 0: after ready)
    capture_before_ready: int = DEFAULT_READY_CAPTURE
    tensor_parallel: int = 1  # executor ranks (graph_executor/tp_relay.py); rank 0 talks to the JIT context
    local_stream: bool = True  # native clients on this machine stream over AF_UNIX (ipc/local_stream.py), not ZeroMQ
    # after each request the JIT context polls its clients without sleeping this long (jit_context.server.JitServer)
    jit_idle_spin_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.ready_timeout_s <= 0:
            raise ValueError("ready_timeout_s must be > 0")
        if not self.step_timeout_s > 0:
            raise ValueError("step_timeout_s must be > 0")
        if self.capture_before_ready < 0:
            raise ValueError(f"capture_before_ready must be >= 0, got {self.capture_before_ready}")
        if not self.jit_idle_spin_ms >= 0:
            raise ValueError(f"jit_idle_spin_ms must be >= 0, got {self.jit_idle_spin_ms}")
        if self.doorbell not in DOORBELL_MODES:
            raise ValueError(f"doorbell must be one of {', '.join(DOORBELL_MODES)}, got {self.doorbell!r}")


def gpu_requested(device: str) -> bool:
    """Whether --device (auto or cuda) will run on a CUDA GPU, asked of the CUDA driver directly (ctypes, ~10 ms) so
    that the launcher decides about MPS without torch; a bad --device is `device_names.check_names`'s to report."""
    return (device == "auto" or device.startswith("cuda")) and gpu_visible()


def executor_argv(config: ServerConfig, control: str, error_file: Path, rank: int = 0, tp_port: int = 0) -> list[str]:
    """The graph executor's command line for this server (`graph_executor.process.parse_args` reads it); `rank` of
    a tensor-parallel executor, whose ranks meet on 127.0.0.1:`tp_port`."""
    argv = [sys.executable, "-m", "graph_executor", "--control", control, *load_argv(config.load),
            "--supervisor-pid", str(os.getpid()), "--doorbell", config.doorbell, "--error-file", str(error_file),
            "--capture-before-ready", str(config.capture_before_ready), "--spawned-at", repr(time.time())]
    if config.tensor_parallel > 1:
        argv += ["--tensor-parallel", str(config.tensor_parallel), "--tp-rank", str(rank), "--tp-port", str(tp_port)]
    if config.draft_model is not None:
        argv += ["--draft-model", config.draft_model]
    if config.speculation.method != "off":
        argv.append("--capture-verify")  # the first requests verify proposals: graphs, not eager steps
    return argv


def jit_argv(config: ServerConfig, control: str, listen: str, executor_pid: int, error_file: Path,
             gpu: bool, local_stream: Path | None = None, address_file: Path | None = None) -> list[str]:
    """The JIT context's command line for this server (`jit_context.process.parse_args` reads it). `local_stream`:
    the path where it also listens for clients on this machine (`ipc.local_stream`); `address_file`: where it
    writes the address it bound (a tcp port 0 resolved)."""
    load = config.load
    argv = [sys.executable, "-m", "jit_context", "--control", control, "--listen", listen,
            *(["--local-stream", str(local_stream)] if local_stream is not None else []),
            *(["--address-file", str(address_file)] if address_file is not None else []),
            "--executor-pid", str(executor_pid), "--step-timeout", repr(config.step_timeout_s),
            "--error-file", str(error_file), "--spawned-at", repr(time.time()),
            *([] if load.progress else ["--quiet"]),
            *(["--cuda-device", "cuda" if load.device == "auto" else load.device] if gpu else []),
            *(["--log-requests", "--stats-interval", repr(config.stats_interval_s)] if config.log_requests else []),
            *(["--prefix-reuse"] if config.prefix_reuse else []),
            *(["--idle-spin-ms", repr(config.jit_idle_spin_ms)] if config.jit_idle_spin_ms else []),
            *config.speculation.argv()]
    if config.tokenizer:
        argv += ["--tokenizer", config.tokenizer]
    elif (hint := known_tokenizer_folder(load.model, load.load_format)) is not None:
        argv += ["--tokenizer-hint", str(hint)]  # loaded while the executor loads the model
    if config.chat_template is not None:
        argv += ["--chat-template", config.chat_template]
    return argv


def _describe_exit(name: str, code: int) -> str:
    if code < 0:
        return f"{name} was killed by {signal.Signals(-code).name}"
    return f"{name} exited with code {code}"


def any_port(address: str) -> bool:
    """Whether a ZeroMQ address asks for any free TCP port (`tcp://host:0` or `tcp://host:*`)."""
    return address.startswith("tcp://") and address.rsplit(":", 1)[-1] in ("0", "*")


class StopRequested(Exception):
    """The caller asked to stop (its `stop` event) before the server was ready."""


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.runtime = RuntimeDir()
        self.reaper = _start_reaper()  # from here on, a SIGKILL of this process leaves nothing behind
        self._tell_reaper(f"runtime {self.runtime.path}")
        self.address = config.listen or self.runtime.ipc_address("client")
        # `tcp://host:0`: the JIT context binds a free port and writes the address here; wait_ready reads it
        self._address_file = self.runtime.path / "client.address" if any_port(self.address) else None
        self.children: dict[str, subprocess.Popen] = {}
        self.ready_facts: dict = {}
        self.started_at = time.perf_counter()
        self.ready_seconds: float | None = None
        # The launcher's own phases before it spawns the children (theirs are in the ready facts).
        self.startup = StartupPhases("launcher", quiet=not config.load.progress)
        self.mps: MpsDaemon | None = None
        self._stop_lock = threading.Lock()  # stop() may come from the HTTP watcher thread and from the main one
        self._stopped = False
        self._crashed = False  # a child died: `_stop` gives the executor processes CRASH_KILL_GRACE_S only
        self._killed: set[str] = set()  # ranks this process killed because another rank died (not causes)

    def start(self) -> None:
        """Spawn both children; this process never imports torch. A model reference that names nothing loadable
        (`model_source.check_reference`, which also checks --quantize and --tensor-parallel against the model's
        shapes where its config is at hand) and a device or dtype name no machine runs (`device_names.check_names`)
        are refused here, before anything starts; the rest (a GGUF header, what this machine's torch supports, whether
        the model fits) is the executor's to find before it allocates anything: it writes one line to its error
        file, which `wait_ready` reports (ChildDied). A failure here stops what did start (the reaper, the runtime
        dir, MPS, a child) before it propagates, whatever the caller does."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        load = self.config.load
        with self.startup.phase("checks (model reference, device, dtype)"):
            # a path that names nothing, flags the model's shapes refuse: one line now, nothing started
            check_reference(load.model, load.load_format, load.quantize, load.quantize_group,
                            self.config.tensor_parallel)
            if self.config.draft_model is not None:
                check_reference(self.config.draft_model)
            gpu = gpu_requested(load.device)
            check_names(load.device, load.dtype, gpu)  # a device or dtype name no machine runs: one line now
            if load.tp_allreduce == "peer" and not gpu and self.config.tensor_parallel > 1:
                raise HybridrtError("--tp-allreduce peer needs GPU ranks (CPU ranks sum over gloo)")
        pipe_dir = self.runtime.subdir("mps-pipe")
        self._tell_reaper(f"mps {pipe_dir}")  # before it starts: it quits a daemon only where one answers there
        start = time.perf_counter()
        self.mps = MpsDaemon.start(self.config.mps, pipe_dir, self.runtime.subdir("mps-log"), gpu,
                                   gpu_ranks=self.config.tensor_parallel)
        if self.mps.running:
            self.startup.add("MPS daemon", time.perf_counter() - start)
        if gpu and not self.mps.running and load.progress:
            print(f"hybridrt: running without MPS ({self.mps.reason})", file=sys.stderr)
        env = {**os.environ, **self.mps.env(), SUPERVISOR_PID_ENV: str(os.getpid())}
        control = self.runtime.ipc_address("control")
        tp_port = free_port() if self.config.tensor_parallel > 1 else 0  # the ranks' rendezvous
        executor = executor_argv(self.config, control, self.error_file("graph_executor"), 0, tp_port)
        # Own session: a terminal Ctrl-C reaches only this process, which stops the children in order (and
        # `hybridrt chat` can cancel a reply without its server dying of the same SIGINT).
        self.children["graph_executor"] = executor_proc = subprocess.Popen(executor, env=env, start_new_session=True)
        self._tell_reaper(f"child {executor_proc.pid}", f"segments {segment_dir()} hybridrt-{executor_proc.pid}-")
        for rank in range(1, self.config.tensor_parallel):  # the other ranks: rank 0 relays every step to them
            name = f"graph_executor rank {rank}"
            argv = executor_argv(self.config, control, self.error_file(name), rank, tp_port)
            self.children[name] = proc = subprocess.Popen(argv, env=env, start_new_session=True)
            self._tell_reaper(f"child {proc.pid}")
        local = self.runtime.socket_path("local") if self.config.local_stream else None
        jit = jit_argv(self.config, control, self.address, executor_proc.pid, self.error_file("jit_context"), gpu,
                       local, self._address_file)
        jit_env = {k: v for k, v in env.items() if k != SERVER_API_KEY_ENV}
        if self.config.api_key is not None:
            jit_env[SERVER_API_KEY_ENV] = self.config.api_key
        self.children["jit_context"] = subprocess.Popen(jit, env=jit_env, start_new_session=True)
        self._tell_reaper(f"child {self.children['jit_context'].pid}")

    def wait_ready(self, stop: threading.Event | None = None) -> dict:
        """The server's facts once it answers a status request. Raises ChildDied when a child exits first,
        StopRequested when `stop` is set first (`serve`'s SIGTERM while the model loads), HybridrtError past
        `ready_timeout_s`."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        late = f"the server was not ready within {self.config.ready_timeout_s:.0f} s"
        from launch.client import Client, ServerError  # here: ZeroMQ's import comes after the children's spawn

        def check() -> None:
            if stop is not None and stop.is_set():
                raise StopRequested("stopped before the server was ready")
            self.check_children()

        if self._address_file is not None:  # the port is known once the JIT context has bound it
            while not self._address_file.exists():
                check()
                if time.monotonic() > deadline:
                    raise HybridrtError(late)
                time.sleep(0.02)
            self.address = self._address_file.read_text()
        with Client(self.address, api_key=self.config.api_key) as client:
            while time.monotonic() < deadline:
                check()
                try:
                    self.ready_facts = client.status(timeout_s=0.5)
                    self.ready_seconds = time.perf_counter() - self.started_at
                    return self.ready_facts
                except ServerError:
                    continue
        raise HybridrtError(late)

    def check_children(self) -> None:
        # Name every child that has exited: when one dies its peer soon exits by itself, and reporting only the
        # first in order could blame the peer ("graph_executor exited with code 0") and hide the cause.
        if not any(proc.poll() is not None for proc in self.children.values()):
            return
        self._end_the_other_ranks()
        # The survivor notices within ~50 ms, answers its clients (executor_died) and exits; terminating it at
        # once could cut those answers off and leave the clients waiting for their own time-outs.
        deadline = time.monotonic() + PEER_EXIT_GRACE_S
        while any(proc.poll() is None for proc in self.children.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        exited = [(name, proc.poll()) for name, proc in self.children.items() if proc.poll() is not None]
        if exited:
            self._crashed = True
            raise ChildDied(self._cause(dict(exited)))

    def _end_the_other_ranks(self) -> None:
        """A tensor-parallel rank > 0 died on its own (not exit 0, nor 3: "another rank is gone"): kill the other
        executor ranks at once. They cannot go on without it, and on GPUs they may not notice soon: a rank's GPU
        waits in a captured NCCL collective for the dead one, and rank 0 finds out only at its next relay. The JIT
        context then sees the executor gone and answers its clients (executor_died) as after any executor death."""
        dead = [name for name, proc in self.children.items()
                if name.startswith("graph_executor rank ") and proc.poll() not in (None, 0, 3)]
        if not dead:
            return
        for name, proc in self.children.items():
            if name.startswith("graph_executor") and proc.poll() is None:
                proc.kill()
                self._killed.add(name)

    def error_file(self, child: str) -> Path:
        """Where a child writes its fatal one-line error (`ipc.errors.report_fatal`)."""
        return self.runtime.path / f"{child.replace(' ', '-')}.error"

    def _cause(self, exited: dict[str, int]) -> str:
        """The one line that says why the server ended: the executor's own error (the JIT context fails after it),
        else the JIT context's while the executor ended cleanly (it leaves when its peer does), else which process
        exited how (a signal, a crash without a word)."""
        said = {}
        for name in self.children.keys() | {"graph_executor", "jit_context"}:
            try:
                said[name] = self.error_file(name).read_text().strip()
            except OSError:
                said[name] = ""
        ranks = [name for name in self.children if name.startswith("graph_executor rank ")]
        # A tensor-parallel rank that died first: it is the cause, and rank 0's line only says that a rank is gone.
        # (exit 3: a rank that found another gone, rank 0 included: a consequence, not the cause)
        gone = [name for name in ranks if name in exited and exited[name] not in (0, 3) and name not in self._killed]
        if gone:
            return "; ".join(dict.fromkeys(said[name] or _describe_exit(name, exited[name]) for name in gone))
        if said["graph_executor"]:
            return said["graph_executor"]
        if said["jit_context"] and exited.get("graph_executor") in (None, 0):
            return said["jit_context"]
        return "; ".join(_describe_exit(name, code) for name, code in exited.items())

    def watch(self, poll_s: float = 0.2) -> None:
        """Block until a child exits (raises ChildDied)."""
        while True:
            self.check_children()
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop both children (the JIT context answers its clients first), then clean up; idempotent."""
        with self._stop_lock:
            if not self._stopped:
                self._stop()
                self._stopped = True

    def _stop(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        start = time.monotonic()
        for name, proc in self.children.items():
            grace = CRASH_KILL_GRACE_S if self._crashed and name.startswith("graph_executor") else STOP_GRACE_S
            try:
                proc.wait(timeout=max(0.1, start + grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._remove_leftover_segments()
        if self.mps is not None:
            self.mps.stop()
        self.runtime.close()
        self._tell_reaper("done")
        _close_reaper(self.reaper)

    def _tell_reaper(self, *lines: str) -> None:
        if self.reaper is None or self.reaper.stdin.closed:
            return
        try:
            self.reaper.stdin.write("".join(line + "\n" for line in lines))
            self.reaper.stdin.flush()
        except OSError:  # the reaper is gone (killed with us by a process-group signal): nothing to tell
            pass

    def _remove_leftover_segments(self) -> None:
        """Segments of an executor that was killed before it could unlink them."""
        executor = self.children.get("graph_executor")
        if executor is None:
            return
        for path in Path(segment_dir()).glob(f"hybridrt-{executor.pid}-*"):
            path.unlink(missing_ok=True)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _start_reaper() -> subprocess.Popen | None:
    try:
        # Its own session: a terminal's Ctrl-C or a signal to our process group can't take it with us.
        return subprocess.Popen([sys.executable, "-m", "launch.reaper"], stdin=subprocess.PIPE, text=True,
                                start_new_session=True, stdout=subprocess.DEVNULL)
    except OSError as e:
        print(f"hybridrt: no reaper ({e}); a killed supervisor may leave its runtime directory", file=sys.stderr)
        return None


def _close_reaper(reaper: subprocess.Popen | None) -> None:
    """Close our end of its pipe; it exits at once (after `done`) or cleans up (without), then is reaped."""
    if reaper is None:
        return
    try:
        reaper.stdin.close()
    except OSError:
        pass
    try:
        reaper.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


