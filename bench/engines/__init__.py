"""The engines the harness times, one module each, every one behind `open_engine(spec, name, timeline)`:
hybridrt end to end (`hybridrt_e2e`), hybridrt's executor in process (`executor`), and HF transformers (`hf`).
`bench.run_engine` imports the one it runs, in its own process."""
