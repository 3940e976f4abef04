"""The prefill / extend graphs' buckets (graph_executor/graphs.py): which bucket a prompt runs in."""

from __future__ import annotations

import pytest

from graph_executor.graphs import DEFAULT_BUCKETS, pick_bucket

BUCKETS = (16, 32, 64, 96, 128, 144, 160, 176, 192, 208, 224, 240, 256)


def test_an_uncaptured_smallest_bucket_is_taken_whatever_else_is_measured() -> None:
    assert pick_bucket(200, BUCKETS, {}) == 208
    assert pick_bucket(200, BUCKETS, {224: 1.0, 256: 0.5}) == 208  # runs eagerly; its graph is captured next


def test_a_larger_captured_bucket_that_replays_faster_is_taken() -> None:
    # cuBLAS at some row counts is slower than at larger ones (H200: 216 rows 7.18 ms, 224 6.68)
    measured = {208: 6.3, 224: 6.7, 240: 7.6, 256: 6.9}
    assert pick_bucket(200, BUCKETS, measured) == 208
    measured[208] = 7.2
    assert pick_bucket(200, BUCKETS, measured) == 224
    assert pick_bucket(225, BUCKETS, measured) == 256  # 240 measured slower than 256
    assert pick_bucket(241, BUCKETS, measured) == 256


def test_a_larger_bucket_must_be_faster_by_the_margin() -> None:
    # short prompts: every bucket reads the weights once, the timings differ by noise; the 16-row graph stays
    assert pick_bucket(10, BUCKETS, {16: 4.40, 32: 4.35, 64: 4.31}) == 16
    assert pick_bucket(10, BUCKETS, {16: 4.40, 32: 4.35, 64: 4.20}) == 64
    assert pick_bucket(10, BUCKETS, {16: 4.40, 32: 4.20, 64: 4.20}) == 32  # equal: the smaller
    assert pick_bucket(10, BUCKETS, {16: 4.40, 32: 4.20, 64: 4.20}, margin=0.1) == 16


def test_ties_go_to_the_smaller_bucket_and_no_bucket_is_smaller_than_the_prompt() -> None:
    measured = {b: 5.0 for b in BUCKETS}
    assert pick_bucket(100, BUCKETS, measured) == 128
    assert pick_bucket(16, BUCKETS, measured) == 16
    assert pick_bucket(1, BUCKETS, {16: 9.0, 32: 1.0}) == 32
    for n in range(1, 257):
        assert pick_bucket(n, BUCKETS, {b: 1000.0 / b for b in BUCKETS}) == 256  # larger always cheaper here


def test_a_prompt_past_the_largest_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="no bucket holds 257 rows"):
        pick_bucket(257, BUCKETS, {})


def test_the_default_buckets_are_every_32_rows_to_128_then_every_16_to_512() -> None:
    assert DEFAULT_BUCKETS[:5] == (16, 32, 64, 96, 128)
    assert list(DEFAULT_BUCKETS[5:]) == list(range(144, 513, 16))
    assert list(DEFAULT_BUCKETS) == sorted(set(DEFAULT_BUCKETS))
