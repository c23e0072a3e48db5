"""Tokenizing with several processes (data.num_proc): the same blocks as one process, errors from the
workers in one line, and a signal that stops it at once, with no temporary cache file left behind."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

import multiprocess
import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from tests import make_tiny_run
from uptrain_gqa.data import blocks as datalib
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

DOCS = 4000  # two shards of >= 1000 documents: two processes, two map batches each


@pytest.fixture(autouse=True)
def no_hang():
    """A regression here is a hang: end the whole test run with every thread's stack instead."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def test_two_processes_pack_the_same_blocks_as_one(tmp_path: Path) -> None:
    save_word_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    corpus = write_corpus(tmp_path / "c.jsonl", docs=DOCS, fmt="jsonl")
    packed = {}
    for procs in (1, 2):
        cfg = DataConfig(files=[str(corpus)], seq_len=16, num_proc=procs, cache_dir=str(tmp_path / f"cache{procs}"))
        packed[procs] = datalib.pack_dataset(datalib.load_documents(cfg), tokenizer, cfg)[:]["input_ids"]
    shards = sorted(p.name for p in (tmp_path / "cache2").rglob("cache-*_of_00002.arrow"))
    assert len(shards) == 2, shards  # the two-process path ran
    # shards are packed apart, so each drops its own partial tail: the same stream, cut at most once more
    one, two = packed[1].reshape(-1), packed[2].reshape(-1)
    assert len(packed[1]) - len(packed[2]) in (0, 1)
    head = np.flatnonzero(one[: len(two)] != two)
    assert head.size == 0 or head[0] >= len(two) // 2 - 16, "the first shard's blocks differ"


def _run(tmp_path: Path) -> tuple[dict, Path]:
    run = make_tiny_run(tmp_path)
    corpus = write_corpus(tmp_path / "docs.jsonl", docs=DOCS, fmt="jsonl")
    cfg = run["config"]
    cfg["data"].update(files=[str(corpus)], num_proc=2, cache_dir=str(tmp_path / "cache"))
    cfg["budget"]["steps"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def _interrupting_packer(monkeypatch, sends: int, marker: Path) -> None:
    """Workers that, on their second batch (a temporary cache file is open by then), record the
    temporary files and deliver `sends` to the command's process once, then hang."""
    real, command = datalib.packer, os.getpid()

    def factory(tokenizer, column: str, seq_len: int):
        pack, calls = real(tokenizer, column, seq_len), [0]

        def pack_then_hang(batch):
            calls[0] += 1
            if calls[0] == 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:  # the other worker signals
                    time.sleep(300)
                temps = [p.name for p in marker.parent.joinpath("cache").rglob("tmp*")]
                os.write(fd, "\n".join(temps).encode())
                os.close(fd)
                if sends == signal.SIGKILL:  # killed from outside, e.g. by the kernel's OOM killer
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                os.kill(command, sends)
                time.sleep(300)
            return pack(batch)

        return pack_then_hang

    monkeypatch.setattr(datalib, "packer", factory)


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),  # the same path; kept out of the 5-minute default run
        pytest.param(signal.SIGHUP, marks=pytest.mark.slow),
    ],
)
def test_a_signal_while_tokenizing_stops_at_once_and_leaves_no_temporary_files(
    run_cli, tmp_path: Path, monkeypatch, sig: int
) -> None:
    cfg, path = _run(tmp_path)
    marker = tmp_path / "signalled"
    with monkeypatch.context() as m:
        _interrupting_packer(m, sig, marker)
        start = time.monotonic()
        code, _, err = run_cli("train", path)
        took = time.monotonic() - start
    assert code == 128 + sig, err
    assert f"uptrain train: interrupted by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    assert took < 60, f"{took:.0f} s to stop"  # the workers hang for 300 s: they were killed, not waited for
    assert marker.read_text(), "no temporary file existed when the signal came: the test proves nothing"
    assert not list((tmp_path / "cache").rglob("tmp*")), "temporary cache files left behind"
    assert not multiprocess.active_children()
    assert not Path(cfg["out"]).exists()
    code, _, err = run_cli("train", path)  # the cache is consistent: the next run tokenizes and trains
    assert code == 0, err


def test_tokenizing_processes_killed_from_outside_are_reported(run_cli, tmp_path: Path, monkeypatch) -> None:
    _, path = _run(tmp_path)
    with monkeypatch.context() as m:
        _interrupting_packer(m, signal.SIGKILL, tmp_path / "signalled")
        code, _, err = run_cli("train", path)
    assert code == 1 and "Traceback" not in err, err
    assert "the tokenizing process was killed by SIGKILL (out of memory? try fewer data.num_proc)" in err
    assert not list((tmp_path / "cache").rglob("tmp*"))


def test_a_bad_document_in_a_worker_is_one_line(run_cli, tmp_path: Path) -> None:
    cfg, path = _run(tmp_path)
    lines = Path(cfg["data"]["files"][0]).read_text().splitlines()
    lines[3000] = '{"text": 42}'  # in the second shard
    Path(cfg["data"]["files"][0]).write_text("\n".join(lines) + "\n")
    code, _, err = run_cli("train", path)
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("uptrain train: error: "), err
    assert "is 42 (int), not text" in err, err
