"""Launchers and developer tools around uptrain, run from the repository root (`python -m scripts.NAME`)."""
