"""A distillation teacher is checked like the model: it is another model than the student, a folder (not its
config.json), and a teacher whose logits are not finite is named as the cause of the stop, in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from uptrain_gqa.synthetic import write_corpus
from uptrain_gqa.training import loop as trainlib
from uptrain_gqa.training.checkpointer import checkpoints


def config(tiny_run: dict, **changes: object) -> Path:
    path = tiny_run["root"] / "run.yaml"
    path.write_text(yaml.safe_dump({**tiny_run["config"], **changes}))
    return path


def quick(tiny_run: dict, **changes: object) -> Path:
    """The tiny run with 40 documents, one micro-batch a step and 4 validation blocks: a second or two."""
    corpus = write_corpus(tiny_run["root"] / "small-corpus", docs=40)
    data = {**tiny_run["config"]["data"], "files": [str(corpus / "*.txt")], "validation_blocks": 4}
    batch = {"global_batch_size": 4, "micro_batch_size": 4}
    return config(tiny_run, data=data, batch=batch, **changes)


def one_line_error(err: str) -> str:
    """The one error line (after the budget and progress lines a started run prints)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("uptrain train: error: "), err
    assert err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_a_teacher_that_is_the_student_is_refused(run_cli, tiny_run: dict, spelling: str) -> None:
    model = Path(tiny_run["model"])
    teacher = {"same": str(model), "dotted": f"{model.parent}/./{model.name}/"}.get(spelling)
    if spelling == "symlink":
        (tiny_run["root"] / "link").symlink_to(model)
        teacher = str(tiny_run["root"] / "link")
    code, _, err = run_cli("train", config(tiny_run), f"--distill.teacher={teacher}", "--budget.steps=2")
    line = one_line_error(err)
    assert code == 1 and "is the model being trained" in line and "give the source" in line, err
    assert not Path(tiny_run["config"]["out"]).exists()


def test_a_hub_teacher_with_the_students_id_is_refused(monkeypatch) -> None:
    from uptrain_gqa.errors import UptrainError
    from uptrain_gqa.training.config import DistillConfig, ModelConfig
    from uptrain_gqa.training.preflight import check_teacher

    with pytest.raises(UptrainError, match="is the model being trained"):
        check_teacher(DistillConfig(teacher="org/model-gqa"), ModelConfig(path="org/model-gqa"))
    check_teacher(DistillConfig(teacher="org/model"), ModelConfig(path="org/model-gqa"))  # the source: fine
    # another revision of the same repo is another model
    check_teacher(DistillConfig(teacher="org/model-gqa"), ModelConfig(path="org/model-gqa", revision="v2"))


def test_a_teacher_given_as_its_config_json_names_the_folder(run_cli, tiny_run: dict) -> None:
    source = Path(tiny_run["source"])
    code, _, err = run_cli("train", config(tiny_run), f"--distill.teacher={source / 'config.json'}", "--budget.steps=2")
    line = one_line_error(err)
    assert code == 1 and f"give the teacher's folder ({source})" in line and "Repo id" not in line, err


def nan_teacher(tiny_run: dict) -> Path:
    """A copy of the MHA source with one NaN in a q_proj weight."""
    teacher = tiny_run["root"] / "nan-teacher"
    shutil.copytree(tiny_run["source"], teacher)
    (weights,) = teacher.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(k for k in tensors if "q_proj" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return teacher


def test_a_nan_teacher_is_named_before_the_first_step(run_cli, tiny_run: dict) -> None:
    teacher = nan_teacher(tiny_run)
    code, _, err = run_cli("train", quick(tiny_run), f"--distill.teacher={teacher}", "--budget.steps=2")
    line = one_line_error(err)
    assert code == 1 and f"distill.teacher {teacher} gives non-finite logits" in line, err
    assert "checkpoint" not in line and "resume" not in line, err  # there is none: none is mentioned
    assert not Path(tiny_run["config"]["out"]).exists()


def test_a_teacher_whose_logits_turn_non_finite_is_named_with_the_last_good_checkpoint(
    run_cli, tiny_run: dict, monkeypatch
) -> None:
    """The teacher's logits overflow from the fourth optimizer step on: the stop names the teacher as the
    cause and the checkpoint of step 2 as the one to resume from."""
    real = trainlib.load_teacher

    def overflowing(*args, **kwargs):
        teacher = real(*args, **kwargs)
        forward, calls = teacher.forward, {"n": 0}

        def poisoned(*a, **k):
            out = forward(*a, **k)
            calls["n"] += 1
            if calls["n"] > 1 + 3:  # the check before step 1, then one micro-batch a step
                out.logits = torch.full_like(out.logits, float("inf"))
            return out

        teacher.forward = poisoned
        return teacher

    monkeypatch.setattr(trainlib, "load_teacher", overflowing)
    cfg = quick(tiny_run, checkpoint={"every": 2, "keep": 2}, logging={"every": 2, "eval_every": 0, "trackers": []})
    code, _, err = run_cli("train", cfg, f"--distill.teacher={tiny_run['source']}", "--budget.steps=4")
    line = one_line_error(err)
    run = Path(tiny_run["config"]["out"])
    assert code == 1 and f"distill.teacher {tiny_run['source']} gives non-finite logits" in line, err
    assert [c.name for c in checkpoints(run)] == ["step-00000002"]
    assert f"resume from {run / 'checkpoints' / 'step-00000002'}" in line, err


def test_a_non_finite_loss_without_a_checkpoint_does_not_mention_resuming(run_cli, tiny_run: dict, monkeypatch) -> None:
    real = trainlib.training_loss

    def poisoned(model, ids, *args):
        loss, ce = real(model, ids, *args)
        return loss * float("nan"), ce

    monkeypatch.setattr(trainlib, "training_loss", poisoned)
    code, _, err = run_cli("train", quick(tiny_run), "--budget.steps=2", "--logging.every=1")
    line = one_line_error(err)
    assert code == 1 and "the loss became nan at step 1" in line and "resume" not in line, err
