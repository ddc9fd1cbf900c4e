"""Benchmarks. Run with ``make bench`` (``python -m benches``)."""
