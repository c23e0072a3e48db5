"""Benchmarks and experiments around uptrain, run from the repository root as modules: `python -m scripts.NAME`."""
