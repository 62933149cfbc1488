"""Benchmarks, run from the repository root as modules: `.venv/bin/python -m bench.<name> --help`.
Raw results are under bench/results/; BENCHMARKS.md holds the current numbers."""
