"""Figures side by side: each engine's headline figures, the floors for the same workloads, every ratio
(engine / floor, ours / each peer; below 1 means the numerator is faster), and the two-process overhead
(hybridrt end to end minus hybridrt-executor).
"""

from __future__ import annotations

from bench.floors import floors
from bench.model_info import ModelCost
from bench.spec import OURS, PEERS, BenchSpec
from bench.stats import measured, sig


def headline(result: dict) -> dict:
    """{"ttft": {n: median ms}, "decode_p50": ms, "context_p50": {c: ms}}, whatever the engine measured."""
    out: dict = {}
    if measured(result, "ttft"):
        out["ttft"] = {n: s["median_ms"] for n, s in result["ttft"].items()}
    if measured(result, "decode"):
        out["decode_p50"] = result["decode"]["p50_ms"]
    if measured(result, "context"):
        out["context_p50"] = {c: s["p50_ms"] for c, s in result["context"].items()}
    return out


def floor_headline(floor: dict, spec: BenchSpec) -> dict:
    return {"ttft": dict(floor["prefill_ms"]), "decode_p50": floor["decode_ms"][str(floor["decode_context"])],
            "context_p50": {str(c): floor["decode_ms"][str(c)] for c in spec.contexts}}


def combine(a: dict, b: dict, op) -> dict:
    """op(a, b) over the figures both have (same nesting as `headline`)."""
    out: dict = {}
    for key in (k for k in a if k in b):
        if isinstance(a[key], dict):
            inner = {k: op(v, b[key][k]) for k, v in a[key].items() if k in b[key]}
            if inner:
                out[key] = inner
        else:
            out[key] = op(a[key], b[key])
    return out


def ratio(x: float, y: float) -> float | None:
    return sig(x / y) if y else None


def difference(x: float, y: float) -> float:
    return round(x - y, 3)


def analyze(spec: BenchSpec, cost: ModelCost, floors_result: dict | None, engines: dict[str, dict]) -> dict:
    heads = {name: headline(r) for name, r in engines.items()}
    out: dict = {"floors": None, "ratios": {"vs_floor": {}, "vs_peer": {}}, "overhead": None}
    if floors_result is not None:
        if "measured" in floors_result:
            out["floors"] = {"status": floors_result["status"],
                             **floors(floors_result["measured"], cost, spec)}
            floor_head = floor_headline(out["floors"], spec)
            out["ratios"]["vs_floor"] = {n: combine(h, floor_head, ratio) for n, h in heads.items() if h}
        else:
            out["floors"] = {k: floors_result.get(k) for k in ("status", "error")}
    for ours in OURS:
        for peer in PEERS:
            if heads.get(ours) and heads.get(peer):
                out["ratios"]["vs_peer"][f"{ours}/{peer}"] = combine(heads[ours], heads[peer], ratio)
    if "overhead" in spec.workloads:
        e2e, local = heads.get("hybridrt"), heads.get("hybridrt-executor")
        out["overhead"] = (combine(e2e, local, difference) if e2e and local else
                           {"note": "needs figures from both hybridrt and hybridrt-executor"})
    return out
