"""Benchmarks (run with `make bench`); they print tables and assert nothing."""
