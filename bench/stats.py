"""Summaries of latency samples: percentiles (linear interpolation, as numpy's default), TTFT and per-token."""

from __future__ import annotations

import itertools
import math


def percentile(values: list[float], q: float) -> float:
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def sig(x: float, digits: int = 4) -> float:
    """`digits` significant digits: ratios and rates keep their precision at any magnitude."""
    return float(f"{x:.{digits}g}")


def r3(x: float) -> float:
    """Milliseconds to the microsecond: enough for latency, keeps results.json small."""
    return round(x, 3)


def ttft_summary(samples_ms: list[float]) -> dict:
    return {"median_ms": r3(percentile(samples_ms, 50)), "p99_ms": r3(percentile(samples_ms, 99)),
            "min_ms": r3(min(samples_ms)), "samples_ms": [r3(x) for x in samples_ms]}


def gaps_ms(token_times_ms: list[float]) -> list[float]:
    """Host-visible gaps between consecutive tokens (times measured from the request start)."""
    return [b - a for a, b in itertools.pairwise(token_times_ms)]


def tokens_per_s(gaps: list[float]) -> float:
    """The rate that per-token gaps (ms) give: tokens over the time they span."""
    return 1e3 * len(gaps) / sum(gaps)


def token_summary(gaps: list[float], keep: bool = False) -> dict:
    """P50/P90/P99/max/mean of per-token gaps and the rate they give; `keep` stores every gap (for a CDF)."""
    out = {"p50_ms": r3(percentile(gaps, 50)), "p90_ms": r3(percentile(gaps, 90)),
           "p99_ms": r3(percentile(gaps, 99)), "max_ms": r3(max(gaps)),
           "mean_ms": r3(sum(gaps) / len(gaps)), "tokens_per_s": round(tokens_per_s(gaps), 2),
           "count": len(gaps)}
    if keep:
        out["gaps_ms"] = [r3(g) for g in gaps]
    return out


def measured(result: dict, workload: str) -> bool:
    """An engine's result holds this workload's figures (it ran it, and did not record a skip)."""
    return bool(result.get(workload)) and "skipped" not in result[workload]
