"""The prepared GPU check (benchmarks/gpu_check.py) without a GPU: the dry run of every part with tiny shapes,
what happens to a part that fails, hangs or lacks a package, and the targets its report judges."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check_report import targets
from tests import ROOT

PARTS = ["train", "decode", "fsdp2", "calibration"]


def dry_run(out: Path, command: list[str]) -> dict:
    """Run the check without a GPU into `out`; its JSON, once every part passed."""
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((out / "gpu-check.json").read_text())
    failed = {k: (v["status"], v.get("output")) for k, v in report["parts"].items() if v["status"] != "ok"}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout, proc.stderr[-3000:])
    return report


@pytest.mark.integration
@pytest.mark.slow  # 45 s on 2 cores: every part of the GPU check on the CPU; make test-all
def test_the_dry_run_runs_every_part_and_writes_both_tables(tmp_path: Path) -> None:
    # two parts at a time: the same parts and tables as `make gpu-check` without a GPU, in about half the time
    report = dry_run(tmp_path, [sys.executable, "-m", "benchmarks.gpu_check", "--shapes", "cpu", "--jobs", "2"])
    assert list(report["parts"]) == PARTS
    parts = {name: entry["figures"] for name, entry in report["parts"].items()}
    assert set(parts["train"]["best"]) == {"uptrain train", "transformers Trainer"}
    assert {(r["kv_heads"], r["attention"]) for r in parts["decode"]["rows"]} == {
        (g, a) for g in (8, 2, 1) for a in ("sdpa", "uptrain_sdpa")
    }
    fsdp2 = parts["fsdp2"]
    assert (fsdp2["stopped_at_step"], fsdp2["final_step"]) == (15, 30)
    assert len(fsdp2["checkpoint_write_seconds"]) >= 4  # steps 10, 15 (the stop), 20, 30
    assert parts["calibration"]["refine_steps"] == 2 and parts["calibration"]["calibration_seconds"] > 0
    assert [t["met"] for t in report["targets"]] == [None] * 4  # judged on a GPU only
    table = (tmp_path / "gpu-check.md").read_text()
    for entry in report["parts"].values():
        assert entry["title"] in table and entry["command"] in table
    logs = [f"{p}.log" for p in PARTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["gpu-check.json", "gpu-check.md", *logs])


@pytest.mark.integration
@pytest.mark.slow
def test_make_gpu_check_without_a_gpu_is_a_dry_run_that_passes(tmp_path: Path) -> None:
    # what `make gpu-check` runs, with this interpreter's environment as the .venv
    env_root = Path(sys.prefix)
    if not (env_root / "bin" / "python").exists():
        pytest.skip("the tests do not run in a virtual environment")
    report = dry_run(tmp_path, ["env", f"VENV={env_root}", "bash", "benchmarks/gpu_check.sh"])
    assert list(report["parts"]) == PARTS and report["shapes"] == "cpu"


def fake(name: str, mode: str, needs: tuple[str, ...] = ()) -> gpu_check.Part:
    return gpu_check.Part(name, f"fake {name}", "tests.programs.fake_part", needs, (mode,), (mode,), 60, 60)


def alive(pid: int) -> bool:
    try:  # a killed process whose parent is gone may linger as a zombie until init reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.integration
def test_a_part_past_its_limit_is_killed_with_what_it_started_and_keeps_its_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work, out, pids = tmp_path / "work", tmp_path / "out", tmp_path / "pids"
    work.mkdir()
    out.mkdir()
    monkeypatch.setenv("FAKE_PART_PIDS", str(pids))
    entry = gpu_check.run_part(fake("hang", "hang"), ("hang",), work, out, limit=3)
    assert entry["status"] == "timed out" and entry["why"] == "stopped after 3 s"
    assert entry["figures"] == {"value": 0.5}  # what it measured before the limit
    assert [alive(int(pid)) for pid in pids.read_text().split()] == [False, False]  # the grandchild too
    assert not (work / "hang").exists() and (out / "hang.log").is_file()


@pytest.mark.integration
def test_a_failing_part_is_reported_and_the_check_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [fake("good", "ok"), fake("bad", "fail"), fake("lacks", "ok", ("no_such_pkg",))]
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--out", str(tmp_path), "--shapes", "cpu"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert stop.value.code == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    parts = report["parts"]
    assert [parts[n]["status"] for n in ("good", "bad", "lacks")] == ["ok", "failed", "skipped"]
    assert "the device fell over" in parts["bad"]["output"] and "no_such_pkg" in parts["lacks"]["why"]
    table = (tmp_path / "gpu-check.md").read_text()
    assert "the device fell over" in table and "skipped: needs no_such_pkg" in table


def gpu_report(mfu: float, vs_trainer: float, gqa8: float, mqa: float) -> dict:
    """A report as a GPU run writes it, with the figures the targets read."""
    best = {
        "uptrain train": {"tokens_per_s": 9.0, "vs_trainer": vs_trainer, "mfu": mfu, "peak_memory_bytes": 1},
        "transformers Trainer": {"tokens_per_s": 8.0, "vs_trainer": 1.0, "mfu": 0.3, "peak_memory_bytes": 1},
    }
    rows = [
        {"kv_heads": g, "attention": a, "vs_mha": ratio}
        for g, ratio in ((32, 1.0), (8, gqa8), (1, mqa))
        for a in ("sdpa", "uptrain_sdpa")
    ]
    return {"gpu": True, "shapes": "gpu", "parts": {"train": {"figures": {"best": best}},
                                                     "decode": {"figures": {"heads": 32, "rows": rows}}}}  # fmt: skip


def test_the_targets_say_whether_each_was_met_and_by_how_much_it_was_missed() -> None:
    met = targets(gpu_report(mfu=0.52, vs_trainer=1.3, gqa8=2.4, mqa=3.1))
    assert [t["met"] for t in met] == [True, True, True, True]
    missed = targets(gpu_report(mfu=0.312, vs_trainer=0.95, gqa8=1.5, mqa=2.7))
    assert [t["met"] for t in missed] == [False, False, False, False]
    assert [t["measured"] for t in missed] == [
        "31.2%: 13.8 points short (69% of the target)",
        "0.95x: 0.05x short (95% of the target)",
        "1.50x: 0.50x short (75% of the target)",
        "2.70x: 0.30x short (90% of the target)",
    ]
    assert targets({"gpu": True, "shapes": "gpu", "parts": {}})[0]["measured"] == "not measured"


def check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, parts: list, *args: str) -> tuple:
    """Run the check in this process on `parts` (fakes); its exit status, stdout and stderr."""
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--shapes", "cpu", *args])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "a file":
        (tmp_path / "out").write_text("mine")
        return tmp_path / "out"
    if kind == "under a file":
        (tmp_path / "file").write_text("mine")
        return tmp_path / "file" / "out"
    if os.geteuid() == 0:  # root writes through a folder's mode bits; sysfs refuses even root
        return Path("/sys/kernel")
    (tmp_path / "out").mkdir(mode=0o555)
    return tmp_path / "out"


@pytest.mark.parametrize("kind", ["a file", "under a file", "a read-only folder"])
def test_an_out_that_cannot_hold_the_report_is_refused_in_one_line_before_any_part_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, kind: str
) -> None:
    out = unwritable(tmp_path, kind)
    code, stdout, err = check(monkeypatch, capsys, [fake("good", "ok")], "--out", str(out))
    assert code == 2 and "good" not in stdout  # no part ran, so no measurement was lost
    assert len(err.strip().splitlines()) == 1 and err.startswith("gpu-check: error: ") and str(out) in err
    if kind == "a file":
        assert out.read_text() == "mine"


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_below_one_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, jobs: str
) -> None:
    code, _, err = check(monkeypatch, capsys, [fake("good", "ok")], "--out", str(tmp_path), "--jobs", jobs)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--jobs" in err and jobs in err
    assert not (tmp_path / "gpu-check.json").exists()


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "inf"])
def test_a_budget_that_cannot_work_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, budget: str
) -> None:
    code, _, err = check(monkeypatch, capsys, [fake("good", "ok")], "--out", str(tmp_path), "--budget", budget)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--budget" in err


@pytest.mark.integration
def test_the_report_is_replaced_whole_and_never_written_through_a_planted_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("not the check's")
    for name in ("gpu-check.json", "gpu-check.md"):  # the fixed temporary names the check once wrote through
        (out / f".{name}.partial").symlink_to(victim)
    code, _, _ = check(monkeypatch, capsys, [fake("good", "ok")], "--out", str(out))
    assert code == 0 and victim.read_text() == "not the check's"
    assert json.loads((out / "gpu-check.json").read_text())["parts"]["good"]["status"] == "ok"
    assert sorted(p.name for p in out.iterdir() if "uptrain-tmp" in p.name) == []


@pytest.mark.integration
def test_a_part_the_check_cannot_run_is_reported_and_the_other_parts_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = gpu_check.run_part

    def run_part(part: gpu_check.Part, *args: object, **kwargs: object) -> dict:
        if part.name == "broken":
            raise OSError(28, "No space left on device")
        return real(part, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "run_part", run_part)
    code, _, _ = check(monkeypatch, capsys, [fake("broken", "ok"), fake("good", "ok")], "--out", str(tmp_path))
    parts = json.loads((tmp_path / "gpu-check.json").read_text())["parts"]
    assert code == 1 and parts["good"]["status"] == "ok"
    assert parts["broken"]["status"] == "failed" and "No space left on device" in parts["broken"]["why"]


def stopped_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple:
    """The check on three fake parts (ok, hang, ok), sent SIGTERM while the second one hangs: its exit status,
    its report as it stood just before the signal, its final report, and the hanging part's processes."""
    out, pids = tmp_path / "out", tmp_path / "pids"
    monkeypatch.setenv("FAKE_PART_PIDS", str(pids))
    before: dict = {}

    def stop_while_it_hangs() -> None:
        deadline = time.monotonic() + 30
        while not pids.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        before.update(json.loads((out / "gpu-check.json").read_text()))
        os.kill(os.getpid(), signal.SIGTERM)

    def not_pytest(signum: int, frame: object) -> None:  # a check that does not catch SIGTERM must not end the suite
        raise RuntimeError("SIGTERM reached the test")

    previous = signal.signal(signal.SIGTERM, not_pytest)
    threading.Thread(target=stop_while_it_hangs, daemon=True).start()
    try:
        parts = [fake("first", "ok"), fake("hang", "hang"), fake("last", "ok")]
        code, _, err = check(monkeypatch, capsys, parts, "--out", str(out))
    finally:
        assert signal.getsignal(signal.SIGTERM) is not_pytest  # the check put the handler back
        signal.signal(signal.SIGTERM, previous)
    after = json.loads((out / "gpu-check.json").read_text())
    return code, err, before, after, [int(pid) for pid in pids.read_text().split()]


@pytest.mark.integration
def test_while_a_part_runs_the_report_holds_the_parts_done_and_names_the_running_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _, _, before, _, _ = stopped_check(tmp_path, monkeypatch, capsys)
    # what a check killed outright (SIGKILL, the end of a lease) leaves behind
    assert {name: entry["status"] for name, entry in before["parts"].items()} == {
        "first": "ok",
        "hang": "running",
        "last": "waiting",
    }


@pytest.mark.integration
def test_a_check_stopped_by_sigterm_stops_the_running_part_and_keeps_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    code, err, _, after, pids = stopped_check(tmp_path, monkeypatch, capsys)
    assert code == 128 + signal.SIGTERM and "SIGTERM" in err
    parts = after["parts"]
    assert parts["first"]["status"] == "ok"
    assert parts["hang"]["status"] == "stopped" and parts["hang"]["figures"] == {"value": 0.5}
    assert parts["last"]["status"] == "not run" and "SIGTERM" in parts["last"]["why"]
    assert [alive(pid) for pid in pids] == [False, False]  # the part and the grandchild it started
    assert "stopped" in (tmp_path / "out" / "gpu-check.md").read_text()


def fake_python(tmp_path: Path, has_torch: bool) -> Path:
    """A python3 that answers only whether it has torch (its exit status), as the Makefile and gpu_check.sh ask."""
    python = tmp_path / ("python-with-torch" if has_torch else "python-without-torch")
    python.write_text(f"#!/bin/sh\nexit {0 if has_torch else 1}\n")
    python.chmod(0o755)
    return python


def make_dry_run(tmp_path: Path, python: Path) -> list[str]:
    """What `make gpu-check` would run, in order, without running it, where there is no .venv."""
    venv = tmp_path / "no-venv"
    cmd = ["make", "-n", "--no-print-directory", "gpu-check", f"VENV={venv}", f"PYTHON={python}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not venv.exists()
    return proc.stdout.splitlines()


@pytest.mark.integration
def test_make_gpu_check_on_a_fresh_clone_creates_the_venv_before_it_runs_the_check(tmp_path: Path) -> None:
    python = fake_python(tmp_path, has_torch=False)
    lines = make_dry_run(tmp_path, python)
    creates = next(i for i, line in enumerate(lines) if f"{python} -m venv {tmp_path / 'no-venv'}" in line)
    runs = next(i for i, line in enumerate(lines) if "benchmarks/gpu_check.sh" in line)
    assert creates < runs and any("pip install" in line and "-e ." in line for line in lines[creates:runs])


@pytest.mark.integration
def test_make_gpu_check_on_a_bare_gpu_machine_runs_its_python_with_torch_and_installs_nothing(tmp_path: Path) -> None:
    lines = make_dry_run(tmp_path, fake_python(tmp_path, has_torch=True))
    assert [line for line in lines if "benchmarks/gpu_check.sh" in line] == lines


@pytest.mark.integration
def test_gpu_check_sh_without_a_venv_or_torch_says_what_to_run_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "VENV": str(tmp_path / "no-venv"), "PYTHON": str(fake_python(tmp_path, has_torch=False))}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("gpu-check: ") and "make setup" in proc.stderr
