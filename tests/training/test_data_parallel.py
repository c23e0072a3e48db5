"""Data parallel on CPU: `torchrun --nproc_per_node 2` (gloo) against 1 process, same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests import free_port, make_tiny_run, programs
from tests.families import tensors

pytestmark = pytest.mark.integration  # torchrun launches of the real CLI

TOLERANCE = 1e-5  # |Δ| between the runs: the order of float reductions, not another computation


def launch(processes: int, out: Path, config: Path) -> None:
    """`torchrun` of the real CLI, recording which training blocks each process read (tests.programs.record_reads)."""
    out.mkdir(parents=True)
    runner = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
              f"--master_port={free_port()}"]  # fmt: skip
    cmd = [*runner, *programs.module("record_reads"), str(out), "train", str(config), f"--out={out / 'run'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=programs.environment(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The same run in 1 and in 2 processes (run once for every test of this file)."""
    root = tmp_path_factory.mktemp("ddp")
    tiny_run = make_tiny_run(root)
    cfg = {**tiny_run["config"], "checkpoint": {"every": 0, "keep": 1}}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = {}
    for processes in (1, 2):
        launch(processes, root / f"p{processes}", config)
        out[processes] = root / f"p{processes}"
    return out


def test_two_processes_follow_the_one_process_trajectory(runs: dict[int, Path]) -> None:
    def rows(p: Path) -> list[dict]:
        return [json.loads(line) for line in (p / "run" / "metrics.jsonl").read_text().splitlines()]

    one, two = rows(runs[1]), rows(runs[2])
    assert [(r["step"], r.keys() - {"tokens_per_s", "mfu"}) for r in one] == [
        (r["step"], r.keys() - {"tokens_per_s", "mfu"}) for r in two
    ]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "val_loss", "lr", "tokens"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOLERANCE * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert one[-1]["val_loss"] < 0.6 * one[0]["val_loss"]  # it learned
    w1, w2 = tensors(runs[1] / "run" / "model"), tensors(runs[2] / "run" / "model")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= TOLERANCE


def test_each_process_read_its_own_part(runs: dict[int, Path]) -> None:
    one = json.loads((runs[1] / "reads-0.json").read_text())
    rank0 = json.loads((runs[2] / "reads-0.json").read_text())
    rank1 = json.loads((runs[2] / "reads-1.json").read_text())
    assert len(one) == 30 * 8 and len(rank0) == len(rank1) == 30 * 4
    assert not set(rank0) & set(rank1), "the processes read different blocks"
    assert sorted(rank0 + rank1) == sorted(one), "together they read what the single process read"
    interleaved = [x for i in range(30) for x in rank0[4 * i : 4 * i + 4] + rank1[4 * i : 4 * i + 4]]
    assert interleaved == one, "step by step, the same global batches"
    assert torch.tensor(one).unique().numel() == len(one)  # one epoch: no block twice


def test_the_ddp_wrapper_is_freed_before_the_process_group(runs: dict[int, Path]) -> None:
    """Its gradient reducer holds the process group: freed after the group is unregistered, it would destroy
    gloo's group while holding the GIL that a gloo worker thread may still wait for (a hang at exit)."""
    for rank in (0, 1):
        assert json.loads((runs[2] / f"ddp-alive-{rank}.json").read_text()) == [0], rank


def test_a_ddp_step_checkpoint_exports_to_the_final_model(runs: dict[int, Path], run_cli) -> None:
    run = runs[2] / "run"
    code, _, err = run_cli("export", run / "checkpoints" / "step-00000030", runs[2] / "exported")
    assert code == 0 and "of a replicated checkpoint" in err, err
    exported, final = tensors(runs[2] / "exported"), tensors(run / "model")
    assert exported.keys() == final.keys()
    assert all(torch.equal(t, exported[k]) for k, t in final.items())


@pytest.mark.slow  # three launches of 2 processes (~1 min on 2 cores); one process runs by default (test_training)
def test_a_two_process_streamed_mixture_stopped_and_resumed_ends_bitwise(tmp_path: Path) -> None:
    """Each process streams its own part of both sources; SIGTERM at step 7 (agreed at 10, the next
    read-back), resume, and the weights and every logged loss are those of the uninterrupted 2-process run."""
    from uptrain_gqa.synthetic import write_corpus

    tiny = make_tiny_run(tmp_path)
    other = write_corpus(tmp_path / "other.jsonl", docs=1000, seed=7, fmt="jsonl")  # ~5 held out per process
    mixture = [
        {"label": "main", "weight": 0.7, "files": tiny["config"]["data"]["files"]},  # 400 .txt: split by file
        {"label": "other", "weight": 0.3, "files": [str(other)]},  # one .jsonl: split by document
    ]
    data = {"mixture": mixture, "streaming": True, "seq_len": 32, "validation_blocks": 4, "shuffle_buffer": 300}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({**tiny["config"], "data": data, "budget": {"steps": 16}}))

    def run(out: Path, *extra: str, program: list[str] | None = None) -> subprocess.CompletedProcess:
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
        cmd = [*runner, *(program or ["-m", "uptrain_gqa"]), "train", str(config), f"--out={out}", *extra]
        return subprocess.run(
            cmd, capture_output=True, text=True, env=programs.environment(STOP_AT_STEP="7"), timeout=600
        )

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stop = run(tmp_path / "stopped", program=programs.module("stop_at_step"))
    assert "stopped by SIGTERM at step 10: checkpoint saved" in stop.stderr, stop.stderr[-3000:]
    one = [sys.executable, "-m", "uptrain_gqa", "train", str(config), f"--out={tmp_path / 'stopped'}", "--resume"]
    alone = subprocess.run(one, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert alone.returncode == 1 and "holds the stream positions of 2 processes, not 1" in alone.stderr, alone.stderr
    resume = run(tmp_path / "stopped", "--resume")
    assert resume.returncode == 0 and "at step 10" in resume.stderr, resume.stderr[-3000:]
    reference, resumed = tensors(tmp_path / "straight" / "model"), tensors(tmp_path / "stopped" / "model")
    assert all(torch.equal(t, resumed[name]) for name, t in reference.items()), "bitwise the same weights"

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "straight") == losses(tmp_path / "stopped") and len(losses(tmp_path / "straight")) == 4
    state = torch.load(tmp_path / "stopped" / "checkpoints" / "step-00000010" / "custom_checkpoint_0.pkl")
    assert [(s["rank"], s["world"]) for s in state["data"]] == [(0, 2), (1, 2)]  # each process's own position
