"""The launch scripts users submit, run here on CPU: scripts/launch_slurm.sbatch under a fake Slurm
(`srun` runs the one node's task, `scontrol` answers and records requeues).

A SIGTERM to the batch script (Slurm's --signal=B:TERM before the time limit, or preemption) must reach
every rank through srun and the launcher, end with one checkpoint after a finished step, and requeue
the job; the requeued job resumes from that checkpoint. Overrides keep their spaces and globs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import ROOT, free_port

pytestmark = pytest.mark.integration  # runs the Slurm launch script (bash, then uptrain)

FAKE_SRUN = """#!/usr/bin/env bash
# one task, on this machine (node 0), in place of srun's: its own options are skipped
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
    show) echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
    *) exit 1 ;;
esac
"""


def fake_slurm(root: Path) -> dict[str, str]:
    bin_dir = root / "fake-slurm"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {
        **os.environ,
        "PATH": path,
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "node001",
        "SLURM_SUBMIT_DIR": str(ROOT),
        "GPUS_PER_NODE": "2",  # processes per node; here over gloo
        "MAIN_PORT": str(free_port()),
        "STOP_GRACE_SECONDS": "120",
        "FAKE_SLURM_LOG": str(root / "slurm.log"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


def sbatch(env: dict[str, str], *args: str) -> subprocess.Popen:
    script = ROOT / "scripts" / "launch_slurm.sbatch"
    return subprocess.Popen(["bash", str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.mark.slow  # three launches of the Slurm script, ~25 s
def test_sigterm_checkpoints_requeues_and_the_requeued_job_resumes(tiny_run: dict) -> None:
    root = tiny_run["root"]
    cfg = {**tiny_run["config"], "checkpoint": {"every": 10, "keep": 2}, "budget": {"steps": 100_000}}
    cfg["logging"] = {**cfg["logging"], "every": 50, "eval_every": 0}
    cfg["data"] = {**cfg["data"], "files": ["overridden/on/the/command/line/*.txt"]}
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = root / "a run dir"  # a space in an override
    overrides = [f"--out={out}", f"--data.files=[{tiny_run['corpus']}/*.txt]"]  # a glob for uptrain, not bash
    env = fake_slurm(root)

    job = sbatch(env, str(config), *overrides)
    wait_for(out / "checkpoints" / "step-00000010", job)
    job.send_signal(signal.SIGTERM)  # what Slurm sends the batch script
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert (root / "slurm.log").read_text() == "requeue 4242\n"
    assert "stopped by SIGTERM at step" in err and "requeueing job 4242" in err
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    step = int(latest.name.removeprefix("step-"))
    assert step >= 10 and f"stopped by SIGTERM at step {step}: checkpoint saved to {latest}" in err
    assert {p.name for p in (latest / "sharded").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert not (out / "model").exists()

    # the requeued job (told to end two steps later) continues from that checkpoint and finishes
    job = sbatch(env, str(config), *overrides, f"--budget.steps={step + 2}")
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert f"resumed from {latest} at step {step}" in err
    assert (out / "model" / "model.safetensors").is_file()
    assert (root / "slurm.log").read_text() == "requeue 4242\n", "no second requeue"
    assert (ROOT / "logs").is_dir()  # where Slurm writes the job's output
