"""Facts about the machine and software a run measured on: card, driver, versions, git commit, free memory.

Read without creating a CUDA context in the parent process (nvidia-smi, /proc, package metadata), so the
engine processes get the whole card.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("graph_executor", "jit_context", "ipc", "launch", "bench")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    driver: str
    free_bytes: int
    total_bytes: int


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def physical_gpu_index(device: str) -> int:
    """nvidia-smi numbers physical GPUs; torch numbers those CUDA_VISIBLE_DEVICES lists."""
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and all(v.isdigit() for v in visible) and index < len(visible):
        return int(visible[index])
    return index


def gpu_info(device: str) -> GpuInfo | None:
    """None where nvidia-smi is missing or does not answer."""
    query = "name,driver_version,memory.free,memory.total"
    out = _run(["nvidia-smi", f"--id={physical_gpu_index(device)}", f"--query-gpu={query}",
                "--format=csv,noheader,nounits"])
    if not out:
        return None
    try:
        name, driver, free, total = [f.strip() for f in out.splitlines()[0].split(",")]
        return GpuInfo(name, driver, int(float(free)) * 1024**2, int(float(total)) * 1024**2)
    except ValueError:
        return None


def cpu_name() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        m = None
    return (m.group(1).strip() if m else platform.processor() or platform.machine()) + f" ({os.cpu_count()} cores)"


def card_slug(card: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; for a results folder name."""
    words = [w for w in re.split(r"[^a-z0-9]+", card.lower()) if w and w not in ("nvidia", "tesla", "geforce")]
    return words[0] if words else "gpu"


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest(root: Path = REPO_ROOT) -> str:
    """sha256 over the runtime's Python sources (relative path and bytes, in path order): identifies the code
    of a run made on a copy of the tree without `.git` (the GPU machine); recompute it at a commit to match."""
    digest = hashlib.sha256()
    for path in sorted(p for pkg in SOURCE_PACKAGES for p in (root / pkg).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_commit() -> dict:
    commit = _run(["git", "rev-parse", "HEAD"], REPO_ROOT)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "source_sha256": source_digest()}


def environment(device: str) -> dict:
    import torch

    gpu = gpu_info(device) if device.startswith("cuda") else None
    return {
        "card": gpu.name if gpu else ("cpu: " + cpu_name() if not device.startswith("cuda") else "unknown GPU"),
        "driver": gpu.driver if gpu else None,
        "gpu_memory_total_bytes": gpu.total_bytes if gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version("transformers"),
        "python": platform.python_version(), "git": git_commit(), "host_cpu": cpu_name(),
    }
