"""The experiments behind docs/results.md, each run as `python -m experiments.NAME`; tests import none of them."""
