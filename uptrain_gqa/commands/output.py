"""How every command hands out its result as JSON: `--json` alone prints it to stdout instead of the table,
`--json FILE` writes it to FILE (whole or not at all) beside the table. One convention for inspect, convert,
train, eval, plan and env."""

from __future__ import annotations

import json as jsonlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import is_stream, write_file

STDOUT = "-"
JsonOption = Annotated[str | None, {"nargs": "?", "const": STDOUT, "metavar": "FILE"}]
"""The `--json [FILE]` option of every command."""


def table_wanted(json: str | None) -> bool:
    """Whether the command prints its human-readable output (not when stdout carries the JSON)."""
    return json != STDOUT


def emit_json(result: Any, json: str | None) -> None:
    """Print or write `result` as `--json` asked (nothing when it was not given)."""
    if json is None:
        return
    text = jsonlib.dumps(result, indent=2, default=str) + "\n"
    if json == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_file(Path(json), text.encode(), "--json")


def check_json_target(json: str | None, flag: str = "--json") -> None:
    """Refuse, before any work, a --json FILE that cannot be written (a folder, a file for a parent, no
    permission); a FIFO or device is written into, a symlink refused when written (io.folders.write_file)."""
    if json is None or json == STDOUT:
        return
    path = Path(json)
    if is_stream(path):
        return
    if path.is_symlink():
        raise UptrainError(
            f"{flag} {path} is a symlink; uptrain replaces only regular files: choose another path (or give --json "
            "alone for stdout)"
        )
    if path.is_dir():
        raise UptrainError(f"{flag} {path} is a folder; give a file name like {path / 'result.json'}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UptrainError(f"{flag} {path}: {parent} is a file, not a folder; choose another file")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UptrainError(f"{flag} {path}: cannot write there (permission denied); choose another file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UptrainError(f"{flag} {path}: cannot write there ({e.strerror}); choose another file") from e
