"""Where the executor's start-up goes after its imports (issue 13): the load, then the warm-up runs and captures of
the graphs a server captures before ready, under cProfile; prints each part's time and the top functions.

    python -m bench.probes.startup_profile --model /path/model.gguf [--device cuda] [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402

from graph_executor.graphs import GraphRunner  # noqa: E402
from graph_executor.loading.loader import LoadConfig, load_model  # noqa: E402
from ipc.startup import DEFAULT_READY_CAPTURE  # noqa: E402


def top(prof: cProfile.Profile, sort: str, n: int) -> str:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(n)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    from graph_executor.loading import cache

    cache.use_for_triton()  # the kernel cache a server uses: a second run profiles a warm start, as a server's is
    print(f"imports {time.perf_counter() - T0:.2f} s")
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    loaded = load_model(LoadConfig(model=args.model, device=args.device, progress=False))
    prof.disable()
    print(f"load {time.perf_counter() - start:.2f} s: " + ", ".join(f"{k} {v:.2f}" for k, v in loaded.phases.items()))
    print(top(prof, "cumulative", args.top))
    prof = cProfile.Profile()
    runner = GraphRunner(loaded.model)
    names = runner.startup_graphs(DEFAULT_READY_CAPTURE)
    start = time.perf_counter()
    prof.enable()
    for name in names:
        runner.capture(name)
    prof.disable()
    torch.cuda.synchronize()
    print(f"warm-up and capture of {len(names)} graphs {time.perf_counter() - start:.2f} s: "
          + ", ".join(f"{n} {runner.stats.warmup_seconds[n]:.2f}/{runner.stats.seconds[n]:.2f}" for n in names))
    print(top(prof, "cumulative", args.top))
    print(top(prof, "tottime", args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
