"""Step checkpoints whose files went away: an FSDP2 checkpoint missing one rank's shard is found before any
process reads it (resume falls back to the previous complete one, or names the damaged one), and an export of a
checkpoint that rotation removed says so and lists those that exist."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.training import export as exportlib
from uptrain_gqa.training.checkpointer import (
    STATE_FILE,
    TRAIN_CONFIG,
    check_complete,
    checkpoints,
    incomplete,
    resume_path,
)
from uptrain_gqa.training.sharding import SHARDED_FOLDER


def sharded_step(run: Path, step: int) -> Path:
    """A step checkpoint as two FSDP2 ranks write it: a DCP folder whose .metadata names one shard file per rank
    (__0_0.distcp, __1_0.distcp), the RNG state of each rank, the config and the train state."""
    import torch.distributed.checkpoint as dcp

    folder = run / "checkpoints" / f"step-{step:08d}"
    shards = folder / SHARDED_FOLDER
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": {"a": torch.ones(4) * step, "b": torch.zeros(3)}}, checkpoint_id=str(shards))
    # rank 1 wrote "b": the same bytes, under its own file name
    shutil.copy(shards / "__0_0.distcp", shards / "__1_0.distcp")
    metadata = dcp.FileSystemReader(str(shards)).read_metadata()
    for index, info in metadata.storage_data.items():
        if index.fqn == "model.b":
            info.relative_path = "__1_0.distcp"
    with open(shards / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    for rank in (0, 1):
        (folder / f"random_states_{rank}.pkl").write_bytes(b"rng")
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "tokens": 256 * step}) + "\n")
    (folder / TRAIN_CONFIG).write_text("out: run\n")
    return folder


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    for step in (10, 20, 30):
        sharded_step(run, step)
    return run


def test_a_complete_sharded_checkpoint_is_complete(run: Path) -> None:
    assert [incomplete(c) for c in checkpoints(run)] == [None, None, None]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: (c / SHARDED_FOLDER / "__1_0.distcp").unlink(), "sharded/__1_0.distcp is missing"),
        (lambda c: os.truncate(c / SHARDED_FOLDER / "__1_0.distcp", 10), "sharded/__1_0.distcp is cut short"),
        (lambda c: (c / "random_states_1.pkl").unlink(), "random_states_1.pkl is missing"),
        (lambda c: os.truncate(c / SHARDED_FOLDER / ".metadata", 10), "sharded/.metadata is damaged"),
    ],
    ids=["missing-shard", "cut-shard", "missing-rng", "cut-metadata"],
)
def test_resume_falls_back_from_a_damaged_latest_checkpoint_and_says_so(run: Path, damage, reason: str, caplog) -> None:
    latest = checkpoints(run)[-1]
    damage(latest)
    assert reason in (incomplete(latest) or "")
    for mode in ("latest", "auto"):
        caplog.clear()
        assert resume_path(run, mode) == run / "checkpoints" / "step-00000020"
        notes = [r.getMessage() for r in caplog.records]
        assert len(notes) == 1 and "\n" not in notes[0], notes
        assert f"{latest} is incomplete ({reason}" in notes[0], notes
        assert "resuming from step-00000020, the latest complete checkpoint" in notes[0], notes
    assert latest.is_dir(), "the damaged checkpoint is kept for the user to look at"


def test_resume_of_a_named_damaged_checkpoint_is_refused_in_one_line(run: Path) -> None:
    latest = checkpoints(run)[-1]
    (latest / SHARDED_FOLDER / "__1_0.distcp").unlink()
    with pytest.raises(UptrainError) as e:
        check_complete(run, resume_path(run, str(latest)))
    message = str(e.value)
    assert "\n" not in message and str(latest) in message and "sharded/__1_0.distcp is missing" in message
    assert "resume from" in message and "step-00000020" in message  # the one to resume from instead


def test_resume_with_no_complete_checkpoint_is_refused_in_one_line(run: Path) -> None:
    for c in checkpoints(run):
        (c / SHARDED_FOLDER / "__0_0.distcp").unlink()
    with pytest.raises(UptrainError, match="no complete checkpoint") as e:
        resume_path(run, "latest")
    assert "\n" not in str(e.value) and "step-00000030" in str(e.value)


def test_export_of_a_checkpoint_rotated_away_lists_those_that_exist(run_cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sharded_step(run, 30)
    sharded_step(run, 40)
    (run / TRAIN_CONFIG).write_text(yaml.safe_dump({"checkpoint": {"every": 10, "keep": 2}}))
    gone = run / "checkpoints" / "step-00000020"
    code, _, err = run_cli("export", gone, tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "is not an uptrain step checkpoint" not in err, err
    assert f"{gone} no longer exists" in err and "checkpoint.keep" in err, err
    assert "step-00000030, step-00000040" in err, err
    assert not (tmp_path / "out").exists()


def test_export_of_a_checkpoint_deleted_while_it_is_read_says_so(run_cli, tiny_run: dict, monkeypatch) -> None:
    """Rotation by the still running training removes the checkpoint while export reads its weights."""
    run = Path(tiny_run["config"]["out"])
    step = run / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (run / TRAIN_CONFIG).write_text(yaml.safe_dump(tiny_run["config"]))
    shutil.copy(run / TRAIN_CONFIG, step / TRAIN_CONFIG)
    (step / STATE_FILE).write_text(json.dumps({"step": 10, "tokens": 2560}))
    shutil.copy(Path(tiny_run["model"]) / "model.safetensors", step / exportlib.REPLICATED_FILE)
    sharded_step(run, 40)
    real = exportlib._weights

    def rotated_meanwhile(checkpoint, kind, model):
        shutil.rmtree(checkpoint)
        return real(checkpoint, kind, model)

    monkeypatch.setattr(exportlib, "_weights", rotated_meanwhile)
    code, _, err = run_cli("export", step, tiny_run["root"] / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{step} no longer exists" in err and "step-00000040" in err, err
    assert not (tiny_run["root"] / "out").exists()
