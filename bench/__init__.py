"""Benchmark harness: `python -m bench [workloads...]` (see bench/README.md)."""
