"""Driver for Nsight Compute: each decode projection's kernel of LLaMA-2-7B's shapes launched a few times outside a
graph (one weight per projection), so that `ncu` reads the hardware counters of exactly those launches; then
`--table CSV` turns ncu's CSV into a markdown table (time, DRAM throughput, occupancy, issue activity, the top warp
stall reasons per issued instruction).

    ncu --clock-control none --csv --kernel-name regex:'splitk|gemv' --metrics "$(python -m bench.probes.ncu_gemv
        --metrics)" python -m bench.probes.ncu_gemv --formats int4,fp16 > ncu.csv
    python -m bench.probes.ncu_gemv --table ncu.csv

Run on the card (the `ncu` step of tools/device_session.sh); on a machine without a GPU only --metrics and --table
work.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections import defaultdict
from pathlib import Path

STALLS = ("long_scoreboard", "short_scoreboard", "barrier", "membar", "wait", "math_pipe_throttle", "lg_throttle",
          "mio_throttle", "no_instruction", "not_selected", "selected", "dispatch_stall", "drain", "branch_resolving",
          "imc_miss", "tex_throttle", "sleeping", "misc")
METRICS = ("gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
           "dram__bytes_read.sum.per_second", "sm__warps_active.avg.pct_of_peak_sustained_active",
           "sm__maximum_warps_per_active_cycle_pct", "smsp__issue_active.avg.pct_of_peak_sustained_active",
           "smsp__inst_executed.sum", "launch__registers_per_thread", "launch__grid_size",
           *(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio" for s in STALLS))


def launch(formats: list[str], reps: int) -> None:
    import torch

    from bench.probes.lowbit_gemv import SHAPES, _make, _op, step_vectors
    from graph_executor.fused_decoder import INT4_PLAN, INT8_PLAN
    from graph_executor.kernels.decode_plan import DEFAULT_PLAN
    from graph_executor.kernels.gemv_splitk import SplitKScratch

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    vecs = step_vectors(dev, g)
    for fmt in formats:
        for name, (n, k) in SHAPES.items():
            w = _make(fmt, torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02)
            plan = {"int4": INT4_PLAN, "int8": INT8_PLAN}.get(fmt)
            cfg = getattr(plan, name) if plan is not None else getattr(DEFAULT_PLAN, name)
            scratch = SplitKScratch.allocate([w], [cfg], dev) if plan is not None else None
            op = _op(name, w, vecs, cfg, scratch)
            torch.cuda.synchronize()
            print(f"launching {fmt} {name} x{reps}", flush=True)
            for _ in range(reps):
                op()
            torch.cuda.synchronize()
            del w


def table(path: Path, order: list[str]) -> str:
    """ncu's --csv output (one row per kernel and metric) -> one markdown row per launch, in launch order; `order`
    labels the launches (format and projection, repeated per rep)."""
    text = path.read_text()
    start = text.find('"ID"')
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    by_id: dict[str, dict[str, float]] = defaultdict(dict)
    names: dict[str, str] = {}
    for r in rows:
        try:
            by_id[r["ID"]][r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        names[r["ID"]] = r["Kernel Name"][:28]
    out = ["| launch | kernel | us | DRAM % peak | read TB/s | occupancy % (theor.) | issue active % | inst | regs | "
           "grid | top stalls (per issue) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, (kid, m) in enumerate(sorted(by_id.items(), key=lambda kv: int(kv[0]))):
        stalls = sorted(((s, m.get(f"smsp__average_warps_issue_stalled_{s}_per_issue_active.ratio", 0.0))
                         for s in STALLS), key=lambda kv: -kv[1])[:4]
        label = order[n] if n < len(order) else "?"
        out.append(f"| {label} | {names[kid]} | {m.get('gpu__time_duration.sum', 0) / 1e3:.1f} | "
                   f"{m.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', 0):.0f} | "
                   f"{m.get('dram__bytes_read.sum.per_second', 0) / 1e12:.2f} | "
                   f"{m.get('sm__warps_active.avg.pct_of_peak_sustained_active', 0):.0f} "
                   f"({m.get('sm__maximum_warps_per_active_cycle_pct', 0):.0f}) | "
                   f"{m.get('smsp__issue_active.avg.pct_of_peak_sustained_active', 0):.0f} | "
                   f"{m.get('smsp__inst_executed.sum', 0):.3g} | {m.get('launch__registers_per_thread', 0):.0f} | "
                   f"{m.get('launch__grid_size', 0):.0f} | " + ", ".join(f"{s} {v:.1f}" for s, v in stalls) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,fp16", help="comma list of fp16, int8, int4, fp8")
    ap.add_argument("--reps", type=int, default=2, help="launches per projection")
    ap.add_argument("--metrics", action="store_true", help="print the comma-separated metric list for ncu and exit")
    ap.add_argument("--table", type=Path, default=None, help="ncu --csv output to turn into a markdown table")
    args = ap.parse_args(argv)
    formats = args.formats.split(",")
    if args.metrics:
        print(",".join(METRICS))
    elif args.table:
        from bench.probes.lowbit_gemv import SHAPES

        print(table(args.table, [f"{f} {s}" for f in formats for s in SHAPES for _ in range(args.reps)]))
    else:
        launch(formats, args.reps)


if __name__ == "__main__":
    main()
