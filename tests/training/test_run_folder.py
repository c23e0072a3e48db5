"""The run folder is the run's own: --overwrite never deletes an input or a user's folder, a
folder uptrain did not make is refused, a run that fails before training leaves nothing, and
metrics.jsonl holds each step once, whatever killed the run before."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.families import tensors
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.training import loop as trainlib
from uptrain_gqa.training.checkpointer import checkpoints
from uptrain_gqa.training.metrics import METRICS


def config(tiny_run: dict, **changes: object) -> Path:
    path = tiny_run["root"] / "run.yaml"
    path.write_text(yaml.safe_dump({**tiny_run["config"], **changes}))
    return path


def steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]  # training records (validation ones have val_loss)


def killed_during(run_cli, cfg: Path, monkeypatch, step: int) -> None:
    """Run `cfg` and end it abruptly during optimizer step `step`, as a SIGKILL would (nothing saved then)."""
    original = trainlib.Trainer.step

    def killed(self):
        if self.state.step == step - 1:
            raise SystemExit(-signal.SIGKILL)
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(trainlib.Trainer, "step", killed)
        assert run_cli("train", cfg)[0] == -signal.SIGKILL


def test_overwrite_never_deletes_the_model_being_trained(run_cli, tiny_run: dict) -> None:
    model = tiny_run["model"]
    before = sorted(p.name for p in model.iterdir())
    code, _, err = run_cli("train", config(tiny_run), f"--out={model}", "--overwrite", "--budget.steps=2")
    assert code == 1 and "holds an input of this command" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.writes_tiny_build
def test_the_model_being_trained_is_never_the_run_folder(run_cli, tiny_run: dict) -> None:
    """A model folder that train or export wrote holds uptrain_train.yaml, as a run folder does: training it
    into itself replaced that file and wrote checkpoints inside the model. Refused, with or without
    --overwrite, and into a folder inside the model too."""
    model = tiny_run["model"]
    (model / "uptrain_train.yaml").write_text("out: an earlier run\n")
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    for out, extra in ((model, ()), (model, ("--overwrite",)), (model / "runs" / "a", ())):
        code, _, err = run_cli("train", config(tiny_run), f"--out={out}", "--budget.steps=2", *extra)
        assert code == 1 and "holds an input of this command" in err and len(err.strip().splitlines()) == 1, err
        assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
        assert not (model / "runs").exists()


def test_overwrite_never_empties_a_users_folder(run_cli, tiny_run: dict) -> None:
    mine = tiny_run["root"] / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = run_cli("train", config(tiny_run), f"--out={mine}", "--overwrite", "--budget.steps=2")
    assert code == 1 and "was not written by uptrain" in err
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_a_folder_uptrain_did_not_make_is_not_written_into(run_cli, tiny_run: dict) -> None:
    mine = tiny_run["root"] / "my-notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = run_cli("train", config(tiny_run), f"--out={mine}", "--budget.steps=2")
    assert code == 1 and "is a folder uptrain did not make" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    empty = tiny_run["root"] / "empty"
    empty.mkdir()
    assert run_cli("train", config(tiny_run), f"--out={empty}", "--budget.steps=2")[0] == 0  # empty is fine


def test_a_run_that_fails_on_bad_data_leaves_no_folder(run_cli, tiny_run: dict) -> None:
    data = tiny_run["root"] / "blank"
    data.mkdir()
    (data / "a.txt").write_text("   \n\n")
    out = tiny_run["root"] / "failed"
    code, _, err = run_cli("train", config(tiny_run), f"--out={out}", f"--data.files=[{data}/*.txt]")
    assert code == 1, err
    assert not out.exists()


def test_a_resume_after_a_kill_keeps_each_step_once(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = config(tiny_run, checkpoint={"every": 10, "keep": 2}, logging={"every": 1, "eval_every": 10, "trackers": []})
    run = Path(tiny_run["config"]["out"])
    killed_during(run_cli, cfg, monkeypatch, 14)  # records 11-13 are past the last checkpoint
    assert steps(run)[-1] == 13 and checkpoints(run)[-1].name == "step-00000010"
    assert run_cli("train", cfg, "--resume")[0] == 0
    assert steps(run) == list(range(1, 31)), "each step once"


def test_a_fresh_start_in_a_run_folder_replaces_its_old_records(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = config(tiny_run, checkpoint={"every": 0, "keep": 1}, logging={"every": 1, "eval_every": 0, "trackers": []})
    run = Path(tiny_run["config"]["out"])
    killed_during(run_cli, cfg, monkeypatch, 5)
    assert steps(run) == [1, 2, 3, 4] and not checkpoints(run)
    assert run_cli("train", cfg, "--resume", "auto")[0] == 0  # nothing to resume: starts again
    assert steps(run) == list(range(1, 31))
    assert tensors(run / "model")


def test_every_start_and_resume_is_recorded_with_versions_devices_and_data(
    run_cli, tiny_run: dict, monkeypatch
) -> None:
    cfg = config(tiny_run, checkpoint={"every": 10, "keep": 2})
    run = Path(tiny_run["config"]["out"])
    original = trainlib.Trainer.step

    def stopped_at_12(self):
        if self.state.step == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(trainlib.Trainer, "step", stopped_at_12)
        assert run_cli("train", cfg)[0] == 128 + signal.SIGTERM
    assert run_cli("train", cfg, "--resume")[0] == 0
    record = json.loads((run / "uptrain_run.json").read_text())
    first, second = record["sessions"]
    assert (first["step"], second["step"]) == (0, 12)
    assert len(record["tracker_run_id"]) == 16  # one tracker run for both sessions
    for session in record["sessions"]:
        assert session["versions"]["torch"] == torch.__version__ and session["versions"]["uptrain-gqa"]
        assert session["world_size"] == 1 and session["devices_by_rank"] == [session["device"]]
        (data,) = session["data"]
        assert data["count"] == 400 and data["bytes"] > 0


def test_env_prints_what_uptrain_runs_on(run_cli) -> None:
    code, out, _ = run_cli("env", "--json")
    facts = json.loads(out)
    assert code == 0 and facts["versions"]["torch"] == torch.__version__ and facts["processes"] == 1


def test_trackers_get_the_run_name_tags_and_one_id_across_resumes(run_cli, tiny_run: dict, monkeypatch) -> None:
    from accelerate import Accelerator

    seen = []
    monkeypatch.setattr(
        Accelerator, "init_trackers", lambda self, project, config=None, init_kwargs=None: seen.append(init_kwargs)
    )
    cfg = config(tiny_run, logging={"every": 5, "eval_every": 0, "trackers": [], "run_name": "gqa2", "tags": ["tiny"]})
    assert run_cli("train", cfg, "--budget.steps=2")[0] == 0
    assert run_cli("train", cfg, "--budget.steps=4", "--resume")[0] == 0
    first, second = (s["wandb"] for s in seen)
    assert first["name"] == "gqa2" and first["tags"] == ["tiny"] and first["resume"] == "allow"
    assert first["id"] == second["id"], "the resumed run continues the same tracker run"


def test_resuming_an_earlier_checkpoint_starts_a_history_that_auto_follows(run_cli, tiny_run: dict) -> None:
    """Branching: 30 steps, then --resume step-10 with another budget. The later checkpoints (20, 30) belong to
    the abandoned history: rotation deleted the branch's own new checkpoint, and `auto` picked step 30. They
    are set aside (kept), and `auto` continues the branch."""
    cfg = config(tiny_run, checkpoint={"every": 5, "keep": 3}, logging={"every": 1, "eval_every": 10, "trackers": []})
    run = Path(tiny_run["config"]["out"])
    assert run_cli("train", cfg, "--budget.steps=30", "--checkpoint.every=10")[0] == 0
    old = {c.name: (c / "train_state.json").read_text() for c in checkpoints(run)}
    assert list(old) == ["step-00000010", "step-00000020", "step-00000030"]
    code, _, err = run_cli("train", cfg, "--resume", run / "checkpoints" / "step-00000010", "--budget.steps=15")
    assert code == 0 and "starts a new history; the run's later checkpoints moved to" in err, err
    assert [c.name for c in checkpoints(run)] == ["step-00000010", "step-00000015"]
    (aside,) = (run / "checkpoints").glob("abandoned-after-step-00000010-*")
    assert {c.name: (c / "train_state.json").read_text() for c in aside.iterdir()} == {
        k: v for k, v in old.items() if k != "step-00000010"
    }, "the abandoned history is kept, untouched"
    code, _, err = run_cli("train", cfg, "--resume", "auto", "--budget.steps=20")
    assert code == 0 and "new history" not in err, err
    assert steps(run) == list(range(1, 21)), "auto continued the branch from step 15: each step once"


def test_damaged_checkpoints_are_refused_in_one_line(run_cli, tiny_run: dict) -> None:
    """Each damage, on a copy of a good checkpoint: resume (or export) says which file and what to do; a damaged
    run record is kept aside and the resume goes on."""
    import shutil

    cfg = config(tiny_run, checkpoint={"every": 5, "keep": 2})
    run = Path(tiny_run["config"]["out"])
    assert run_cli("train", cfg, "--budget.steps=5")[0] == 0
    good = checkpoints(run)[-1]

    def damaged(name: str, damage) -> Path:
        copy = tiny_run["root"] / "damaged" / name
        shutil.copytree(good, copy)
        damage(copy)
        return copy

    cases = [
        ("config-not-yaml", lambda c: (c / "uptrain_train.yaml").write_text("model: [unclosed\n"), "is damaged"),
        ("config-a-list", lambda c: (c / "uptrain_train.yaml").write_text("- a\n- b\n"), "not a mapping"),
        ("optimizer-cut", lambda c: os.truncate(c / "optimizer.bin", 20), "cannot resume from"),
        ("sharded", lambda c: (c / "sharded").mkdir(), "is a sharded (FSDP2) checkpoint"),
    ]
    for name, damage, message in cases:
        code, _, err = run_cli("train", cfg, "--resume", damaged(name, damage), "--budget.steps=6")
        lines = [line for line in err.strip().splitlines() if "error" in line]
        assert code == 1 and message in err and "Traceback" not in err and len(lines) == 1, (name, err)
    state = damaged("state", lambda c: (c / "train_state.json").write_text("{garbage"))
    code, _, err = run_cli("export", state, tiny_run["root"] / "exported")
    assert code == 1 and "train_state.json is damaged" in err and "Traceback" not in err, err
    cut = damaged("weights-cut", lambda c: os.truncate(c / "model.safetensors", 100))
    code, _, err = run_cli("export", cut, tiny_run["root"] / "exported")
    assert code == 1 and f"cannot read the weights of {cut}" in err and len(err.strip().splitlines()) == 1, err
    (run / "uptrain_run.json").write_text("{not json")
    code, _, err = run_cli("train", cfg, "--resume", "auto", "--budget.steps=6")
    assert code == 0 and "uptrain_run.json was damaged" in err, err
    assert len(list(run.glob("uptrain_run.json.damaged-*"))) == 1


def test_a_full_disk_while_checkpointing_stops_in_one_line_and_keeps_the_last_checkpoint(
    run_cli, tiny_run: dict, monkeypatch
) -> None:
    """torch.save at the second checkpoint writes part of its file, then the disk is full: torch's own
    writer then raises a RuntimeError with no OS error in it (as on a real full disk)."""
    cfg = config(tiny_run)
    run, real_save, saves = Path(tiny_run["config"]["out"]), torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        if "step-00000020" in str(f):
            Path(f).write_bytes(b"\0" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        saves.append(f)
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_until_full)
        m.setattr("uptrain_gqa.io.folders.LOW_SPACE", 2**62)  # this disk is not full: say it is
        code, _, err = run_cli("train", cfg)
    assert saves, "the injected failure was never reached"
    assert code == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        f"uptrain train: error: cannot write checkpoint step-00000020 in {run / 'checkpoints'}: the disk is probably "
        "full ("
    ), line
    assert "free there; RuntimeError: [enforce fail" in line, line
    assert line.endswith("make room or lower checkpoint.keep, then resume from step-00000010, which is intact"), line
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step-00000010"]  # no partial folder
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run / "checkpoints" / "step-00000010").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # readable by others (umask 022), weights included
    code, _, err = run_cli("train", cfg, "--resume", "auto")
    assert code == 0 and "at step 10" in err, err


@pytest.mark.slow  # the full-disk test above runs the same path by default
def test_an_os_error_while_checkpointing_names_it(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = config(tiny_run)
    real_save = torch.save

    def quota(obj, f, *args, **kwargs):
        raise OSError(122, "Disk quota exceeded", str(f))

    with monkeypatch.context() as m:
        m.setattr(torch, "save", quota)
        code, _, err = run_cli("train", cfg)
    assert real_save is torch.save
    assert code == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "cannot write checkpoint step-00000010" in line and "the disk quota is used up (" in line, line
    assert line.endswith("make room or lower checkpoint.keep; no checkpoint was saved yet"), line
    assert not (Path(tiny_run["config"]["out"]) / "checkpoints" / ".step-00000010.partial").exists()


def _full_disk_for_weights(m) -> None:
    """safetensors' writer on a full disk: its own error type, the OS error only in the text."""
    import safetensors

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    m.setattr("transformers.modeling_utils.safe_save_file", full)


def test_a_full_disk_for_the_final_model_names_the_export_that_writes_it_later(
    run_cli, tiny_run: dict, monkeypatch
) -> None:
    cfg = config(tiny_run)
    run = Path(tiny_run["config"]["out"])
    with monkeypatch.context() as m:
        _full_disk_for_weights(m)
        code, _, err = run_cli("train", cfg)
    assert code == 1 and "Traceback" not in err, err
    step = run / "checkpoints" / "step-00000030"
    assert err.strip().splitlines()[-1] == (
        f"uptrain train: error: cannot write {run / 'model'}: the disk is full ("
        + err.split("the disk is full (")[1].split(")")[0]
        + f"); nothing was written there; after making room, `uptrain export {step} {run / 'model'}` writes it"
    ), err
    assert not (run / "model").exists() and step.is_dir()
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "a temporary folder was left"
    code, _, err = run_cli("export", step, run / "model")
    assert code == 0, err
    assert (run / "model" / "model.safetensors").is_file()


def test_export_onto_a_full_disk_is_one_line_and_writes_nothing(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = config(tiny_run, budget={"steps": 10})
    assert run_cli("train", cfg)[0] == 0
    step = Path(tiny_run["config"]["out"]) / "checkpoints" / "step-00000010"
    out = tiny_run["root"] / "exported"
    with monkeypatch.context() as m:
        _full_disk_for_weights(m)
        code, _, err = run_cli("export", step, out)
    assert code == 1 and "Traceback" not in err, err
    assert err.strip().startswith(f"uptrain export: error: cannot write {out}: the disk is full ("), err
    assert err.strip().endswith("free there); nothing was written there") and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".exported")]


def test_a_run_that_fails_before_its_first_step_leaves_nothing_it_made(run_cli, tiny_run: dict, monkeypatch) -> None:
    """The failure comes after the run folder, its record and metrics exist (the step-0 validation, here): the
    folder goes, and so do the parent folders the run made for it."""

    def broken(self):
        raise UptrainError("the validation text could not be read")

    monkeypatch.setattr(trainlib.Trainer, "validate", broken)
    out = tiny_run["root"] / "new" / "nested" / "run"
    code, _, err = run_cli("train", config(tiny_run), f"--out={out}", "--budget.steps=2")
    assert code == 1 and "the validation text could not be read" in err, err
    assert not (tiny_run["root"] / "new").exists(), "a parent folder the run made was left"


def test_a_failed_first_step_empties_a_given_empty_folder_and_keeps_it(run_cli, tiny_run: dict, monkeypatch) -> None:
    def broken(self):
        raise UptrainError("out of memory in the first step")

    monkeypatch.setattr(trainlib.Trainer, "step", broken)
    out = tiny_run["root"] / "empty"
    out.mkdir()
    code, _, err = run_cli("train", config(tiny_run), f"--out={out}", "--budget.steps=2")
    assert code == 1 and "out of memory in the first step" in err, err
    assert out.is_dir() and list(out.iterdir()) == []


def test_an_overwrite_that_fails_before_its_first_step_leaves_no_half_made_run(run_cli, tiny_run: dict) -> None:
    cfg = config(tiny_run)
    assert run_cli("train", cfg, "--budget.steps=2")[0] == 0
    blank = tiny_run["root"] / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n\n")
    code, _, err = run_cli("train", cfg, "--overwrite", f"--data.files=[{blank}/*.txt]")
    assert code == 1, err
    assert not Path(tiny_run["config"]["out"]).exists()
