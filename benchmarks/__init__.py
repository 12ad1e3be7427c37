"""Benchmark scripts (run from the repository root: `PYTHONPATH=. python benchmarks/<name>.py`).

`benchmarks.common` holds what several of them share.
"""
