"""Links planted where uptrain writes or reads are never followed out: not at OUT's lock, not as a
side file of the source (a Hub cache's links into its blobs excepted), not at a record's temporary
name; and a file uptrain did not write is neither replaced nor shown."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from transformers import AutoModelForCausalLM

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.ownership import OutputLock, lock_path
from uptrain_gqa.training.metrics import METRICS, RUN_RECORD, MetricsLog, record_session

SECRET = "api_key = hunter2\n"
FAST = ("--num-kv-heads", "2", "--method", "mean", "--quiet")  # no calibration: the links are what is tested


def victim(root: Path) -> Path:
    """A file of the user's outside every folder uptrain is given."""
    path = root / "elsewhere" / "secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SECRET)
    return path


# --- the lock ------------------------------------------------------------------------------------------


def test_a_link_planted_at_the_lock_is_refused_and_its_target_untouched(run_cli, llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    target = victim(tmp_path)
    lock_path(out).symlink_to(target)
    code, _, err = run_cli("convert", llama, out, *FAST)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "is a symlink" in err and str(lock_path(out)) in err, err
    assert target.read_text() == SECRET, "the link's target is not replaced by a PID"
    assert "hunter2" not in err
    assert not out.exists()


def test_a_hard_link_planted_at_the_lock_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    os.link(target, lock_path(tmp_path / "out"))
    with pytest.raises(UptrainError, match="other names") as e:
        OutputLock(tmp_path / "out").acquire()
    assert target.read_text() == SECRET and "hunter2" not in str(e.value)


def test_a_file_at_the_lock_that_uptrain_did_not_write_is_neither_replaced_nor_shown(tmp_path: Path) -> None:
    lock = lock_path(tmp_path / "out")
    lock.write_text(SECRET)
    with pytest.raises(UptrainError, match="is not an uptrain lock") as e:
        OutputLock(tmp_path / "out").acquire()
    assert lock.read_text() == SECRET and "hunter2" not in str(e.value)
    fd = os.open(lock, os.O_RDWR)  # held by someone: the refusal names no holder read from it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UptrainError, match="being written by another process") as e:
            OutputLock(tmp_path / "out").acquire()
        assert "hunter2" not in str(e.value)
    finally:
        os.close(fd)


# --- side files of the source ---------------------------------------------------------------------------


def test_a_side_file_linking_out_of_the_source_is_refused_before_any_work(run_cli, llama: Path, tmp_path: Path) -> None:
    target = victim(tmp_path)
    (llama / "tokenizer_config.json").symlink_to(target)
    code, _, err = run_cli("convert", llama, tmp_path / "out", *FAST)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "tokenizer_config.json" in err and str(target) in err and "regular file" in err, err
    assert "hunter2" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.uptrain*"))


def test_a_side_file_linking_inside_the_source_is_copied(run_cli, llama: Path, tmp_path: Path) -> None:
    (llama / "notes.txt").write_text("kept\n")
    (llama / "README.txt").symlink_to("notes.txt")
    code, _, err = run_cli("convert", llama, tmp_path / "out", *FAST)
    assert code == 0, err
    copied = tmp_path / "out" / "README.txt"
    assert copied.read_text() == "kept\n" and not copied.is_symlink()


def as_hub_cache(folder: Path, cache: Path, repo: str, commit: str) -> Path:
    """`folder`'s files laid out as `hf download` leaves them: blobs named by hash, and a snapshot of
    relative links into them. Returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.move(path, root / "blobs" / digest)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def test_a_hub_cache_snapshot_of_links_into_its_blobs_converts(
    run_cli, llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (llama / "generation_config.json").write_text(json.dumps({"max_length": 32}))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = as_hub_cache(llama, tmp_path / "hub", "acme/linked", commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for src, out in (("acme/linked", tmp_path / "by-id"), (snapshot, tmp_path / "by-path")):
        code, _, err = run_cli("convert", src, out, *FAST)
        assert code == 0, err
        assert json.loads((out / "generation_config.json").read_text()) == {"max_length": 32}
        assert AutoModelForCausalLM.from_pretrained(out).config.num_key_value_heads == 2


def test_push_never_uploads_a_link_leaving_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    from uptrain_gqa.io.hub import push_folder

    uploads = []

    class Hub:
        def create_repo(self, repo_id: str, **kwargs) -> None:
            pass

        def upload_folder(self, **kwargs) -> None:
            uploads.append(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").symlink_to(victim(tmp_path))
    with pytest.raises(UptrainError, match=r"sub/tokenizer.json links outside") as e:
        push_folder(folder, "someone/x")
    assert not uploads and "hunter2" not in str(e.value) and len(str(e.value).splitlines()) == 1
    (folder / "sub" / "tokenizer.json").unlink()
    (folder / "sub" / "tokenizer.json").symlink_to("../config.json")  # a link inside the folder is fine
    push_folder(folder, "someone/x")
    assert len(uploads) == 1


# --- records of a run -----------------------------------------------------------------------------------


def test_the_run_record_is_not_written_through_a_link_at_its_old_temporary_name(tmp_path: Path) -> None:
    target = victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / f"{RUN_RECORD}.tmp").symlink_to(target)  # the fixed temporary name it used
    record_session(run, {"step": 0})
    record_session(run, {"step": 5})
    assert target.read_text() == SECRET
    assert [s["step"] for s in json.loads((run / RUN_RECORD).read_text())["sessions"]] == [0, 5]


def test_metrics_cut_back_on_resume_are_not_written_through_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS).write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    (run / f"{METRICS}.tmp").symlink_to(target)  # the fixed temporary name it used
    MetricsLog(SimpleNamespace(is_main_process=True), run).start(2)
    assert target.read_text() == SECRET
    assert [json.loads(r)["step"] for r in (run / METRICS).read_text().splitlines()] == [1, 2]


def test_metrics_are_not_appended_through_a_link(tmp_path: Path) -> None:
    target = victim(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS).symlink_to(target)
    log = MetricsLog(SimpleNamespace(is_main_process=True, log=lambda *a, **k: None), run)
    with pytest.raises(UptrainError, match="is a symlink"):
        log.record(1, 64, {"loss": 2.0})
    assert target.read_text() == SECRET


@pytest.mark.slow  # two tiny trainings (~10 s); the records' own tests above run by default
def test_a_resumed_run_writes_no_checkpoint_or_config_through_planted_links(
    run_cli, tiny_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import yaml

    from uptrain_gqa.io.folders import TRAIN_CONFIG
    from uptrain_gqa.training import loop as trainlib
    from uptrain_gqa.training.checkpointer import checkpoints

    cfg = tiny_run["root"] / "run.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_run["config"], "checkpoint": {"every": 10, "keep": 3}}))
    run = Path(tiny_run["config"]["out"])
    original = trainlib.Trainer.step

    def killed(self):  # ended abruptly during step 14, as a SIGKILL would
        if self.state.step == 13:
            raise SystemExit(-signal.SIGKILL)
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(trainlib.Trainer, "step", killed)
        assert run_cli("train", cfg)[0] == -signal.SIGKILL
    target = victim(tiny_run["root"])
    folder = target.parent  # a folder of the user's, holding only `secret`
    (run / "checkpoints" / ".step-00000020.partial").symlink_to(folder)  # the checkpoint's fixed temporary name
    (run / f"{RUN_RECORD}.tmp").symlink_to(target)
    code, _, err = run_cli("train", cfg, "--resume")
    assert code == 0, err
    assert [p.name for p in folder.iterdir()] == ["secret"] and target.read_text() == SECRET
    assert [c.name for c in checkpoints(run)] == ["step-00000010", "step-00000020", "step-00000030"]
    (run / TRAIN_CONFIG).unlink()
    (run / TRAIN_CONFIG).symlink_to(target)
    code, _, err = run_cli("train", cfg, "--resume")
    line = err.strip().splitlines()[-1]  # after the budget it prints first
    assert code == 1 and "Traceback" not in err and line.startswith("uptrain train: error:"), err
    assert "uptrain_train.yaml is a symlink" in line, line
    assert target.read_text() == SECRET
