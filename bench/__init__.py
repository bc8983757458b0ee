"""Benchmarks of dockmirror against its peers; run ``python -m bench --help``."""
