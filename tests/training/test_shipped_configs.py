"""The run configs shipped in the package (uptrain_gqa/configs/, `configs/` in a clone): found by name, each one a
TrainConfig; an unknown name is refused with the shipped names and the closest one. (That they are in the wheel:
tests/test_packaging.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests import ROOT
from uptrain_gqa import config as configlib
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.training.config import SHIPPED_CONFIGS, SHIPPED_DIR, TrainConfig, shipped_config

NAMES = ["llama2-7b-gqa8", "olmo-1b-gqa4", "olmo-1b-gqa4-mixture", "qwen1.5-7b-gqa8", "tiny-cpu"]


def test_the_shipped_names_are_the_run_configs() -> None:
    assert list(SHIPPED_CONFIGS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_name_resolves_to_a_train_config(name: str) -> None:
    path = shipped_config(name)
    assert path == shipped_config(f"{name}.yaml") == SHIPPED_DIR / f"{name}.yaml"
    assert path.is_file() and path.parent.parent.name == "uptrain_gqa"
    cfg = configlib.load(TrainConfig, path)
    assert cfg.model.path and cfg.out


def test_the_accelerate_configs_ship_beside_them() -> None:
    for name in ("ddp", "fsdp2"):
        launch = yaml.safe_load((SHIPPED_DIR / "accelerate" / f"{name}.yaml").read_text())
        assert launch["distributed_type"] == {"ddp": "MULTI_GPU", "fsdp2": "FSDP"}[name]


def test_a_clone_reads_the_same_files_under_configs() -> None:
    """configs/ at the repository's root is a link to the package's folder: commands written with configs/... work."""
    assert (ROOT / "configs").resolve() == SHIPPED_DIR.resolve()
    assert (ROOT / "configs" / "accelerate" / "fsdp2.yaml").is_file()


@pytest.mark.parametrize(
    ("name", "close"),
    [("llama2-7b-gqa4", "llama2-7b-gqa8"), ("qwen", "qwen1.5-7b-gqa8"), ("tiny.yml", "tiny-cpu"), ("nope", None)],
)
def test_an_unknown_name_is_refused_with_the_closest_one(name: str, close: str | None) -> None:
    with pytest.raises(UptrainError) as e:
        shipped_config(name)
    message = str(e.value)
    assert "\n" not in message and repr(name) in message
    assert message.endswith("uptrain ships " + ", ".join(NAMES))
    assert (f"did you mean {close}?" in message) if close else ("did you mean" not in message)


def test_train_config_name_runs_a_shipped_config_with_flags_on_top(run_cli, llama: Path) -> None:
    code, out, err = run_cli("train", "--config-name", "tiny-cpu", f"--model.path={llama}", "--optim.lr=1e-4",
                             "--print-config")  # fmt: skip
    assert code == 0, err
    printed = yaml.safe_load(out)
    shipped = yaml.safe_load(shipped_config("tiny-cpu").read_text())
    assert printed["model"]["path"] == str(llama) and printed["optim"]["lr"] == 1e-4
    assert printed["budget"]["steps"] == shipped["budget"]["steps"]
    code, _, err = run_cli("train", "--config-name", "tiny", "--print-config")
    assert code == 1 and "did you mean tiny-cpu?" in err


def test_python_train_takes_a_shipped_configs_name(llama: Path) -> None:
    import uptrain_gqa as ug
    from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

    save_word_tokenizer(llama)
    text = write_corpus(llama.parent / "text", docs=50)
    result = ug.train("tiny-cpu", **{"model.path": str(llama)}, data={"files": [f"{text}/*.txt"]}, dry_run=True)
    assert result.step is None and result.budget.steps == 30 and result.config.model.path == str(llama)
