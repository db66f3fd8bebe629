"""Throughput benchmarks: local harvests against the simulator (`make bench`; not run in CI)."""
