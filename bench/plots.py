"""PNG plots of one run (matplotlib, Agg backend, no display): TTFT vs prompt length per engine, per-token
latency vs context with P50-P99 bands, and the CDF of per-token latency. Importing this module raises
ImportError where matplotlib is missing; the harness then skips the plots with a warning.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, works on a headless GPU box
import matplotlib.pyplot as plt

from bench.stats import measured


def _title(results: dict, what: str) -> str:
    return f"{what}\n{results['spec']['model']} {results['spec']['dtype']}, {results['env']['card']}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ttft_plot(results: dict, path: Path) -> Path | None:
    engines = {n: r["ttft"] for n, r in results["engines"].items() if measured(r, "ttft")}
    if not engines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ttft in engines.items():
        lens = sorted(ttft, key=int)
        x = [int(n) for n in lens]
        ax.plot(x, [ttft[n]["median_ms"] for n in lens], marker="o", label=name)
        ax.fill_between(x, [ttft[n]["min_ms"] for n in lens], [ttft[n]["p99_ms"] for n in lens], alpha=0.2)
    floor = (results.get("floors") or {}).get("prefill_ms")
    if floor:
        ax.plot([int(n) for n in floor], list(floor.values()), "k--", label="prefill floor")
    ax.set(xlabel="prompt tokens", ylabel="TTFT (ms): median, band min-P99",
           title=_title(results, "Time to first token"))
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(fig, path)


def context_plot(results: dict, path: Path) -> Path | None:
    engines = {n: r["context"] for n, r in results["engines"].items() if measured(r, "context")}
    if not engines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ctx in engines.items():
        cs = sorted(ctx, key=int)
        x = [int(c) for c in cs]
        (line,) = ax.plot(x, [ctx[c]["p50_ms"] for c in cs], marker="o", label=f"{name} P50")
        ax.fill_between(x, [ctx[c]["p50_ms"] for c in cs], [ctx[c]["p99_ms"] for c in cs],
                        color=line.get_color(), alpha=0.2)
    floor = (results.get("floors") or {}).get("decode_ms")
    if floor:
        ax.plot([int(c) for c in floor], list(floor.values()), "k--", label="decode floor")
    # Log scale: engines an order of magnitude apart (eager vs graphs) stay readable on one plot.
    ax.set(xlabel="context (tokens)", ylabel="per-token latency (ms), band P50-P99", yscale="log",
           title=_title(results, "Per-token latency vs context"))
    ax.legend()
    return _save(fig, path)


def cdf_plot(results: dict, path: Path) -> Path | None:
    engines = {n: r["decode"]["gaps_ms"] for n, r in results["engines"].items() if measured(r, "decode")}
    if not engines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, gaps in engines.items():
        xs = sorted(gaps)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
    floors = results.get("floors") or {}
    floor = floors.get("decode_ms", {}).get(str(floors.get("decode_context")))
    if floor:
        ax.axvline(floor, color="k", linestyle="--", label="decode floor")
    ax.set(xlabel="per-token latency (ms)", ylabel="fraction of tokens", xscale="log",
           title=_title(results, f"CDF of per-token latency ({results['spec']['decode_tokens']} tokens)"))
    ax.legend()
    return _save(fig, path)


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    made = [ttft_plot(results, out_dir / "ttft.png"), context_plot(results, out_dir / "context.png"),
            cdf_plot(results, out_dir / "decode_cdf.png")]
    return [p for p in made if p is not None]
