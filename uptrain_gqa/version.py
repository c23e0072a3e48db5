"""The version of uptrain, read by the package metadata, the CLI and every record uptrain writes."""

__version__ = "0.2.0"

DISTRIBUTION = "uptrain-gqa"
"""The distribution's name; the import package is `uptrain_gqa` and the command `uptrain` (PyPI's `uptrain` is an
unrelated project that installs a top-level `uptrain` package, so uptrain never uses that name for code)."""


def install_hint(extra: str) -> str:
    """What to run for an optional feature: the packages the installed distribution lists for `extra` (e.g.
    pip install 'lm_eval[hf]>=0.4.5'), which work whether uptrain came from a clone or a wheel."""
    import importlib.metadata
    import shlex

    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        requires = []
    marker = f'extra == "{extra}"'
    wanted = [r.split(";")[0].strip() for r in requires if marker in r.replace("'", '"')]
    if wanted:
        return "pip install " + " ".join(shlex.quote(w) for w in wanted)
    return f"pip install -e '.[{extra}]' in uptrain's clone"
