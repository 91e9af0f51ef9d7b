"""Throughput benchmarks (JSON output); never part of the tests. See benchmarks/README.md."""
