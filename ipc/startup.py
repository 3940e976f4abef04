"""Start-up phases of a runtime process (imports, weights, graph capture, handshake, ...): one line each on stderr
as it ends (unless quiet), and their times in the process's facts, which `status` returns and the bench reports.

The supervisor passes each child the wall-clock time it spawned it (`--spawned-at`), so that the first phase,
"imports", covers the interpreter's start and the imports before `main` runs.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

# Prompt tokens whose prefill graphs (and the decode graph) the GPU executor captures before it is ready, so that
# the first requests after ready run at steady-state speed (issue 13); the rest are captured while idle.
DEFAULT_READY_CAPTURE = 128


@dataclass
class StartupPhases:
    process: str  # the line's prefix: graph_executor or jit_context
    quiet: bool = False
    spawned_at: float | None = None  # time.time() when the supervisor spawned this process
    phases: dict[str, float] = field(default_factory=dict)  # name -> seconds, in order
    ready_s: float | None = None  # seconds from spawn to ready (`ready`)

    def __post_init__(self) -> None:
        self._start = time.time() if self.spawned_at is None else self.spawned_at
        if self.spawned_at is not None:
            self.add("imports", time.time() - self.spawned_at)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = round(seconds, 3)
        if not self.quiet:
            print(f"{self.process}: {name} {seconds:.2f} s", file=sys.stderr, flush=True)

    def since_start(self) -> float:
        """Seconds since the process was spawned (or, without --spawned-at, since these phases began)."""
        return time.time() - self._start

    def ready(self) -> None:
        """The process is ready to serve: its time since spawn is kept (the first call counts)."""
        if self.ready_s is None:
            self.ready_s = round(self.since_start(), 3)

    def facts(self) -> dict:
        return {"phases_s": dict(self.phases), "ready_since_spawn_s": self.ready_s}
