"""FSDP2 on CPU over gloo, through the launch line users type on GPUs:
`accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 -m uptrain_gqa train RUN.yaml`.

Two sharded processes follow the one-process run with the same global batch, write DCP checkpoints
from both ranks, stop on SIGTERM to the launcher and resume to the uninterrupted weights, and gather
a final model that transformers loads; in `make test-all` also two "nodes" on one machine (c10d
rendezvous), the bf16 policy and a sharded distillation teacher.
The tiny model ties its input and output embeddings, the case sharding most easily gets wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests import ROOT, free_port, make_tiny_run, programs
from tests.families import tensors
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.training.parallel import claim_sharding
from uptrain_gqa.training.sharding import SHARDED_FOLDER, ShardingPlan

TOLERANCE = 1e-5  # |Δ| against the one-process run: the order of float reductions, not another computation
STOP_AT = 17
AGREED_AT = 20  # several processes agree on a stop at their next read-back step (logging.every = 5)


def accelerate(*launch: str, program: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), *launch, *program]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env or programs.environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def train(config: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "uptrain_gqa", "train", str(config), f"--out={out}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp2")
    tiny = make_tiny_run(root, tie_word_embeddings=True)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny["config"], "checkpoint": {"every": 10, "keep": 3}}))
    logs = {}

    one = subprocess.run(
        [sys.executable, *train(config, root / "one")], env=programs.environment(), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-3000:]

    code, logs["two"] = finish(accelerate("--num_processes", "2", "--main_process_port", str(free_port()),
                                          program=train(config, root / "two", "--verbose")))  # fmt: skip
    assert code == 0, logs["two"][-3000:]

    return {"root": root, "tiny": tiny, "logs": logs, "config": config}


@pytest.fixture(scope="module")
def stopped(runs: dict) -> dict:
    """A two-process run stopped by SIGTERM at STOP_AT, then resumed (two more launches)."""
    root, config, logs = runs["root"], runs["config"], {}
    stop = accelerate("--num_processes", "2", "--main_process_port", str(free_port()),
                      program=[*programs.module("stop_at_step"), *train(config, root / "stopped")[2:]],
                      env=programs.environment(STOP_AT_STEP=str(STOP_AT)))  # fmt: skip
    logs["stop_code"], logs["stop"] = finish(stop)
    code, logs["resume"] = finish(accelerate("--num_processes", "2", "--main_process_port", str(free_port()),
                                             program=train(config, root / "stopped", "--resume")))  # fmt: skip
    assert code == 0, logs["resume"][-3000:]
    return logs


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, run: Path) -> None:
    a, b = rows(reference), rows(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "val_loss", "grad_norm", "lr", "tokens"):
            if key in x:
                assert abs(x[key] - y[key]) <= TOLERANCE * max(1.0, abs(x[key])), (x["step"], key, x[key], y[key])
    w1, w2 = tensors(reference / "model"), tensors(run / "model")
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= TOLERANCE


@pytest.mark.integration
def test_two_sharded_processes_follow_the_one_process_run(runs: dict) -> None:
    root, log = runs["root"], runs["logs"]["two"]
    assert "plain data parallel" not in log
    assert "chunked cross-entropy" in log  # the head weight read outside the forward, whole (root unit gathered)
    holds = [line for line in log.splitlines() if "FSDP2 over 2 processes" in line]
    assert len(holds) == 1 and "this process holds" in holds[0]  # logged by rank 0
    local, total = (int(n.replace(",", "")) for n in holds[0].split("holds ")[1].split(" parameters")[0].split(" of "))
    assert local < 0.6 * total, "rank 0 holds about half the parameters"
    assert rows(root / "one")[-1]["val_loss"] < 0.6 * rows(root / "one")[0]["val_loss"]  # it learned
    assert_same_run(root / "one", root / "two")


@pytest.mark.integration
def test_checkpoints_hold_one_shard_file_per_rank(runs: dict) -> None:
    steps = sorted((runs["root"] / "two" / "checkpoints").glob("step-*"))
    assert [s.name for s in steps] == ["step-00000010", "step-00000020", "step-00000030"]
    for step in steps:
        files = sorted(p.name for p in (step / SHARDED_FOLDER).iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], files
        assert (step / "random_states_0.pkl").is_file() and (step / "random_states_1.pkl").is_file()


@pytest.mark.integration
@pytest.mark.slow  # two more launches (~20 s); the one-process stop/resume runs by default
def test_sigterm_to_the_launcher_saves_then_resume_ends_at_the_uninterrupted_weights(runs: dict, stopped: dict) -> None:
    root, logs = runs["root"], stopped
    assert logs["stop_code"] != 0, "the launcher reports the stop as a failure (1), whatever the workers did"
    assert f"stopped by SIGTERM at step {AGREED_AT}: checkpoint saved" in logs["stop"]
    assert (
        f"resumed from {root / 'stopped' / 'checkpoints' / f'step-{AGREED_AT:08d}'} at step {AGREED_AT}"
        in logs["resume"]
    )
    reference, resumed = tensors(root / "two" / "model"), tensors(root / "stopped" / "model")
    for name, t in reference.items():
        assert torch.equal(t, resumed[name]), name  # bitwise: the DCP round trip is exact
    losses = {run: [r["loss"] for r in rows(root / run) if "loss" in r] for run in ("two", "stopped")}
    assert losses["two"] == losses["stopped"]


@pytest.mark.integration
def test_the_gathered_model_loads_in_transformers_and_generates(runs: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = runs["root"] / "two" / "model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the cat sat on the mat", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    one = AutoModelForCausalLM.from_pretrained(runs["root"] / "one" / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, one(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.integration
@pytest.mark.slow  # two more launches, ~10 s
def test_two_nodes_with_activation_checkpointing_agree_with_one_node(runs: dict) -> None:
    root = runs["root"]
    port = str(free_port())  # two machines of one process each, c10d rendezvous on this one
    node = ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", port, "--rdzv_backend", "c10d"]  # fmt: skip
    # with activation checkpointing, which recomputes but must not change the result
    nodes = train(root / "run.yaml", root / "nodes", "--model.gradient_checkpointing=true")
    first = accelerate(*node, "--machine_rank", "0", program=nodes)
    second = accelerate(*node, "--machine_rank", "1", "--rdzv_conf", "is_host=0", program=nodes)
    for proc in (first, second):
        code, log = finish(proc)
        assert code == 0, log[-3000:]
    assert_same_run(root / "one", root / "nodes")
    shards = runs["root"] / "nodes" / "checkpoints" / "step-00000030" / SHARDED_FOLDER
    assert (shards / "__0_0.distcp").is_file() and (shards / "__1_0.distcp").is_file()


def test_the_launcher_settings_become_the_sharding_plan() -> None:
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}  # fmt: skip
    plan = claim_sharding(env)
    assert plan == ShardingPlan(
        reshard_after_forward=False, activation_checkpointing=True, layer_classes=("LlamaDecoderLayer",)
    )
    assert "ACCELERATE_USE_FSDP" not in env, "accelerate only starts the processes"
    assert claim_sharding({}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "set fsdp_version: 2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "FULL_SHARD"),
    ],
)
def test_unsupported_launches_are_refused_clearly(env: dict, message: str) -> None:
    with pytest.raises(UptrainError, match=message):
        claim_sharding(env)


@pytest.mark.integration
def test_a_sharded_step_checkpoint_exports_to_the_same_model(run_cli, runs: dict) -> None:
    root = runs["root"]
    code, _, err = run_cli("export", root / "two" / "checkpoints" / "step-00000030", root / "exported")
    assert code == 0 and "step 30 (7,680 tokens) of a sharded checkpoint" in err, err
    exported, final = tensors(root / "exported"), tensors(root / "two" / "model")
    assert exported.keys() == final.keys()
    for name, t in final.items():
        assert torch.equal(t, exported[name]), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "exported")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # an earlier step is a different model, and a folder that is not a checkpoint is refused
    assert run_cli("export", root / "two" / "checkpoints" / "step-00000010", root / "step10")[0] == 0
    assert not torch.equal(tensors(root / "step10")["model.norm.weight"], final["model.norm.weight"])
    code, _, err = run_cli("export", root / "two", root / "nothing")
    assert code == 1 and "is not an uptrain step checkpoint" in err and not (root / "nothing").exists()


@pytest.mark.integration
def test_a_damaged_sharded_checkpoint_is_refused_in_one_line(run_cli, runs: dict) -> None:
    """A missing, truncated or empty .distcp shard, or a truncated .metadata: one line naming the checkpoint."""
    import shutil

    good = runs["root"] / "two" / "checkpoints" / "step-00000030"
    shards = sorted((good / "sharded").glob("*.distcp"))
    damages = {
        "missing": lambda c: (c / "sharded" / shards[-1].name).unlink(),
        "truncated": lambda c: os.truncate(c / "sharded" / shards[0].name, 100),
        "empty": lambda c: os.truncate(c / "sharded" / shards[0].name, 0),
        "metadata": lambda c: os.truncate(c / "sharded" / ".metadata", 10),
    }
    for name, damage in damages.items():
        copy = runs["root"] / "damaged" / name
        shutil.copytree(good, copy)
        damage(copy)
        code, _, err = run_cli("export", copy, runs["root"] / f"out-{name}")
        assert code == 1 and f"{copy}" in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and not (runs["root"] / f"out-{name}").exists(), (name, err)


@pytest.mark.integration
@pytest.mark.slow  # one more launch, ~10 s
def test_the_bf16_policy_computes_in_bf16_and_keeps_fp32_master_weights(runs: dict) -> None:
    """The GPU default: bf16 compute and all-gathers, fp32 gradient reduction and master weights."""
    root = runs["root"]
    program = train(root / "run.yaml", root / "bf16", "--mixed_precision=bf16")
    code, log = finish(accelerate("--num_processes", "2", "--main_process_port", str(free_port()), program=program))
    assert code == 0, log[-3000:]
    assert "FSDP2 over 2 processes (cpu, precision bf16)" in log
    fp32, bf16 = rows(root / "one"), rows(root / "bf16")
    for a, b in zip(fp32, bf16, strict=True):
        for key in ("loss", "val_loss"):
            if key in a:  # bf16 rounding, not a different computation
                assert abs(a[key] - b[key]) <= 0.01 * abs(a[key]), (a["step"], key, a[key], b[key])
    weights = tensors(root / "bf16" / "model")
    # master weights stay fp32: bf16 master weights would all be bf16-representable
    assert any(bool((t != t.to(torch.bfloat16).float()).any()) for t in weights.values()), "fp32 master weights"
    assert any(not torch.equal(weights[k], tensors(root / "two" / "model")[k]) for k in weights), "bf16 did run"


def checkpoint_files(step: Path) -> dict[str, int | None]:
    """A checkpoint's files with their byte sizes (None for those that name the run, its folder or the time)."""
    skip = ("uptrain_train.yaml", "train_state.json", ".metadata")  # DCP's .metadata records the folder's path
    return {p.relative_to(step).as_posix(): None if p.name in skip else p.stat().st_size
            for p in sorted(step.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow  # two more launches, ~18 s; the one-process teacher-free checkpoints run by default
def test_a_distillation_teacher_is_sharded_too_and_kept_out_of_checkpoints(runs: dict) -> None:
    """With distill.teacher, two sharded processes follow the one-process run, and the step checkpoint holds
    exactly the files (and byte sizes) of a run without a teacher: no rank saves the frozen source."""
    root, tiny = runs["root"], runs["tiny"]
    distill = [f"--distill.teacher={tiny['source']}", "--distill.weight=0.5", "--distill.temperature=2.0",
               "--budget.steps=10"]  # fmt: skip
    one = subprocess.run([sys.executable, *train(root / "run.yaml", root / "distill-one", *distill)],
                         env=programs.environment(), capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    code, log = finish(accelerate("--num_processes", "2", "--main_process_port", str(free_port()),
                                  program=train(root / "run.yaml", root / "distill-two", *distill)))  # fmt: skip
    assert code == 0, log[-3000:]
    assert_same_run(root / "distill-one", root / "distill-two")
    for x, y in zip(rows(root / "distill-one"), rows(root / "distill-two"), strict=True):
        if "ce" in x:  # the KL term took part, and agrees too
            assert x["ce"] != x["loss"] and abs(x["ce"] - y["ce"]) <= TOLERANCE * abs(x["ce"]), x["step"]
    step = "checkpoints/step-00000010"
    assert checkpoint_files(root / "distill-two" / step) == checkpoint_files(root / "two" / step)
    import torch.distributed.checkpoint as dcp

    stored = [set(dcp.FileSystemReader(str(root / run / step / SHARDED_FOLDER)).read_metadata().state_dict_metadata)
              for run in ("two", "distill-two")]  # fmt: skip
    assert stored[0] == stored[1]  # the same tensors, none of the teacher's
    assert "Removed shared tensor" not in log


@pytest.mark.integration
@pytest.mark.slow  # two more launches (~25 s); the one-process optim.trainable test runs by default
def test_frozen_parameters_shard_and_follow_the_one_process_run(runs: dict) -> None:
    """optim.trainable under FSDP2: only attention moves, and two sharded processes match one process."""
    root, tiny = runs["root"], runs["tiny"]
    config, frozen = root / "run.yaml", ["--optim.trainable=self_attn", "--budget.steps=3"]
    one = subprocess.run([sys.executable, *train(config, root / "frozen-one", *frozen)],
                         env=programs.environment(), capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    code, log = finish(accelerate("--num_processes", "2", "--main_process_port", str(free_port()),
                                  program=train(config, root / "frozen-two", *frozen)))  # fmt: skip
    assert code == 0, log[-3000:]
    assert_same_run(root / "frozen-one", root / "frozen-two")
    start, end = tensors(tiny["model"]), tensors(root / "frozen-two" / "model")
    moved = {n for n in start if not torch.equal(start[n], end[n])}
    assert moved and all(".self_attn." in n for n in moved)


def _fill_disk_on_rank_1(root: Path, config: Path, phase: str) -> tuple[int, str, Path]:
    out = root / f"full-{phase}"
    proc = accelerate("--num_processes", "2", "--main_process_port", str(free_port()),
                      program=[*programs.module("fill_disk_on_rank_1"), *train(config, out)[2:]],
                      env=programs.environment(FULL_IN=phase))  # fmt: skip
    code, err = finish(proc)
    return code, err, out


def _assert_stopped_on_a_full_disk(code: int, err: str, out: Path) -> None:
    assert code == 1, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("uptrain train: error:")]
    assert ours and all("cannot write checkpoint step-00000020" in line for line in ours), err[-3000:]
    assert all("make room" in line and "resume from step-00000010, which is intact" in line for line in ours), ours
    assert all(": the disk is full (" in line and "free there) (rank" in line for line in ours), ours  # DCP: ranks 0, 1
    assert not [line for line in err.splitlines() if line.startswith("[rank")], "a worker printed a traceback"
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000010"]  # intact, no partial folder


@pytest.mark.integration
@pytest.mark.slow  # one more launch (~12 s); the one-process full-disk tests run by default
def test_a_full_disk_on_one_rank_stops_every_rank_in_one_line(runs: dict) -> None:
    """accelerate's part of the checkpoint fails on rank 1 only: without agreeing first, rank 0 would wait
    in DCP's collective for ever."""
    root = runs["root"]
    code, err, out = _fill_disk_on_rank_1(root, root / "run.yaml", "state")
    _assert_stopped_on_a_full_disk(code, err, out)


@pytest.mark.integration
@pytest.mark.slow  # one more launch (~12 s)
def test_a_full_disk_inside_dcp_on_one_rank_stops_every_rank_in_one_line(runs: dict) -> None:
    root = runs["root"]
    code, err, out = _fill_disk_on_rank_1(root, root / "run.yaml", "dcp")
    _assert_stopped_on_a_full_disk(code, err, out)
