"""The parent of a benchmark run: starts the floors and each engine in its own process, one after another
(they share the card), each with its own time limit, then writes results.json, results.md and the plots.

A failing or hung engine costs only its own figures: it is killed with its process group at its limit
(the end-to-end engine's server processes too), and whatever it had written so far is kept.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.analysis import analyze
from bench.envinfo import REPO_ROOT, environment
from bench.model_info import ModelCost, weight_plan
from bench.spec import BenchSpec

KILL_GRACE_S = 15.0  # time to unwind after SIGTERM: the e2e engine stops its server (5 s grace)
LOG_TAIL_CHARS = 1500


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group the child leads (it and whatever it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-LOG_TAIL_CHARS:].strip()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_child(name: str, spec: BenchSpec, spec_path: Path, work: Path, log_path: Path) -> dict:
    """Run `bench.run_engine` for `name`; always returns a result dict (status ok/skipped/error/timeout)."""
    result_path = work / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.run_engine", "--spec", str(spec_path), "--engine", name,
           "--result", str(result_path), "--t0", repr(time.time())]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        # Own session: the time limit can end the child's whole process tree, and nothing else.
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
        except BaseException:  # Ctrl-C: leave nothing running behind us
            _stop_group(proc)
            raise
    result = json.loads(result_path.read_text()) if result_path.exists() else {"engine": name}
    if timed_out:
        result.update(status="timeout", error=f"no result within {spec.timeout_s:g} s (figures measured "
                                              f"before the limit are kept)")
    elif result.get("status", "running") == "running":
        tail = _log_tail(log_path)
        result.update(status="error", log_tail=tail,
                      error=f"the engine process exited with code {proc.returncode}: {_last_line(tail)}")
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def run_bench(spec: BenchSpec, out_dir: Path, log: Callable[[str], None]) -> dict:
    """Run everything `spec` asks for into `out_dir`; returns the results dict (also in results.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    env = environment(spec.device)
    log(f"bench: {spec.model} {spec.dtype} on {env['card']}; results in {out_dir}")
    names = (["floors"] if "floors" in spec.workloads else []) + list(spec.engines)
    children: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hybridrt-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict()))
        for name in names:
            log(f"bench: {name} (time limit {spec.timeout_s:g} s) ...")
            children[name] = run_child(name, spec, spec_path, Path(tmp), out_dir / "logs" / f"{name}.log")
            r = children[name]
            log(f"bench: {name} {r['status']} in {r['wall_s']:.1f} s" + (f": {r['error']}" if "error" in r else ""))
    from graph_executor.loading.config import ModelConfig

    cost = ModelCost.of(ModelConfig.from_hf_dict(spec.model_config), spec.dtype, weight_plan(spec))
    floors_result = children.pop("floors", None)
    results = {
        "schema": "hybridrt-bench/1",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "env": env, "spec": spec.to_dict(), "model": {"name": spec.model, "dtype": spec.dtype, **cost.to_dict()},
        **analyze(spec, cost, floors_result, children),
        "engines": children,
    }
    write_outputs(results, out_dir, log)
    return results


def write_outputs(results: dict, out_dir: Path, log: Callable[[str], None]) -> None:
    from bench.report import markdown

    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    try:
        from bench.plots import write_plots
    except ImportError as e:  # matplotlib is optional
        log(f"bench: warning: no plots ({e})")
        return
    for path in write_plots(results, out_dir):
        log(f"bench: wrote {path}")
