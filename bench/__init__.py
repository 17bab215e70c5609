"""Benchmarks of megafusion's building blocks (run as ``python -m bench.<name>``; see bench/README.md)."""
