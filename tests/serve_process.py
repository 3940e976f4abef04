"""A real `hybridrt serve` process for runtime tests: free ports, wait for ready, stop and check cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ipc.free_port import free_port  # noqa: F401 - the tests import it from here
from ipc.liveness import process_alive
from ipc.runtime_dir import default_base
from launch.client import Client, ServerError


def child_pids(pid: int) -> list[int]:
    """Direct children of pid, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("hybridrt-*")}


class ServeProcess:
    """`hybridrt serve` on free ports; `.address` (native), `.http` (base URL, if enabled)."""

    def __init__(self, *extra: str, http: bool = True, model_flags: tuple[str, ...] = ("--device", "cpu"),
                 quiet: bool = True):
        self.port = free_port()
        self.http_port = free_port() if http else 0
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}" if http else None
        self.api_key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
        cmd = [sys.executable, "-m", "launch.cli", "serve", *(["--quiet"] if quiet else []), "--port", str(self.port),
               "--http-port", str(self.http_port), *model_flags, *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=os.environ.copy())

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with Client(self.address, api_key=self.api_key) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.proc.stderr.read()}")
                try:
                    facts = client.status(timeout_s=0.5)
                except ServerError:
                    continue
                if self.http is None or _port_open(self.http_port):
                    return facts
                time.sleep(0.1)
        raise TimeoutError("serve was not ready in time")

    def children(self) -> list[int]:
        return child_pids(self.proc.pid)

    def stop(self, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServeProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def assert_nothing_left(server: ServeProcess, executor_pid: int, jit_pid: int) -> None:
    """serve has exited: its children are gone, and so are their segments and the runtime directory."""
    assert server.proc.poll() is not None
    deadline = time.monotonic() + 5
    while any(process_alive(p) for p in (executor_pid, jit_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(executor_pid) and not process_alive(jit_pid)
    # Other servers (other tests, other users) may own segments too: only this executor's count.
    assert not [s for s in shm_segments() if s.startswith(f"hybridrt-{executor_pid}-")]
    assert not list(default_base().glob(f"hybridrt-{server.proc.pid}-*"))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
