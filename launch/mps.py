"""The CUDA MPS daemon for one server: its own pipe and log directories in the runtime dir, so it never
touches a system-wide daemon; started before the children, quit after them.

With MPS both processes' kernels share the GPU without context switches, which is what makes the
two-process hand-over free (DESIGN.md: +0.25 ms per token without it).

The daemon forks away from us (it is nobody's child), so no parent-death signal can reach it: if the
supervisor dies without stopping it, its reaper (`launch/reaper.py`) sends it `quit` through the same pipe
directory (`quit_daemon`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ipc.errors import HybridrtError

MODES = ("auto", "on", "off")


@dataclass
class MpsDaemon:
    pipe_dir: Path
    log_dir: Path
    running: bool = False
    reason: str = ""  # why it is not running, for the log

    def env(self) -> dict[str, str]:
        if not self.running:
            return {}
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    @classmethod
    def start(cls, mode: str, pipe_dir: Path, log_dir: Path, gpu: bool, gpu_ranks: int = 1) -> MpsDaemon:
        """`gpu_ranks`: executor ranks, one per GPU (tensor parallelism): `auto` leaves MPS off for more than one,
        where NCCL's peer transfers between the ranks' GPUs have not been run under an MPS daemon (`on` still
        starts it)."""
        if mode not in MODES:
            raise ValueError(f"--mps must be one of {MODES}, got {mode!r}")
        daemon = cls(pipe_dir, log_dir)
        if mode == "off":
            daemon.reason = "disabled by --mps off"
        elif mode == "auto" and gpu_ranks > 1:
            daemon.reason = f"{gpu_ranks} tensor-parallel ranks on separate GPUs (--mps on starts it)"
        elif not gpu:
            daemon.reason = "no GPU in use"
        elif shutil.which("nvidia-cuda-mps-control") is None:
            daemon.reason = "nvidia-cuda-mps-control not found"
        else:
            daemon._launch()
        if mode == "on" and not daemon.running:
            raise HybridrtError(f"MPS was requested (--mps on) but could not start: {daemon.reason}")
        return daemon

    def _launch(self) -> None:
        env = {**os.environ, **{"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
                                "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}}
        result = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, capture_output=True, text=True,
                                timeout=10)
        if result.returncode != 0:
            self.reason = f"nvidia-cuda-mps-control -d failed: {(result.stderr or result.stdout).strip()}"
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (self.pipe_dir / "control").exists():
            time.sleep(0.05)
        self.running = (self.pipe_dir / "control").exists()
        self.reason = "" if self.running else "the MPS control pipe did not appear"

    def stop(self) -> None:
        if not self.running:
            return
        quit_daemon(self.pipe_dir, self.log_dir)
        self.running = False


def quit_daemon(pipe_dir: Path, log_dir: Path, timeout_s: float = 15.0) -> None:
    """Tell the MPS daemon of `pipe_dir` to quit (it stops its server once the clients are gone)."""
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(log_dir)}
    try:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=env, capture_output=True, text=True,
                       timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        pass
