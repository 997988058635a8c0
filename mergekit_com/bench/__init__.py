"""Benchmarks: ``python -m mergekit_com.bench --preset tiny`` (quality of every method on a zoo)."""
