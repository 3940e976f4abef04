"""Benchmark harness and peer baselines."""
