"""The prepared GPU check (scripts/gpu_check.py) without a GPU: the dry run of every part with tiny shapes,
what happens to a part that fails, hangs or lacks a package, and the targets its report judges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import gpu_check
from scripts.gpu_check_report import targets
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


@pytest.mark.slow  # 45 s on 2 cores: every part of the GPU check on the CPU; make test-all
def test_the_dry_run_runs_every_part_and_writes_both_tables(tmp_path: Path) -> None:
    # two parts at a time: the same parts and tables as `make gpu-check` without a GPU, in about half the time
    report = dry_run(tmp_path, [sys.executable, "-m", "scripts.gpu_check", "--shapes", "cpu", "--jobs", "2"])
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


@pytest.mark.slow
def test_make_gpu_check_without_a_gpu_is_a_dry_run_that_passes(tmp_path: Path) -> None:
    # what `make gpu-check` runs, with this interpreter's environment as the .venv
    env_root = Path(sys.prefix)
    if not (env_root / "bin" / "python").exists():
        pytest.skip("the tests do not run in a virtual environment")
    report = dry_run(tmp_path, ["env", f"VENV={env_root}", "bash", "scripts/gpu_check.sh"])
    assert list(report["parts"]) == PARTS and report["shapes"] == "cpu"


def fake(name: str, mode: str, needs: tuple[str, ...] = ()) -> gpu_check.Part:
    return gpu_check.Part(name, f"fake {name}", "tests.fake_part", needs, (mode,), (mode,), 60, 60)


def alive(pid: int) -> bool:
    try:  # a killed process whose parent is gone may linger as a zombie until init reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


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
