"""Train configs: keys, types, overrides, the budget math, and bad configs failing before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from tests import ROOT
from uptrain_gqa import config as configlib
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.model.shape import count_parameters, matmul_parameters
from uptrain_gqa.training.budget import train_budget
from uptrain_gqa.training.config import BudgetConfig, OptimConfig, TrainConfig
from uptrain_gqa.training.optimizer import lr_factor


def matmul_params(config) -> int:
    """N of the 6·N·D training FLOPs: parameters without the (untied) input embedding table."""
    return count_parameters(config, matmul_only=True)


BASE = {"model": {"path": "m"}, "data": {"files": ["x.txt"]}, "budget": {"steps": 10}}


def test_yaml_scalars_are_coerced_to_field_types(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: {path: m}\ndata: {files: x.txt, seq_len: '1024'}\n"
        "budget: {fraction: 0.05, original_tokens: 2e12}\noptim: {lr: 3e-4, betas: [0.9, 0.95]}\n"
    )
    cfg = configlib.load(TrainConfig, path)
    assert cfg.budget.original_tokens == 2_000_000_000_000 and isinstance(cfg.budget.original_tokens, int)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.files == ["x.txt"] and cfg.data.seq_len == 1024


def test_unknown_keys_name_the_closest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(UptrainError, match=r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"):
        configlib.from_dict(TrainConfig, {**BASE, "optim": {"lrr": 1}})
    with pytest.raises(UptrainError, match=r"unknown config key 'optimizer'; did you mean 'optim'\?"):
        configlib.from_dict(TrainConfig, {**BASE, "optimizer": {}})
    with pytest.raises(UptrainError, match=r"'data.seqlen'; did you mean 'data.seq_len'"):
        configlib.load(TrainConfig, None, {**configlib.parse_overrides(["--data.seqlen=8"]), **_flat(BASE)})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_overrides_parse_as_yaml() -> None:
    parsed = configlib.parse_overrides(["--optim.lr=1e-4", "--data.files", "[a.txt, b.txt]", "--model.compile"])
    assert parsed == {"optim.lr": "1e-4", "data.files": ["a.txt", "b.txt"], "model.compile": True}
    cfg = configlib.load(TrainConfig, None, {**_flat(BASE), **parsed})
    assert (cfg.optim.lr, cfg.data.files, cfg.model.compile) == (1e-4, ["a.txt", "b.txt"], True)
    assert configlib.parse_overrides(["--out=runs/x", "--seed", "3"]) == {"out": "runs/x", "seed": 3}
    with pytest.raises(UptrainError, match=r"look like --section\.key=value"):
        configlib.parse_overrides(["stray.yaml"])
    with pytest.raises(UptrainError, match="unknown config key 'verbose'"):
        configlib.load(TrainConfig, None, {**_flat(BASE), **configlib.parse_overrides(["--verbose"])})

    for bad in ("--optim.lr=[1,", "--optim.lr=!!python/object/apply:os.system [echo]", "--optim.lr={a"):
        with pytest.raises(UptrainError, match=r"override --optim\.lr=.* is not a YAML value"):
            configlib.parse_overrides([bad])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"logging": {"trackers": ["tensorbaord"]}}, "unknown tracker 'tensorbaord'; did you mean tensorboard?"),
        ({"budget": {"tokens": 0}}, "budget.tokens must be positive"),
        ({"budget": {"tokens": -5}}, "budget.tokens must be positive"),
        ({"budget": {"steps": 0}}, "budget.steps must be positive"),
        ({"budget": {"fraction": -0.05, "original_tokens": 2e12}}, "budget.fraction must be positive"),
        ({"budget": {}}, "budget needs exactly one of"),
        ({"budget": {"tokens": 10, "steps": 3}}, "got tokens, steps"),
        ({"budget": {"fraction": 0.05}}, "budget.fraction needs budget.original_tokens"),
        ({"budget": {"steps": 1.5}}, "budget.steps must be a whole number"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number"),
        ({"optim": {"schedule": "cosin"}}, "optim.schedule must be one of cosine, linear, constant"),
        ({"data": {"files": ["x.txt"], "dataset": "a/b"}}, "exactly one of data.dataset"),
        ({"batch": {"micro_batch_size": 0}}, "batch.micro_batch_size must be positive"),
        ({"model": {"init": "scratch"}}, "needs model.config"),
        ({"optim": {"trainable": "self_attn("}}, "optim.trainable is not a regular expression"),
    ],
)
def test_bad_values_are_refused(edit: dict, message: str) -> None:
    with pytest.raises(UptrainError, match=message):
        configlib.from_dict(TrainConfig, {**BASE, **edit})


def test_every_field_is_documented() -> None:
    import dataclasses

    from uptrain_gqa.training import config as train_config

    for cls in [TrainConfig, *(getattr(train_config, n) for n in dir(train_config) if n.endswith("Config"))]:
        if dataclasses.is_dataclass(cls):
            docs = configlib.field_docs(cls)
            assert {f.name for f in dataclasses.fields(cls)} <= {k for k, v in docs.items() if v}, cls.__name__
    lines = configlib.key_help(TrainConfig)
    assert any(line.strip().startswith("--optim.lr=0.0003  Peak learning rate") for line in lines)


# --- the budget ---------------------------------------------------------------------------


def test_llama2_7b_five_percent_plan_matches_hand_computation() -> None:
    # Llama-2-7B: 32 layers, hidden 4096, 32 heads, FFN 11008, vocab 32000, untied head.
    cfg = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000)  # fmt: skip
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 11008 + 2 * 4096  # q,o + k,v (GQA-8) + MLP + norms
    n = 32 * layer + 4096 + 32000 * 4096  # + final norm + lm_head (the input embedding is excluded)
    assert matmul_params(cfg) == n == 5_802_037_248
    plan = train_budget(
        BudgetConfig(fraction=0.05, original_tokens=2e12), seq_len=4096, global_batch_size=1024, micro_batch_size=4,
        num_processes=64, params=n,
    )  # fmt: skip
    assert plan.requested_tokens == 100_000_000_000
    assert plan.global_batch_tokens == 4_194_304
    assert plan.steps == 23_842  # ceil(1e11 / 4,194,304) = ceil(23,841.86)
    assert plan.tokens == 23_842 * 4_194_304 == 100_000_595_968
    assert plan.grad_accum == 4  # 1024 / (4 x 64)
    assert plan.flops == 6 * 5_802_037_248 * 100_000_595_968 == 3_481_243_095_771_207_696_384
    assert round(plan.gpu_hours, 1) == 2444.4  # / (989 TFLOP/s x 40 % MFU) / 3600 s


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_n_is_every_matmul_and_the_plan_says_what_it_counts(tied: bool) -> None:
    """A tied embedding table is the output head: N holds it once, as the head's matmul; an untied one is a
    lookup and is left out. N is then the same number either way; the plan's words say which case it is."""
    from transformers import LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config)
    every = sum(p.numel() for p in model.parameters())  # a tied tensor once
    layer = 2 * 64 * 64 + 2 * 64 * 16 + 3 * 64 * 96 + 2 * 64  # q, o; k, v (2 KV heads x 8); MLP; two norms
    n, is_tied = matmul_parameters(config)
    assert is_tied == tied == (model.lm_head.weight is model.model.embed_tokens.weight)
    assert n == 2 * layer + 64 + 96 * 64  # + final norm + the head's matmul
    assert n == (every if tied else every - 96 * 64)
    plan = train_budget(BudgetConfig(steps=1), seq_len=8, global_batch_size=1, micro_batch_size=1, num_processes=1,
                        params=n, tied_embeddings=is_tied)  # fmt: skip
    (line,) = [x for x in plan.lines() if x.startswith("parameters (N)")]
    tied_words = "all of them; the embedding table is tied to the output head, whose matmul is real compute"
    assert line.endswith((tied_words if tied else "all but the input embedding table, a lookup") + ")")
    assert "excluded" not in line


def test_plan_from_tokens_and_from_steps() -> None:
    common = dict(seq_len=128, global_batch_size=16, micro_batch_size=2, num_processes=2, params=1000)
    p = train_budget(BudgetConfig(tokens=10_000), **common)
    assert (p.steps, p.tokens, p.grad_accum) == (5, 10_240, 4)  # 2048 tokens per step: ceil(10000/2048) = 5
    p = train_budget(BudgetConfig(steps=7), **common)
    assert (p.requested_tokens, p.steps, p.flops) == (7 * 2048, 7, 6 * 1000 * 7 * 2048)


def test_batch_that_does_not_split_evenly_is_refused() -> None:
    with pytest.raises(UptrainError, match="global_batch_size 10 is not a multiple of micro_batch_size x processes"):
        train_budget(
            BudgetConfig(steps=1), seq_len=8, global_batch_size=10, micro_batch_size=4, num_processes=1, params=1
        )


def test_learning_rate_schedule() -> None:
    o = OptimConfig(lr=1.0, warmup=10, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_factor(s, 110, o) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, 110, o) == 1.0 and math.isclose(lr_factor(60, 110, o), 0.55)
    assert math.isclose(lr_factor(110, 110, o), 0.1)
    linear = OptimConfig(lr=1.0, warmup=0.1, min_lr_ratio=0.0, schedule="linear")
    assert math.isclose(lr_factor(55, 100, linear), 0.5)  # 10 warmup steps, then 45/90 of the way down


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("llama2-7b-gqa8", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)),
        ("qwen1.5-7b-gqa8", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=151936)),
        ("olmo-1b-gqa4", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                              num_attention_heads=16, num_key_value_heads=4, vocab_size=50304)),
        ("olmo-1b-gqa4-mixture", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                                      num_attention_heads=16, num_key_value_heads=4, vocab_size=50304)),
    ],
)  # fmt: skip
def test_run_configs_parse_and_plan_on_8_gpus(name: str, arch: dict) -> None:
    cfg = configlib.load(TrainConfig, ROOT / "configs" / f"{name}.yaml")
    plan = train_budget(
        cfg.budget, seq_len=cfg.data.seq_len, global_batch_size=cfg.batch.global_batch_size,
        micro_batch_size=cfg.batch.micro_batch_size, num_processes=8, params=matmul_params(LlamaConfig(**arch)),
    )  # fmt: skip
    assert plan.requested_tokens == round(0.05 * cfg.budget.original_tokens)
    assert plan.global_batch_tokens == 4 * 2**20  # the 4M-token batches of the original recipes
    assert plan.grad_accum * 8 * cfg.batch.micro_batch_size == cfg.batch.global_batch_size


def test_the_mixture_run_config_streams_its_sources() -> None:
    """150 B tokens are streamed, not tokenized up front."""
    cfg = configlib.load(TrainConfig, ROOT / "configs" / "olmo-1b-gqa4-mixture.yaml")
    assert cfg.data.streaming and [(s.label, s.weight) for s in cfg.data.mixture] == [("web", 0.7), ("domain", 0.3)]


# --- bad configs fail before any work -------------------------------------------------------


def refuse(run_cli, cfg: dict, tmp_path: Path, expect: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli("train", path)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uptrain train: error: ") and expect in lines[0], err
    assert not Path(cfg["out"]).exists(), "nothing may be written"


def test_unknown_key(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "optim": {"learning_rate": 1e-3}}
    refuse(run_cli, cfg, tiny_run["root"], "unknown config key 'optim.learning_rate'; did you mean 'optim.")


def test_zero_and_negative_budgets(run_cli, tiny_run: dict) -> None:
    refuse(run_cli, {**tiny_run["config"], "budget": {"tokens": 0}}, tiny_run["root"], "budget.tokens must be positive")
    refuse(run_cli, {**tiny_run["config"], "budget": {"steps": -3}}, tiny_run["root"], "budget.steps must be positive")


def test_sequence_longer_than_the_model_positions(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "data": {**tiny_run["config"]["data"], "seq_len": 4096}}
    refuse(run_cli, cfg, tiny_run["root"], "data.seq_len 4096 is above the model's max_position_embeddings 128")


def test_missing_data_files(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "data": {"files": [str(tiny_run["root"] / "nope" / "*.txt")]}}
    refuse(run_cli, cfg, tiny_run["root"], "data.files: no file matches")


def test_teacher_with_another_vocabulary(run_cli, tiny_run: dict, tmp_path: Path) -> None:
    from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer

    other = save_tiny_llama(tmp_path / "other", shard=None, vocab_size=200)
    save_word_tokenizer(other)
    cfg = {**tiny_run["config"], "distill": {"teacher": str(other)}}
    refuse(run_cli, cfg, tiny_run["root"], "has another vocabulary (vocab_size 200 vs 96")


def test_missing_model(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "model": {"path": str(tiny_run["corpus"])}}
    refuse(run_cli, cfg, tiny_run["root"], "has no config.json")


def test_batch_not_divisible(run_cli, tiny_run: dict) -> None:
    cfg = {**tiny_run["config"], "batch": {"global_batch_size": 6, "micro_batch_size": 4}}
    refuse(run_cli, cfg, tiny_run["root"], "global_batch_size 6 is not a multiple")


def test_missing_config_file(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("train", tmp_path / "none.yaml")
    assert code == 1 and "config file" in err and "not found" in err


def test_weak_inputs_get_messages_that_point_at_the_fix(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    code, _, err = run_cli("train", bad)
    assert code == 1 and f"{bad} is not valid YAML at line 3, column 1" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, _, err = run_cli("train", empty)
    assert code == 1 and "the config needs model, data, budget" in err and "__init__" not in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"model:\n  path: {tmp_path}/no/such/model\ndata:\n  files: [{bad}]\nbudget:\n  steps: 1\n")
    code, _, err = run_cli("train", missing, f"--out={tmp_path / 'run'}")
    assert code == 1 and f"{tmp_path}/no/such/model: no such folder" in err and "Repo id" not in err
    assert not (tmp_path / "run").exists()


# --- a run from flags alone, and its printed config ----------------------------------------------


def test_a_run_needs_no_yaml_and_fits_unset_settings_to_the_model(run_cli, tiny_run: dict, monkeypatch) -> None:
    """`uptrain train --model.path=M --data.files=F --budget.steps=2`: data.seq_len is the model's maximum
    positions (128, under the default 2048), the global batch follows its size; both printed and saved. Its
    log (stderr, not a terminal here) holds whole lines only, a missing tracker is one line, and the run
    draws loss.png."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    from uptrain_gqa.model.loading import read_model_config
    from uptrain_gqa.training.budget import default_global_batch

    out = tiny_run["root"] / "flags"
    files = f"--data.files=[{tiny_run['corpus']}/*.txt]"
    code, _, err = run_cli("train", f"--model.path={tiny_run['model']}", files, "--budget.steps=2", f"--out={out}")
    assert code == 0, err
    assert "\r" not in err and "it/s]" not in err  # no redrawn bars, ours or the libraries'
    skipped = [line for line in err.splitlines() if "tensorboard" in line]
    assert len(skipped) == 1 and "is not installed, so it is skipped (pip install 'tensorboard" in skipped[0]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n")
    saved = yaml.safe_load((out / "uptrain_train.yaml").read_text())
    params, _ = matmul_parameters(read_model_config(str(tiny_run["model"])))
    batch = default_global_batch(params, 128, 4)
    assert saved["data"]["seq_len"] == 128 and saved["batch"]["global_batch_size"] == batch
    assert "fitted to the model: data.seq_len 128" in err and f"batch.global_batch_size {batch} (" in err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in steps) == 2


def test_print_config_is_the_run_it_prints(run_cli, tiny_run: dict) -> None:
    """--print-config prints every key with the fitted values and writes nothing; `train` of what it printed
    prints the same again and runs the run the flags run (the same losses)."""
    flags = [f"--model.path={tiny_run['model']}", f"--data.files=[{tiny_run['corpus']}/*.txt]", "--budget.steps=2",
             "--data.validation_blocks=8", "--logging.every=1"]  # fmt: skip
    printed_out = tiny_run["root"] / "printed-run"
    code, printed, err = run_cli("train", *flags, f"--out={printed_out}", "--print-config")
    assert code == 0 and not err and not printed_out.exists(), err
    resolved = yaml.safe_load(printed)
    assert resolved["data"]["seq_len"] == 128 and resolved["batch"]["global_batch_size"] is not None
    assert resolved["optim"]["lr"] == OptimConfig().lr
    path = tiny_run["root"] / "printed.yaml"
    path.write_text(printed)
    code, again, _ = run_cli("train", path, "--print-config")
    assert code == 0 and again == printed
    code, _, err = run_cli("train", path)
    assert code == 0, err
    assert (printed_out / "uptrain_train.yaml").read_text() == printed
    code, _, err = run_cli("train", *flags, f"--out={tiny_run['root'] / 'flags-run'}")
    assert code == 0, err

    def losses(run: Path) -> list[float]:
        return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]

    assert losses(printed_out) == losses(tiny_run["root"] / "flags-run") and len(losses(printed_out)) == 2
