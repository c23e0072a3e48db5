"""`uptrain train` on CPU: learning, outputs, exact resume, signals, NaN, distillation."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import make_tiny_run
from tests.families import tensors
from uptrain_gqa.synthetic import write_corpus
from uptrain_gqa.training import loop as trainlib
from uptrain_gqa.training.checkpointer import TRAIN_CONFIG, checkpoints
from uptrain_gqa.training.metrics import METRICS


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def test_converted_model_trains_and_validation_loss_falls(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    code, _, err = run_cli("train", cfg)
    assert code == 0, err
    run = Path(tiny_run["config"]["out"])
    rows = metrics(run)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 10, 20, 30]
    assert val[-1] < 0.6 * val[0], val
    train_rows = [r for r in rows if "loss" in r]
    assert {"lr", "grad_norm", "tokens_per_s"} <= train_rows[-1].keys()
    assert not any("mfu" in r for r in rows)  # a CPU run: utilisation of a GPU's peak would mean nothing
    assert train_rows[-1]["tokens"] == 30 * 8 * 32
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.num_key_value_heads == 2
    assert AutoTokenizer.from_pretrained(run / "model")("the cat sees the moon .")["input_ids"][0] == 1
    assert (run / "model" / "uptrain_conversion.json").is_file()
    assert yaml.safe_load((run / TRAIN_CONFIG).read_text())["optim"]["lr"] == 3e-3
    assert [p.name for p in checkpoints(run)] == ["step-00000020", "step-00000030"]  # keep: 2
    assert (checkpoints(run)[-1] / TRAIN_CONFIG).is_file()
    assert oct((run / "model").stat().st_mode & 0o777) != oct(0o700)


def test_overrides_and_the_saved_config(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    code, _, err = run_cli("train", cfg, "--budget.steps=4", "--optim.lr", "1e-3", "--logging.every=2")
    assert code == 0, err
    saved = yaml.safe_load((Path(tiny_run["config"]["out"]) / TRAIN_CONFIG).read_text())
    assert (saved["budget"]["steps"], saved["optim"]["lr"], saved["logging"]["every"]) == (4, 1e-3, 2)
    assert saved["optim"]["schedule"] == "cosine"  # defaults are written out too


def test_dry_run_prints_the_plan_and_does_nothing(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    code, _, err = run_cli("train", cfg, "--dry-run", "--budget.steps=1000")
    assert code == 0, err
    assert "optimizer steps  1,000" in err and "global batch     8 sequences x 32 = 256 tokens" in err
    assert "per process      4 sequences x 2 accumulation steps x 1 process(es)" in err
    assert "(N)   " in err and "all but the input embedding table, a lookup" in err  # the tiny model is untied
    assert not Path(tiny_run["config"]["out"]).exists()
    mixture = {"files": [], "mixture": [{"label": "plays", "weight": 1.0, "files": ["/nowhere/*.txt"]}]}
    cfg = write(
        {**tiny_run["config"], "data": {**tiny_run["config"]["data"], **mixture}}, tiny_run["root"] / "mix.yaml"
    )
    code, _, err = run_cli("train", cfg, "--dry-run")
    assert code == 1 and "data.mixture[plays].files: no file matches '/nowhere/*.txt'" in err, err


def _stop_at(monkeypatch: pytest.MonkeyPatch, step: int, sig: int = signal.SIGTERM) -> None:
    """Deliver a real signal to this process during optimizer step `step`."""
    original = trainlib.Trainer.step

    def step_then_signal(self):
        if self.state.step == step - 1:
            os.kill(os.getpid(), sig)
        return original(self)

    monkeypatch.setattr(trainlib.Trainer, "step", step_then_signal)


@pytest.mark.parametrize(
    "teacher", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "distillation"]
)  # distillation's resume (~6 s) in make test-all; its checkpoints hold no teacher runs by default
def test_stop_then_resume_equals_an_uninterrupted_run(run_cli, tiny_run: dict, monkeypatch, teacher: bool) -> None:
    cfg = tiny_run["config"]
    if teacher:  # the teacher is in no checkpoint: resume loads it again from its folder
        cfg = {**cfg, "distill": {"teacher": str(tiny_run["source"]), "weight": 0.5, "temperature": 2.0}}
    root = tiny_run["root"]
    straight = write({**cfg, "out": str(root / "straight")}, root / "straight.yaml")
    assert run_cli("train", straight)[0] == 0

    stopped = write({**cfg, "out": str(root / "stopped")}, root / "stopped.yaml")
    with monkeypatch.context() as m:
        _stop_at(m, 17)
        code, _, err = run_cli("train", stopped)
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM at step 17: checkpoint saved" in err
    assert checkpoints(root / "stopped")[-1].name == "step-00000017"
    assert not (root / "stopped" / "model").exists()
    code, _, err = run_cli("train", stopped, "--resume")
    assert code == 0, err
    assert "resumed from" in err and "at step 17" in err

    # and from an explicit checkpoint path, into another run folder
    again = write({**cfg, "out": str(root / "again")}, root / "again.yaml")
    code, _, err = run_cli("train", again, "--resume", root / "stopped" / "checkpoints" / "step-00000020")
    assert code == 0, err

    reference = tensors(root / "straight" / "model")
    for run in ("stopped", "again"):
        result = tensors(root / run / "model")
        assert reference.keys() == result.keys()
        for name, t in reference.items():
            assert torch.equal(t, result[name]), f"{run}: {name} differs"  # bitwise
    losses = {run: [r["loss"] for r in metrics(root / run) if "loss" in r] for run in ("straight", "stopped")}
    assert losses["straight"] == losses["stopped"]


def test_resume_auto_starts_or_continues(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    with monkeypatch.context() as m:
        _stop_at(m, 4)
        code, _, err = run_cli("train", cfg, "--resume", "auto")  # nothing to resume: a fresh start
    assert code == 143 and "resumed" not in err
    code, _, err = run_cli("train", cfg, "--resume", "auto")
    assert code == 0 and "at step 4" in err


def test_sigint_also_checkpoints(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    _stop_at(monkeypatch, 3, signal.SIGINT)
    code, _, err = run_cli("train", cfg)
    assert code == 130 and "stopped by SIGINT at step 3" in err
    assert checkpoints(Path(tiny_run["config"]["out"]))[-1].name == "step-00000003"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(run_cli, tiny_run: dict, monkeypatch) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    original = trainlib.training_loss
    calls = {"n": 0}

    def poisoned(model, ids, *args):
        calls["n"] += 1
        loss, ce = original(model, ids, *args)
        return (loss * float("nan"), ce) if calls["n"] > 2 * 14 else (loss, ce)  # from step 15 on

    monkeypatch.setattr(trainlib, "training_loss", poisoned)
    code, _, err = run_cli("train", cfg)
    run = Path(tiny_run["config"]["out"])
    assert code == 1
    assert "the loss became nan at step 15" in err and "step-00000010" in err
    assert [p.name for p in checkpoints(run)] == ["step-00000010"]
    assert not (run / "model").exists()
    calls["n"] = 0
    code, _, err = run_cli("train", cfg, "--resume")  # the good checkpoint resumes ...
    assert code == 1 and "resumed from" in err and "at step 25" in err  # ... into the (still) poisoned loss


def test_an_existing_run_is_not_overwritten(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    assert run_cli("train", cfg, "--budget.steps=2")[0] == 0
    code, _, err = run_cli("train", cfg, "--budget.steps=2")
    assert code == 1 and "--resume to continue it or --overwrite to start over" in err
    assert run_cli("train", cfg, "--budget.steps=2", "--overwrite")[0] == 0


def test_resume_refuses_a_changed_recipe(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    assert run_cli("train", cfg, "--budget.steps=10")[0] == 0
    code, _, err = run_cli("train", cfg, "--resume", "--optim.lr=1e-2")
    assert code == 1 and "differs from the checkpoint's in optim.lr" in err
    code, _, err = run_cli("train", cfg, "--resume", "--budget.steps=12")  # a longer budget is fine
    assert code == 0, err


def test_distillation_from_the_mha_source(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "distill": {"teacher": str(tiny_run["source"]), "weight": 0.5, "temperature": 2.0}}
    code, _, err = run_cli("train", write(cfg, tiny_run["root"] / "cfg.yaml"), "--budget.steps=6")
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(Path(cfg["out"]) / "model").config.num_key_value_heads == 2
    logged = [r for r in metrics(Path(cfg["out"])) if "loss" in r]
    assert all("ce" in r and r["ce"] != r["loss"] for r in logged)  # the KL term is part of the loss


def checkpoint_files(run: Path) -> dict[str, dict[str, int | None]]:
    """Each checkpoint's files with their byte sizes (None for the two that name the run and the time)."""
    return {
        c.name: {
            p.relative_to(c).as_posix(): None if p.name in (TRAIN_CONFIG, "train_state.json") else p.stat().st_size
            for p in sorted(c.rglob("*"))
            if p.is_file()
        }
        for c in checkpoints(run)
    }


def test_distillation_checkpoints_hold_no_teacher(run_cli, tmp_path: Path, caplog) -> None:
    """A frozen teacher is the unchanged source: checkpoints of a distillation run hold exactly the files, of
    exactly the sizes, of a run without one. The model ties its embeddings, which accelerate's save reports as
    a removed shared tensor: expected for tied weights, so not printed."""
    tiny = make_tiny_run(tmp_path, tie_word_embeddings=True)
    root, cfg = tiny["root"], {**tiny["config"], "checkpoint": {"every": 5, "keep": 2}}
    for name, distill in (("plain", {}), ("distilled", {"teacher": str(tiny["source"]), "weight": 0.5})):
        path = write({**cfg, "out": str(root / name), "distill": distill}, root / f"{name}.yaml")
        code, _, err = run_cli("train", path, "--budget.steps=10")
        assert code == 0, err
        assert "Removed shared tensor" not in err
    plain, distilled = checkpoint_files(root / "plain"), checkpoint_files(root / "distilled")
    assert list(plain) == ["step-00000005", "step-00000010"]
    assert distilled == plain
    assert not any(name.startswith("model_1") for files in distilled.values() for name in files)
    rows = [r for r in metrics(root / "distilled") if "loss" in r]
    assert rows and all(r["ce"] != r["loss"] for r in rows)  # the teacher did take part
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]  # logged, not printed


def test_only_the_models_own_tied_weights_are_quiet_when_saved() -> None:
    """The "Removed shared tensor" note is dropped for the model's tied names only (DDP prefixes them with
    module.); any other sharing is still reported."""
    import logging

    from uptrain_gqa.training.parallel import _ExpectedTies

    def kept(names: set[str] | str) -> bool:
        text = f"[RANK 0] Removed shared tensor {names} while saving. This should be OK, but check ..."
        return _ExpectedTies({"model.embed_tokens.weight", "lm_head.weight"}).filter(
            logging.LogRecord("accelerate.utils.other", logging.WARNING, __file__, 0, text, None, None)
        )

    assert not kept({"lm_head.weight"}) and not kept({"module.lm_head.weight"})
    assert kept({"lm_head.weight", "model.layers.0.mlp.up_proj.weight"})
    assert kept("something else entirely")


def test_only_the_trainable_parameters_move(run_cli, tiny_run: dict) -> None:
    """optim.trainable='self_attn': attention weights train, every other tensor is written as loaded."""
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    code, _, err = run_cli("train", cfg, "--budget.steps=3", "--optim.trainable=self_attn")
    assert code == 0, err
    start, end = tensors(Path(tiny_run["config"]["model"]["path"])), tensors(Path(tiny_run["config"]["out"]) / "model")
    moved = {n for n in start if not torch.equal(start[n], end[n])}
    assert moved and all(".self_attn." in n for n in moved)
    assert {n for n in start if ".self_attn." in n and "weight" in n} <= moved
    code, _, err = run_cli("train", cfg, "--overwrite", "--optim.trainable=^nothing_like_this")
    assert code == 1 and "matches no parameter" in err and len(err.strip().splitlines()) == 1


def test_the_seed_fixes_the_initialisation(run_cli, tiny_run: dict) -> None:
    root = tiny_run["root"]
    scratch = {**tiny_run["config"], "model": {"init": "scratch", "config": str(tiny_run["source"] / "config.json")}}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = write({**scratch, "out": str(root / name), "seed": seed}, root / f"{name}.yaml")
        assert run_cli("train", cfg, "--budget.steps=1", "--optim.lr=1e-9")[0] == 0
    a, b, c = (tensors(root / n / "model") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_training_from_scratch(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "model": {"init": "scratch", "config": str(tiny_run["source"] / "config.json")}}
    code, _, err = run_cli("train", write(cfg, tiny_run["root"] / "cfg.yaml"), "--budget.steps=4")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(Path(cfg["out"]) / "model")
    assert model.config.num_key_value_heads == 8 and model.dtype == torch.float32


def test_distillation_kl_matches_its_definition() -> None:
    from uptrain_gqa.training.losses import distill_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    t = 2.0
    p, q = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()  # KL(teacher || student), mean over positions
    torch.testing.assert_close(distill_kl(student, teacher, t), expected)
    assert distill_kl(teacher, teacher, t).abs() < 1e-6


def test_streaming_data_trains_and_resumes(run_cli, tiny_run: dict, monkeypatch) -> None:
    from uptrain_gqa.synthetic import write_corpus

    corpus = write_corpus(tiny_run["root"] / "stream.jsonl", docs=600, fmt="jsonl")
    data = {"files": [str(corpus)], "streaming": True, "seq_len": 32, "validation_blocks": 4, "shuffle_buffer": 50}
    cfg = write({**tiny_run["config"], "data": data}, tiny_run["root"] / "cfg.yaml")
    with monkeypatch.context() as m:
        _stop_at(m, 12)
        assert run_cli("train", cfg)[0] == 143
    code, _, err = run_cli("train", cfg, "--resume")
    assert code == 0 and "at step 12" in err, err
    val = [r["val_loss"] for r in metrics(Path(tiny_run["config"]["out"])) if "val_loss" in r]
    assert val[-1] < 0.7 * val[0]


def test_default_tracker_is_skipped_when_not_installed(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    code, _, err = run_cli("train", cfg, "--budget.steps=2", "--logging.trackers=[tensorboard]")
    assert code == 0, err


def test_weight_decay_skips_norms_biases_and_embeddings(tmp_path: Path) -> None:
    from tests.families import CASES, build
    from uptrain_gqa.synthetic import save_tiny_llama
    from uptrain_gqa.training.config import OptimConfig
    from uptrain_gqa.training.optimizer import build_optimizer

    for model in (
        AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "tied", shard=None, tie_word_embeddings=True)),
        build(next(c for c in CASES if c.id == "qwen2")),  # q/k/v biases
    ):
        decay, no_decay = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu")).param_groups
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
        assert decayed and all(n.endswith("proj.weight") or n == "lm_head.weight" for n in decayed), decayed
        assert "model.embed_tokens.weight" in {names[id(p)] for p in no_decay["params"]}
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_checkpointing_trains_the_same(run_cli, tiny_run: dict) -> None:
    root = tiny_run["root"]
    plain = write({**tiny_run["config"], "out": str(root / "plain")}, root / "plain.yaml")
    ckpt = {**tiny_run["config"], "out": str(root / "ckpt")}
    ckpt["model"] = {**ckpt["model"], "gradient_checkpointing": True}
    assert run_cli("train", plain, "--budget.steps=5")[0] == 0
    code, _, err = run_cli("train", write(ckpt, root / "ckpt.yaml"), "--budget.steps=5")
    assert code == 0, err
    a, b = metrics(root / "plain"), metrics(root / "ckpt")
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (a, b)]
    assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_unreachable_hub_dataset_fails_clearly(run_cli, tiny_run: dict) -> None:
    data = {"dataset": "acme/no-such-dataset", "seq_len": 32, "validation_blocks": 4}
    cfg = write({**tiny_run["config"], "data": data}, tiny_run["root"] / "cfg.yaml")
    code, _, err = run_cli("train", cfg)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("uptrain train: error: cannot load acme/no-such-dataset")


@pytest.mark.slow  # torch.compile of every layer on a CPU, ~14 s
def test_compiled_layers_train_the_same_and_save_loadable_weights(run_cli, tiny_run: dict) -> None:
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    eager = write({**tiny_run["config"], "out": str(tiny_run["root"] / "eager")}, tiny_run["root"] / "eager.yaml")
    assert run_cli("train", eager, "--budget.steps=4", "--logging.every=1")[0] == 0
    code, _, err = run_cli("train", cfg, "--model.compile", "--budget.steps=4", "--logging.every=1")
    assert code == 0, err
    compiled = [r["loss"] for r in metrics(Path(tiny_run["config"]["out"])) if "loss" in r]
    reference = [r["loss"] for r in metrics(tiny_run["root"] / "eager") if "loss" in r]
    assert len(compiled) == 4 and max(abs(a - b) for a, b in zip(compiled, reference, strict=True)) <= 1e-4
    _, info = AutoModelForCausalLM.from_pretrained(Path(tiny_run["config"]["out"]) / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(k.startswith("_orig_mod") for k in tensors(Path(tiny_run["config"]["out"]) / "model"))


def test_a_70_30_mixture_trains_and_reports_validation_loss_per_source(run_cli, tiny_run: dict) -> None:
    root = tiny_run["root"]
    other = write_corpus(root / "other", docs=300, seed=7)
    cfg = {**tiny_run["config"], "data": {**tiny_run["config"]["data"], "files": []}}
    cfg["data"]["mixture"] = [
        {"label": "main", "weight": 0.7, "files": tiny_run["config"]["data"]["files"]},
        {"label": "other", "weight": 0.3, "files": [str(other / "*.txt")]},
    ]
    code, _, err = run_cli("train", write(cfg, root / "mix.yaml"), "--budget.steps=10", "--logging.eval_every=5")
    assert code == 0, err
    rows = [r for r in metrics(Path(cfg["out"])) if "val_loss" in r]
    assert [r["step"] for r in rows] == [0, 5, 10]
    for r in rows:
        assert {"val_loss/main", "val_loss/other"} <= r.keys()
        assert (
            min(r["val_loss/main"], r["val_loss/other"])
            <= r["val_loss"]
            <= max(r["val_loss/main"], r["val_loss/other"])
        )
    assert rows[-1]["val_loss/other"] < rows[0]["val_loss/other"]


def streamed_mixture(tiny_run: dict) -> dict:
    """tiny_run's config on a streamed 70/30 mixture of two .jsonl files (one file opens faster than 400 .txt)."""
    main = write_corpus(tiny_run["root"] / "main.jsonl", docs=1000, fmt="jsonl")
    other = write_corpus(tiny_run["root"] / "other.jsonl", docs=300, seed=7, fmt="jsonl")
    mixture = [
        {"label": "main", "weight": 0.7, "files": [str(main)]},
        {"label": "other", "weight": 0.3, "files": [str(other)]},
    ]
    data = {"mixture": mixture, "streaming": True, "seq_len": 32, "validation_blocks": 4, "shuffle_buffer": 300}
    return {**tiny_run["config"], "data": data, "budget": {"steps": 10}}


def test_a_streamed_mixture_stopped_and_resumed_ends_bitwise_as_an_uninterrupted_run(
    run_cli, tiny_run: dict, monkeypatch
) -> None:
    root, cfg = tiny_run["root"], streamed_mixture(tiny_run)
    assert run_cli("train", write({**cfg, "out": str(root / "straight")}, root / "straight.yaml"))[0] == 0
    stopped = write({**cfg, "out": str(root / "stopped")}, root / "stopped.yaml")
    with monkeypatch.context() as m:
        _stop_at(m, 4)
        assert run_cli("train", stopped)[0] == 143
    code, _, err = run_cli("train", stopped, "--resume")
    assert code == 0 and "at step 4" in err, err
    reference, resumed = tensors(root / "straight" / "model"), tensors(root / "stopped" / "model")
    assert all(torch.equal(t, resumed[name]) for name, t in reference.items()), "bitwise the same weights"
    runs = {run: metrics(root / run) for run in ("straight", "stopped")}
    assert [r["loss"] for r in runs["straight"] if "loss" in r] == [r["loss"] for r in runs["stopped"] if "loss" in r]
    last = [r for r in runs["stopped"] if "val_loss" in r][-1]
    assert last["step"] == 10 and {"val_loss/main", "val_loss/other"} <= last.keys()  # per source, streamed too
    assert min(last["val_loss/main"], last["val_loss/other"]) <= last["val_loss"]


def test_values_are_read_back_only_at_logging_validation_and_checkpoint_steps(
    run_cli, tiny_run: dict, monkeypatch
) -> None:
    """No host sync inside the step: loss and grad norm stay on the device until a step needs them."""
    read_at = []
    original = trainlib.Trainer.agree

    def agree(self, loss, ce, stop):
        assert isinstance(loss, torch.Tensor) and isinstance(ce, torch.Tensor)
        read_at.append(self.state.step)
        return original(self, loss, ce, stop)

    monkeypatch.setattr(trainlib.Trainer, "agree", agree)
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")  # logging.every 5, eval/checkpoint every 10
    assert run_cli("train", cfg)[0] == 0
    assert read_at == [5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_cross_entropy_has_the_same_loss_and_gradients(tied: bool, monkeypatch) -> None:
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from uptrain_gqa.training import losses

    monkeypatch.setattr(losses, "CHUNK_ROWS", 7)  # several chunks and a partial one
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied)  # fmt: skip
    plain = LlamaForCausalLM(config)
    chunked = copy.deepcopy(plain)
    chunked.tie_weights()
    head = losses.chunked_head(chunked)
    assert head is not None
    ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    reference, _ = losses.training_loss(plain, ids)
    loss, _ = losses.training_loss(chunked, ids, head=head)
    reference.backward()
    loss.backward()
    assert abs(loss.item() - reference.item()) <= 1e-6
    grads = dict(plain.named_parameters())
    for name, p in chunked.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses.token_nll(chunked, ids, head), losses.token_nll(plain, ids))


def test_a_run_with_chunked_cross_entropy_follows_the_plain_one(run_cli, tiny_run: dict) -> None:
    root = tiny_run["root"]
    for name, chunked in (("plain", "false"), ("chunked", "true")):
        cfg = write({**tiny_run["config"], "out": str(root / name)}, root / f"{name}.yaml")
        code, _, err = run_cli("train", cfg, "--budget.steps=10", f"--model.chunked_loss={chunked}", "--verbose")
        assert code == 0, err
        assert ("chunked cross-entropy" in err) == (chunked == "true")  # an internal detail: --verbose only
    for a, b in zip(metrics(root / "plain"), metrics(root / "chunked"), strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key)


@pytest.mark.writes_tiny_build
def test_export_names_a_deleted_source_folder(run_cli, tiny_run: dict) -> None:
    """The run's source folder gives export the model's config and tokenizer; once deleted, the message
    named a Hub repo-id rule instead of the missing folder."""
    cfg = write(tiny_run["config"], tiny_run["root"] / "cfg.yaml")
    assert run_cli("train", cfg, "--budget.steps=2", "--checkpoint.every=2")[0] == 0
    step = checkpoints(Path(tiny_run["config"]["out"]))[-1]
    model = Path(tiny_run["model"])
    model.rename(model.with_name("moved"))
    code, _, err = run_cli("export", step, tiny_run["root"] / "exported")
    assert code == 1 and f"read model.path from {model}, which no longer exists" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tiny_run["root"] / "exported").exists()
    model.with_name("moved").rename(model)
    assert run_cli("export", step, tiny_run["root"] / "exported")[0] == 0
