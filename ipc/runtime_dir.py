"""Owns the private per-launch runtime directory: a fresh 0700 folder for ipc:// sockets and pipe dirs.

Each launch gets its own directory (hybridrt-<pid>-<random>), so two instances never share a socket name,
and only this user can reach the sockets inside it. Only the process that created it removes it (a forked
child that inherits the object does not).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def default_base() -> Path:
    """$XDG_RUNTIME_DIR (per-user, tmpfs) when usable, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg)
    return Path(tempfile.gettempdir())


def _remove_tree(path: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"runtime name {name!r} must be 1-64 of [A-Za-z0-9_.-]")


class RuntimeDir:
    """A private directory that lives until `close()`, the end of its `with` block, or interpreter exit."""

    def __init__(self, base: str | os.PathLike | None = None):
        parent = Path(base) if base is not None else default_base()
        # mkdtemp creates the directory 0700 with a random suffix, failing rather than reusing a name.
        self._path = Path(tempfile.mkdtemp(prefix=f"hybridrt-{os.getpid()}-", dir=parent))
        self._finalizer = weakref.finalize(self, _remove_tree, self._path, os.getpid())

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def ipc_address(self, name: str) -> str:
        """A ZeroMQ address for a Unix socket `name`.sock inside this directory."""
        return f"ipc://{self.socket_path(name)}"

    def socket_path(self, name: str) -> Path:
        """The path of a Unix socket `name`.sock inside this directory (checked against sun_path's length)."""
        self._check_open()
        _check_name(name)
        socket_path = self._path / f"{name}.sock"
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(
                f"socket path {socket_path} is longer than {MAX_SOCKET_PATH_BYTES} bytes; "
                "use a shorter base directory (XDG_RUNTIME_DIR or TMPDIR)"
            )
        return socket_path

    def subdir(self, name: str) -> Path:
        """A private 0700 subdirectory (e.g. CUDA_MPS_PIPE_DIRECTORY), created if missing."""
        self._check_open()
        _check_name(name)
        path = self._path / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def close(self) -> None:
        """Remove the directory and everything in it; idempotent."""
        self._finalizer()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"runtime directory {self._path} is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RuntimeDir({str(self._path)!r}{', closed' if self.closed else ''})"


def segment_dir() -> Path:
    """Where CPU shared-memory segments live (ipc/shared_tensor.py): /dev/shm (tmpfs) on Linux, else the temp dir
    (page cache, still shared)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
