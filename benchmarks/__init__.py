"""Benchmark scripts: `python -m benchmarks.bench_<op>` from the repository root."""
