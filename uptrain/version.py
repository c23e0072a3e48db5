"""The version of uptrain, read by the package metadata, the CLI and every record uptrain writes."""

__version__ = "0.2.0"

DISTRIBUTION = "uptrain-gqa"
"""The name to `pip install` (the import package and the command are `uptrain`; the PyPI name
`uptrain` belongs to an unrelated project)."""


def install_hint(extra: str) -> str:
    """What to run for an optional feature, e.g. pip install 'uptrain-gqa[eval]'."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
