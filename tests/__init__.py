"""uptrain's test suite, one folder per room of the package (io, conversion, data, training, evaluation)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository: configs/ and docs/ the tests read."""
