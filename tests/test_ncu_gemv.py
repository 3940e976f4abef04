"""bench.probes.ncu_gemv's table from Nsight Compute's CSV (the card's `ncu` step): one row per launch in launch
order, metrics with thousands separators, the top stall reasons sorted; the program's own output before the CSV is
skipped."""

from __future__ import annotations

from bench.probes.ncu_gemv import METRICS, table

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(kid: int, metric: str, value: str, kernel: str = "_splitk_kernel") -> str:
    return (f'"{kid}","1","python3","h","{kernel}","1","7","(128, 1, 1)","(384, 8, 1)","0","9.0",'
            f'"Command line profiler metrics","{metric}","","{value}"')


def test_the_table_has_a_row_per_launch_in_order(tmp_path) -> None:
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    lines = ["launching int4 o x2", "==PROF== Connected", HEADER,
             row(1, "gpu__time_duration.sum", "7,800"), row(1, "dram__throughput.avg.pct_of_peak_sustained_elapsed",
                                                           "28.4"),
             row(1, stall.format("barrier"), "3.9"), row(1, stall.format("long_scoreboard"), "6.6"),
             row(0, "gpu__time_duration.sum", "16,700", "_gemv_residual_kernel"),
             row(0, "launch__registers_per_thread", "64", "_gemv_residual_kernel")]
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(lines) + "\n")
    out = table(path, ["first", "second"]).splitlines()
    assert out[0].startswith("| launch | kernel | us |") and len(out) == 4
    assert out[2].startswith("| first | _gemv_residual_kernel | 16.7 |") and "| 64 |" in out[2]
    assert out[3].startswith("| second | _splitk_kernel | 7.8 | 28 |")
    assert out[3].endswith("long_scoreboard 6.6, barrier 3.9, short_scoreboard 0.0, membar 0.0 |")
    assert all("__" in m for m in METRICS)  # full metric names (unit__counter...), as ncu --metrics takes them
