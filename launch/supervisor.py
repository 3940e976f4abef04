"""The supervisor: starts the graph executor and JIT context processes, waits for ready, watches them, and
stops them (and cleans their shared memory) however they end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from graph_executor.device import resolve_device
from graph_executor.loading.loader import LoadConfig, check_load_config
from ipc.errors import HybridrtError
from ipc.runtime_dir import RuntimeDir
from ipc.shared_tensor import segment_dir
from launch.client import Client, ServerError
from launch.mps import MpsDaemon

STOP_GRACE_S = 5.0
PEER_EXIT_GRACE_S = 2.0  # once one child died, the other gets this long to tell its clients and exit by itself


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

    def __post_init__(self) -> None:
        if self.ready_timeout_s <= 0:
            raise ValueError("ready_timeout_s must be > 0")


def _describe_exit(name: str, code: int) -> str:
    if code < 0:
        return f"{name} was killed by {signal.Signals(-code).name}"
    return f"{name} exited with code {code}"


class Supervisor:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.runtime = RuntimeDir()
        self.address = config.listen or self.runtime.ipc_address("client")
        self.children: dict[str, subprocess.Popen] = {}
        self.ready_facts: dict = {}
        self.started_at = time.perf_counter()
        self.ready_seconds: float | None = None
        self.mps: MpsDaemon | None = None
        self._stop_lock = threading.Lock()  # stop() may come from the HTTP watcher thread and from the main one
        self._stopped = False

    def start(self) -> None:
        load = self.config.load
        check_load_config(load)  # bad input fails here, in one line, before any process starts
        gpu = resolve_device(load.device).type == "cuda"
        self.mps = MpsDaemon.start(self.config.mps, self.runtime.subdir("mps-pipe"), self.runtime.subdir("mps-log"),
                                   gpu)
        if gpu and not self.mps.running and load.progress:
            print(f"hybridrt: running without MPS ({self.mps.reason})", file=sys.stderr)
        env = {**os.environ, **self.mps.env()}
        control = self.runtime.ipc_address("control")
        executor = [sys.executable, "-m", "graph_executor", "--control", control, "--model", load.model,
                    "--load-format", load.load_format, "--device", load.device, "--dtype", load.dtype,
                    "--seed-weights", str(load.seed), "--supervisor-pid", str(os.getpid())]
        if load.max_context:
            executor += ["--max-context", str(load.max_context)]
        if not load.progress:
            executor.append("--quiet")
        # Own session: a terminal Ctrl-C reaches only this process, which stops the children in order (and
        # `hybridrt chat` can cancel a reply without its server dying of the same SIGINT).
        self.children["graph_executor"] = subprocess.Popen(executor, env=env, start_new_session=True)
        jit = [sys.executable, "-m", "jit_context", "--control", control, "--listen", self.address,
               "--executor-pid", str(self.children["graph_executor"].pid)]
        if self.config.tokenizer:
            jit += ["--tokenizer", self.config.tokenizer]
        if self.config.chat_template is not None:
            jit += ["--chat-template", self.config.chat_template]
        self.children["jit_context"] = subprocess.Popen(jit, env=env, start_new_session=True)

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + self.config.ready_timeout_s
        with Client(self.address) as client:
            while time.monotonic() < deadline:
                self.check_children()
                try:
                    self.ready_facts = client.status(timeout_s=0.5)
                    self.ready_seconds = time.perf_counter() - self.started_at
                    return self.ready_facts
                except ServerError:
                    continue
        raise HybridrtError(f"the server was not ready within {self.config.ready_timeout_s:.0f} s")

    def check_children(self) -> None:
        # Name every child that has exited: when one dies its peer soon exits by itself, and reporting only the
        # first in order could blame the peer ("graph_executor exited with code 0") and hide the cause.
        if not any(proc.poll() is not None for proc in self.children.values()):
            return
        # The survivor notices within ~50 ms, answers its clients (executor_died) and exits; terminating it at
        # once could cut those answers off and leave the clients waiting for their own time-outs.
        deadline = time.monotonic() + PEER_EXIT_GRACE_S
        while any(proc.poll() is None for proc in self.children.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        exited = [(name, proc.poll()) for name, proc in self.children.items() if proc.poll() is not None]
        if exited:
            raise ChildDied("; ".join(_describe_exit(name, code) for name, code in exited))

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
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.children.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._remove_leftover_segments()
        if self.mps is not None:
            self.mps.stop()
        self.runtime.close()

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
