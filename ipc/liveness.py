"""Is a peer process still alive? Used by each process to notice that its peer died (SIGKILL included)."""

from __future__ import annotations

import os
from pathlib import Path


def process_alive(pid: int) -> bool:
    """False once `pid` has exited, including while it is a zombie not yet reaped by its parent."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # Field 3, after the parenthesised command name (which may itself contain spaces or parentheses).
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
