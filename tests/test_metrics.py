"""Serving metrics: histogram bucketing, the per-request record, and the Prometheus text."""

from __future__ import annotations

import re

import pytest

from jit_context.metrics import Histogram, ServingMetrics
from launch.prometheus import render


def test_histogram_le_buckets() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):  # a value on a bound counts in that bound's bucket (le)
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.total == pytest.approx(4.65)


def test_record_and_render() -> None:
    m = ServingMetrics()
    m.record("length", 7, [20.0, 30.0, 45.0], 0.05)  # TTFT 20 ms, then gaps of 10 and 15 ms
    m.record("stop", 3, [5.0], 0.006, cached_prompt_tokens=2)
    m.record("error", 4, [], 0.001)
    snap = m.snapshot(running=1, waiting=2)
    assert (snap["prompt_tokens"], snap["generation_tokens"]) == (14, 4)
    assert snap["finished"] == {"length": 1, "stop": 1, "error": 1}
    text = render(snap, "tiny")
    samples = dict(re.findall(r"^(hybridrt:\S+) (\S+)$", text, re.MULTILINE))
    assert samples['hybridrt:num_requests_running{model_name="tiny"}'] == "1"
    assert samples['hybridrt:num_requests_waiting{model_name="tiny"}'] == "2"
    assert samples['hybridrt:request_success_total{model_name="tiny",finished_reason="stop"}'] == "1"
    assert samples['hybridrt:generation_tokens_total{model_name="tiny"}'] == "4"
    assert samples['hybridrt:prefix_cache_hits_total{model_name="tiny"}'] == "2"
    ttft = 'hybridrt:time_to_first_token_seconds'
    assert samples[f'{ttft}_bucket{{model_name="tiny",le="0.005"}}'] == "1"  # 5 ms
    assert samples[f'{ttft}_bucket{{model_name="tiny",le="0.02"}}'] == "2"  # cumulative: 5 and 20 ms
    count = samples[f'{ttft}_count{{model_name="tiny"}}']
    assert samples[f'{ttft}_bucket{{model_name="tiny",le="+Inf"}}'] == count == "2"
    assert float(samples[f'{ttft}_sum{{model_name="tiny"}}']) == pytest.approx(0.025)
    assert samples['hybridrt:time_per_output_token_seconds_count{model_name="tiny"}'] == "2"
    assert samples['hybridrt:e2e_request_latency_seconds_count{model_name="tiny"}'] == "3"
    for line in text.splitlines():  # every line is a comment or `name{labels} number`
        assert line.startswith("# ") or re.fullmatch(r"hybridrt:[a-z0-9_]+(\{[^}]*\})? [0-9.e+-]+", line), line
