"""transformers configs and tokenizers, read from a folder, a config.json or a Hub id with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.folders import TRAIN_CONFIG
from uptrain_gqa.io.hub import looks_like_repo_id

STEP_STATE_FILE = "train_state.json"
"""In a step checkpoint of `uptrain train` (with uptrain_train.yaml and no config.json): its step and tokens. An
exported model folder holds it too, beside its config.json."""


def check_model_folder(where: str | Path, setting: str = "") -> None:
    """Refuse, in one line, a local folder of `uptrain train` that is not a model folder (no config.json): a step
    checkpoint (`uptrain export` makes a model of it) or a run folder (its model is in model/). `setting` names
    the option that gave it ("distill.teacher "), or is empty for a command's argument."""
    path = Path(where)
    if not path.is_dir() or (path / "config.json").is_file():
        return
    if (path / STEP_STATE_FILE).is_file():
        raise UptrainError(
            f"{setting}{path} is a training step checkpoint (weights with optimizer and RNG state), not a model "
            f"folder: run `uptrain export {path} OUT` to get a model folder, and give OUT"
        )
    if (path / TRAIN_CONFIG).is_file() and ((path / "model").is_dir() or (path / "checkpoints").is_dir()):
        if (path / "model" / "config.json").is_file():
            hint = f"give its model folder, {path / 'model'}"
        else:
            hint = f"it has no final model yet: `uptrain export` one of {path / 'checkpoints'} to get one"
        raise UptrainError(f"{setting}{path} is a training run folder, not a model folder; {hint}")


def read_model_config(where: str, revision: str | None = None) -> Any:
    """A transformers config from a folder, a config.json file or a Hub id, with clear errors."""
    from transformers import AutoConfig

    path = Path(where)
    if not path.exists() and not looks_like_repo_id(where):
        raise UptrainError(f"{where}: no such folder or file (and not a Hub repo id like org/name)")
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(str(path.parent)) if path.name == "config.json" else _from_json(path)
        return AutoConfig.from_pretrained(where, revision=revision)
    except (OSError, ValueError) as e:
        if not path.exists():  # read as a Hub id, and that failed too: name both readings
            raise UptrainError(
                f"{where}: no such folder here, and no Hub repo of that name could be loaded ({first_line(e)})"
            ) from e
        raise UptrainError(f"cannot read the model config at {where}: {first_line(e)}") from e


def _from_json(path: Path) -> Any:
    from transformers import AutoConfig

    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise UptrainError(f"{path} has no model_type; it is not a transformers config")
    return AutoConfig.for_model(**data)


def load_tokenizer(where: str, revision: str | None = None, setting: str = "model.tokenizer") -> Any:
    """The tokenizer of a folder or Hub id; `setting` names the option that chooses another one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise UptrainError(f"cannot load a tokenizer from {where} ({first_line(e)}); set {setting}") from e
