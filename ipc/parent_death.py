"""Children that never outlive their supervisor: `prctl(PR_SET_PDEATHSIG)` through ctypes.

The supervisor puts its pid in the child's environment (`HYBRIDRT_SUPERVISOR_PID`); the child calls
`exit_with_parent()` first thing, before its slow imports (torch takes seconds), so a supervisor that dies at
any moment from then on takes the child with it. The kernel then sends the child SIGTERM, whose handler runs
the child's clean-up (unlink shared memory, answer clients, close sockets).

Two limits, both covered elsewhere: the kernel sends the signal when the *thread* that forked the child exits
(the supervisor starts its children from its main thread), and it is Linux-only (elsewhere this is a no-op and
the children's liveness watch of the supervisor's pid, a poll every 100 ms, is what stops them). What the
children can't clean up themselves (the runtime directory, the MPS daemon, the segments of a child killed
with SIGKILL) is the reaper's job: `launch/reaper.py`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

SUPERVISOR_PID_ENV = "HYBRIDRT_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (thread) dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols (libc's prctl among them): `ctypes.util.find_library` would run `ldconfig -p`
        # in a subprocess first, ~30-50 ms at the start of every child, before its imports.
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(expected_parent: int | None = None, sig: int = signal.SIGTERM) -> bool:
    """Arm the parent-death signal for a child of the supervisor `expected_parent` (default: the pid in
    $HYBRIDRT_SUPERVISOR_PID; no-op without it, e.g. a process started by hand). If the parent has already
    gone (it died between our fork and this call, so the kernel will never signal us), `sig` is sent to this
    process now. True when armed."""
    if expected_parent is None:
        try:
            expected_parent = int(os.environ.get(SUPERVISOR_PID_ENV, ""))
        except ValueError:
            return False
    if not set_parent_death_signal(sig):
        return False
    if os.getppid() != expected_parent:  # reparented already: the supervisor is gone
        os.kill(os.getpid(), sig)
    return True
