"""The reaper: a tiny process (stdlib only, ~30 ms to start) that outlives a supervisor killed with SIGKILL
just long enough to clean up after it.

The supervisor starts it first, in its own session, and tells it on its stdin (a pipe only the supervisor
holds) what there is to clean, one line each:

    runtime <dir>         the runtime directory (ipc sockets, MPS pipe and log dirs)
    child <pid>           a runtime process (they stop by themselves on SIGTERM from PR_SET_PDEATHSIG)
    segments <dir> <prefix>   shared-memory segments of that child (a SIGKILLed child leaves them)
    mps <pipe dir>        an MPS daemon started for this server
    done                  the supervisor cleaned up itself: exit without touching anything

End of file without `done` means the supervisor died (the kernel closes its end of the pipe however it ends).
Then the reaper gives the children CHILD_GRACE_S to exit on their own SIGTERM (their clean-up, their clients'
error replies), SIGKILLs whoever is left, unlinks the segments, quits the MPS daemon and removes the runtime
directory, then exits. `python -m launch.reaper` is its command line.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from ipc.liveness import process_alive
from launch.mps import quit_daemon

CHILD_GRACE_S = 1.5  # SIGTERM (parent-death signal) to SIGKILL; the whole clean-up must end within 3 s
KILL_WAIT_S = 1.0
MPS_QUIT_TIMEOUT_S = 15.0


class Plan:
    def __init__(self) -> None:
        self.runtime: Path | None = None
        self.children: list[int] = []
        self.segments: list[tuple[Path, str]] = []
        self.mps_pipe: Path | None = None

    def add(self, line: str) -> bool:
        """Record one instruction; True on `done`."""
        verb, _, rest = line.strip().partition(" ")
        if verb == "done":
            return True
        if verb == "runtime":
            self.runtime = Path(rest)
        elif verb == "child":
            self.children.append(int(rest))
        elif verb == "segments":
            folder, _, prefix = rest.rpartition(" ")
            if prefix.startswith("hybridrt-"):  # never anything but our own segments
                self.segments.append((Path(folder), prefix))
        elif verb == "mps":
            self.mps_pipe = Path(rest)
        return False

    def clean(self) -> None:
        _wait_gone(self.children, CHILD_GRACE_S)
        for pid in self.children:
            if process_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _wait_gone(self.children, KILL_WAIT_S)
        for folder, prefix in self.segments:
            for path in folder.glob(f"{prefix}*"):
                path.unlink(missing_ok=True)
        if self.mps_pipe is not None and (self.mps_pipe / "control").exists():
            quit_daemon(self.mps_pipe, self.mps_pipe.parent / "mps-log", MPS_QUIT_TIMEOUT_S)
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)


def _wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    plan = Plan()
    for line in sys.stdin:
        try:
            if plan.add(line):
                return 0
        except ValueError:
            continue
    plan.clean()
    return 0


if __name__ == "__main__":
    sys.exit(main())
