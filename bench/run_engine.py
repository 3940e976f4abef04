"""One engine (or the floors) in its own process: the harness starts

    python -m bench.run_engine --spec SPEC.json --engine NAME --result RESULT.json --t0 SPAWN_TIME

It rewrites RESULT.json after every workload, so that if the harness kills it at its time limit the figures
measured so far survive. Exit status 0 whenever a result (ok, skipped or error) was written.
"""

from __future__ import annotations

import time

_STARTED = time.time()  # before the heavy imports: the startup timeline's "process started"

import argparse
import gc
import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

ENGINE_MODULES = {
    "hybridrt": "bench.engines.hybridrt_e2e",
    "hybridrt-http": "bench.engines.hybridrt_http",
    "hybridrt-executor": "bench.engines.executor",
    "hf-eager": "bench.engines.hf",
    "hf-compile": "bench.engines.hf",
}
FLOORS = "floors"


class ResultFile:
    """The engine's result dict, written atomically (rename) so a kill never leaves half a file."""

    def __init__(self, path: Path, engine: str) -> None:
        self.path = path
        self.data: dict = {"engine": engine, "status": "running"}

    def update(self, **fields) -> None:
        self.data.update(fields)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=_jsonable))
        os.replace(tmp, self.path)


def _jsonable(value) -> str:
    """Facts an engine passes through from elsewhere (a server's status) may hold bytes or objects."""
    return f"<{len(value)} bytes>" if isinstance(value, (bytes, bytearray)) else repr(value)


def run_workloads(name: str, spec, result: ResultFile, timeline) -> None:
    from bench.workloads import TIMED_WORKLOADS, EngineUnavailable

    module = importlib.import_module(ENGINE_MODULES[name])
    timeline.mark("imports_done")
    engine = module.open_engine(spec, name, timeline)
    # Every engine alike: objects made while loading are never scanned again, so a garbage collection of
    # the start-up heap cannot land inside a timed token gap (the servers do the same after start-up).
    gc.collect()
    gc.freeze()
    try:
        if "startup" in spec.workloads:
            result.update(startup=timeline.to_dict())
        for workload, fn in TIMED_WORKLOADS.items():
            if workload in spec.workloads:
                try:
                    result.update(**{workload: fn(engine, spec)})
                except EngineUnavailable as e:  # this engine does not run this workload; the others go on
                    result.update(**{workload: {"skipped": str(e)}})
        if "memory" in spec.workloads:
            result.update(memory=engine.memory())
        facts = engine.facts()
        result.update(facts=facts)
        if "startup" in spec.workloads:
            result.update(startup={**timeline.to_dict(), "graphs": facts.get("graphs", []),
                                   "phases": facts.get("startup_phases", {}),
                                   "first_requests": facts.get("first_requests")})
    finally:
        engine.close()


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run one benchmark engine (started by `hybridrt bench`)")
    ap.add_argument("--spec", required=True, type=Path)
    ap.add_argument("--engine", required=True, choices=[*ENGINE_MODULES, FLOORS])
    ap.add_argument("--result", required=True, type=Path)
    ap.add_argument("--t0", type=float, default=_STARTED, help="wall time the parent spawned this process")
    args = ap.parse_args(argv)

    from bench.procinfo import Timeline
    from bench.spec import BenchSpec
    from bench.workloads import EngineUnavailable

    # The harness ends a child over its time limit with SIGTERM: unwind (closing the engine, which stops the
    # end-to-end engine's server processes, in their own sessions) instead of dying on the spot.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    timeline = Timeline(args.t0)
    timeline.mark("process_started", at=_STARTED)
    result = ResultFile(args.result, args.engine)
    try:
        spec = BenchSpec.from_dict(json.loads(args.spec.read_text()))
        if args.engine == FLOORS:
            from bench.floors import measure

            result.update(measured=measure(spec))
        else:
            run_workloads(args.engine, spec, result, timeline)
        result.update(status="ok")
    except EngineUnavailable as e:
        result.update(status="skipped", error=str(e))
    except Exception as e:  # noqa: BLE001 - one engine's failure is a recorded result, never a lost run
        traceback.print_exc(file=sys.stderr)
        result.update(status="error", error=f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
