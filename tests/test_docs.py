"""The documentation: the site builds strictly (a broken link, anchor or page fails), and every `uptrain` command
written in README.md and docs/ parses against the real command line (no stale flag or subcommand)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tests import ROOT
from uptrain_gqa import config as configlib
from uptrain_gqa.cli import COMMANDS, build_parser
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.training.config import TrainConfig

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"^```(bash|sh|console|shell)\s*$")


@pytest.mark.integration
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "index.html").is_file()


def commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv after `uptrain`) of every uptrain command in the page's shell blocks (`$ uptrain ...` lines of
    any block), continuation lines joined, comments dropped."""
    out: list[tuple[int, list[str]]] = []
    shell = fence = False
    pending, start = "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            shell, fence = (bool(SHELL_BLOCK.match(line)), True) if not fence else (False, False)
            continue
        if not fence:
            continue
        text = pending + line.strip() if pending else line.strip()
        if text.endswith("\\"):
            pending, start = text[:-1] + " ", start or number
            continue
        pending, first = "", start or number
        start = 0
        text = text.removeprefix("$ ")
        if (shell or line.lstrip().startswith("$ ")) and text.startswith("uptrain "):
            out.append((first, shlex.split(text, comments=True)[1:]))
    return out


def _config_key(cls: type, key: str) -> bool:
    """`key` (dotted) names a field of the config dataclass `cls`."""
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        return False
    tp = typing.get_type_hints(cls)[head]
    return _config_key(tp, rest) if rest and dataclasses.is_dataclass(tp) else not rest


ALL = [(page, line, argv) for page in PAGES for line, argv in commands(page)]


def test_the_pages_hold_commands_to_check() -> None:
    assert len(ALL) >= 20 and {argv[0] for _, _, argv in ALL if argv} >= {"convert", "train", "eval", "plan"}


@pytest.mark.parametrize(("page", "line", "argv"), ALL, ids=[f"{p.name}:{n}" for p, n, _ in ALL])
def test_every_written_command_parses(page: Path, line: int, argv: list[str]) -> None:
    where = f"{page.relative_to(ROOT)}:{line}: uptrain {shlex.join(argv)}"
    if argv in (["--version"], ["--help"]):
        return
    assert argv and argv[0] in COMMANDS, where
    parser = build_parser()
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse refused it (a flag's value, a missing argument)
        if e.code != 0:
            raise AssertionError(f"{where}: argparse refused it") from None
        return  # --help
    collector = vars(namespace).get("_overrides")
    if collector is None:
        assert not unknown, f"{where}: unknown {unknown}"
        return
    config = TrainConfig if argv[0] == "train" else DataConfig
    for key in configlib.parse_overrides(unknown):
        key = key.removeprefix("data.") if config is DataConfig else key
        assert _config_key(config, key), f"{where}: no config key {key!r}"


def test_a_stale_command_is_caught() -> None:
    """The check can fail: a flag that does not exist, and a config key that does not."""
    for argv in (["convert", "A", "B", "--num-kv-heads", "2", "--methd", "svd"], ["train", "--optim.learning_rate=1"]):
        with pytest.raises((AssertionError, argparse.ArgumentError)):
            test_every_written_command_parses(ROOT / "README.md", 0, argv)
