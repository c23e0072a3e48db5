"""Outputs are owned: one writer per OUT (a lock that dies with its process), and --overwrite only
ever replaces what uptrain wrote. Two converts and two trains on one OUT at once: one proceeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from tests import programs
from tests.families import tensors
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import MARKERS
from uptrain_gqa.io.ownership import OutputLock, check_replaceable, lock_path


@pytest.mark.integration
def test_a_second_writer_is_refused_and_names_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from uptrain_gqa.io.ownership import OutputLock; OutputLock({str(out)!r}).acquire()",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0 and f"is being written by uptrain process {os.getpid()}" in proc.stderr
    assert not lock_path(out).exists(), "released and removed"


def test_a_lock_left_by_a_killed_process_is_taken_over_and_reported(tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "out"
    lock_path(out).write_text("999999")  # the file of a process that died holding it: no flock remains
    with OutputLock(out):
        assert lock_path(out).read_text() == str(os.getpid())
    shown = capsys.readouterr().err + caplog.text  # the CLI's handler, or logging's own when none is set up
    assert "(process 999999) ended without releasing its lock" in shown


def test_overwrite_replaces_only_uptrains_own_folders(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UptrainError, match="was not written by uptrain"):
        check_replaceable(mine, MARKERS)
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / MARKERS[0]).write_text("{}")
    check_replaceable(converted, MARKERS)
    check_replaceable(tmp_path / "new", MARKERS)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", MARKERS)
    with pytest.raises(UptrainError, match="holds an input"):
        check_replaceable(converted, MARKERS, inputs=[converted])  # OUT is the input
    (converted / "model").mkdir()
    with pytest.raises(UptrainError, match="holds an input"):
        check_replaceable(converted / "model", MARKERS, inputs=[converted])  # OUT inside the input


def start(*args: str | Path, program: str | None = None) -> subprocess.Popen:
    """`uptrain ARGS...` in a fresh process, or tests.programs.PROGRAM (the CLI with one thing changed)."""
    cmd = [sys.executable, *(programs.module(program) if program else ["-m", "uptrain_gqa"]), *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=programs.environment())


def race(a: subprocess.Popen, b: subprocess.Popen) -> tuple[str, str]:
    """(winner's stderr, loser's stderr), asserting that exactly one succeeded."""
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in (a, b)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    winner = next(err for code, err in results if code == 0)
    loser = next(err for code, err in results if code == 1)
    assert len(loser.strip().splitlines()) == 1, loser
    return winner, loser


@pytest.mark.integration
@pytest.mark.slow  # two converts racing in subprocesses (~8 s); the lock's refusals run by default
def test_two_converts_on_one_out_at_once(llama: Path) -> None:
    out = llama.parent / "out"
    args = ("convert", llama, out, "--num-kv-heads", "2", "--max-shard-size", "20KB", "--quiet")
    _, loser = race(start(*args, program="slow_convert"), start(*args, program="slow_convert"))
    assert "is being written by uptrain process" in loser or "already exists" in loser, loser
    model = AutoModelForCausalLM.from_pretrained(out)  # the winner's output is whole
    assert model.config.num_key_value_heads == 2
    assert not list(llama.parent.glob(".out.uptrain*")), "no temp folder, no lock left"


@pytest.mark.integration
@pytest.mark.slow  # two trainings at once, ~9 s; two converts on one OUT run by default
def test_two_trains_on_one_out_at_once(tiny_run: dict) -> None:
    root = tiny_run["root"]
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run["config"]))
    _, loser = race(start("train", config), start("train", config))
    assert "is being written by uptrain process" in loser, loser
    run = Path(tiny_run["config"]["out"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 30, "one run's records, in order"
    assert tensors(run / "model"), "the final model is whole"
