"""One-off measurements behind the design decisions (GPU probes, CPU splits, codec cost); each is a
`python -m bench.probes.<name>` and reuses the harness's floors, statistics and model cost."""
