"""Benchmarks: speed and memory of uptrain against a baseline measured in the same run (`python -m benchmarks.NAME`)."""
