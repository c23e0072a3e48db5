"""The model out of a run as a Hugging Face folder: at the end of training, and from any step checkpoint.

`save_final_model` writes OUT/model from the trained weights. A step checkpoint holds what resuming
needs (optimizer, RNG, schedule), not a model others can load; `uptrain export` turns any of them
into the same folder. Two kinds exist: a replicated run (one process or DDP) saves the whole model as
`model.safetensors` through accelerate; an FSDP2 run saves it as DCP shards, one file per rank
(`sharded/`). Both are read here in one process, on the CPU, with no process group: DCP reassembles
the shards into whole tensors.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from uptrain_gqa import config as configlib
from uptrain_gqa.data.config import validation_description
from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.cards import licence_files, source_licence, write_card
from uptrain_gqa.io.folders import CONVERSION_RECORD, TRAIN_CONFIG, atomic_output_dir, write_failure
from uptrain_gqa.io.hub import looks_like_repo_id
from uptrain_gqa.model.loading import load_tokenizer, read_model_config
from uptrain_gqa.training.checkpointer import STATE_FILE, checkpoints, failures_everywhere, read_state
from uptrain_gqa.training.config import TrainConfig
from uptrain_gqa.training.preflight import stored_dtype
from uptrain_gqa.training.sharding import SHARDED_FOLDER, check_sharded_metadata


def save_final_model(
    acc: Any,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    cfg: TrainConfig,
    out: Path,
    progress: dict[str, Any] | None = None,
    checkpoint: Path | None = None,
) -> None:
    """The trained model as a Hugging Face folder, from its full `state_dict` (needed on the main process).
    When it cannot be written (a full disk), every process raises UptrainError, naming `checkpoint`: the
    final step's checkpoint, from which `uptrain export` writes the same folder later."""
    error: str | None = None
    if acc.is_main_process:
        try:
            write_model_folder(
                acc.unwrap_model(model), state_dict, tokenizer, cfg, out, overwrite=True, progress=progress
            )
        except UptrainError as e:
            error = str(e)
    failed = failures_everywhere(acc, error)
    if failed:
        hint = f"; after making room, `uptrain export {checkpoint} {out}` writes it" if checkpoint else ""
        raise UptrainError(f"{error or failed[0]}{hint}")
    acc.wait_for_everyone()


def write_model_folder(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    cfg: TrainConfig,
    out: Path,
    *,
    overwrite: bool,
    extra: dict[str, str] | None = None,
    inputs: tuple[str | Path | None, ...] = (),
    progress: dict[str, Any] | None = None,
) -> None:
    """`state_dict` of `model` saved as a Hugging Face folder in the run's save dtype, with the
    tokenizer, the run config, the conversion record of the source, a model card (with `progress`:
    step, tokens, validation loss), the source's licence files, and `extra` files."""
    dtype = _save_dtype(cfg)
    cast: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor
    state_dict = {k: cast.setdefault(id(v), v.detach().to("cpu", dtype)) for k, v in state_dict.items()}
    model.config.dtype = dtype
    model.config.use_cache = True
    try:
        with atomic_output_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
            _write_model(model, state_dict, tokenizer, cfg, out, tmp, extra, progress)
    except UptrainError:
        raise
    except Exception as e:  # OSError, safetensors' own error, torch's RuntimeError: keep it if not a failed write
        reason = write_failure(e, Path(out).parent)
        if reason is None:
            raise
        raise UptrainError(f"cannot write {out}: {reason}; nothing was written there") from e


def _write_model(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    cfg: TrainConfig,
    out: Path,
    tmp: Path,
    extra: dict[str, str] | None,
    progress: dict[str, Any] | None,
) -> None:
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    configlib.dump(cfg, tmp / TRAIN_CONFIG)
    conversion = None
    source = Path(cfg.model.path) if cfg.model.path and Path(cfg.model.path).is_dir() else None
    if source is not None and (source / CONVERSION_RECORD).is_file():
        shutil.copy2(source / CONVERSION_RECORD, tmp / CONVERSION_RECORD)
        conversion = json.loads((source / CONVERSION_RECORD).read_text())
    if source is not None:
        licence_files(source, tmp)
    write_card(
        tmp,
        title=f"{Path(out).parent.name if Path(out).name == 'model' else Path(out).name} (uptrained)",
        conversion=conversion,
        training=training_summary(cfg, progress or {}),
        base_model=(conversion or {}).get("base_model") if conversion else _hub_id(cfg.model.path),
        licence=source_licence(source) if source is not None else None,
    )
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)


def _hub_id(path: str | None) -> str | None:
    """`model.path` when it names a Hub model rather than a local folder."""
    return path if path and not Path(path).exists() and looks_like_repo_id(path) else None


def training_summary(cfg: TrainConfig, progress: dict[str, Any]) -> dict[str, str]:
    """What a model card says about the uptraining: tokens, α, steps, data, validation loss."""
    out: dict[str, str] = {}
    tokens = progress.get("tokens")
    if tokens is not None:
        out["tokens"] = f"{tokens:,}"
        if cfg.budget.original_tokens:
            out["α (fraction of the original pretraining tokens)"] = f"{tokens / cfg.budget.original_tokens:.4g}"
    if progress.get("step") is not None:
        out["optimizer steps"] = f"{progress['step']:,}"
    out["data"] = cfg.data.dataset or ", ".join(cfg.data.files)
    out["validation"] = validation_description(cfg.data)  # how validation was made, never trained on
    out["sequence length"] = str(cfg.data.seq_len)
    out["learning rate"] = f"{cfg.optim.lr:g} ({cfg.optim.schedule})"
    if progress.get("val_loss") is not None:
        out["validation loss"] = f"{progress['val_loss']:.4f} (perplexity {progress.get('val_ppl', 0):.2f})"
    return out


def _save_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.model.save_dtype != "auto":
        return getattr(torch, cfg.model.save_dtype)
    if cfg.model.init == "scratch":
        return torch.float32
    return stored_dtype(cfg.model.path, read_model_config(cfg.model.path or "", cfg.model.revision))


REPLICATED_FILE = "model.safetensors"
"""accelerate's name for the (first) model of a saved state."""


def _gone(checkpoint: Path, read: bool = False) -> UptrainError | None:
    """The error for a checkpoint of a run's checkpoints/ folder that is not there (anymore: rotation removed it,
    a run keeps its last checkpoint.keep), naming those that are; None for any other path. `read`: it was there
    when export began."""
    folder = checkpoint.parent
    if (checkpoint / STATE_FILE).is_file() or folder.name != "checkpoints" or not folder.is_dir():
        return None
    run = folder.parent
    there = checkpoints(run)
    names = ", ".join(c.name for c in there)
    listed = f"the checkpoints there now: {names}; export one of those" if there else "no checkpoint is there now"
    step = re.fullmatch(r"step-(\d+)", checkpoint.name)
    if not read and not (step and there and int(step.group(1)) < int(there[0].name.removeprefix("step-"))):
        return UptrainError(f"{checkpoint}: no such checkpoint; {listed}")  # a later or mistyped step
    try:
        keep = (yaml.safe_load((run / TRAIN_CONFIG).read_text()) or {})["checkpoint"]["keep"]
        rule = f"the run keeps its last {int(keep)} checkpoints (checkpoint.keep)"
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        rule = "a run keeps its last checkpoint.keep checkpoints"
    why = f"removed while export read it: rotated away, as {rule}" if read else f"rotated away? {rule}"
    return UptrainError(f"{checkpoint} no longer exists ({why}); {listed}")


def checkpoint_kind(checkpoint: Path) -> str:
    """'sharded' (FSDP2, DCP) or 'replicated' (one process or DDP); raises for anything else."""
    if not checkpoint.exists():
        gone = _gone(checkpoint)
        raise gone or UptrainError(
            f"{checkpoint}: no such folder; give a step checkpoint like OUT/checkpoints/step-00001000"
        )
    if not (checkpoint / STATE_FILE).is_file() or not (checkpoint / TRAIN_CONFIG).is_file():
        raise UptrainError(
            f"{checkpoint} is not an uptrain step checkpoint (no {STATE_FILE} / {TRAIN_CONFIG}); "
            "give a folder like OUT/checkpoints/step-00001000"
        )
    if (checkpoint / SHARDED_FOLDER / ".metadata").is_file():
        return "sharded"
    if (checkpoint / REPLICATED_FILE).is_file():
        return "replicated"
    raise UptrainError(f"{checkpoint} holds neither {REPLICATED_FILE} nor {SHARDED_FOLDER}/; is it complete?")


def _structure(cfg: TrainConfig) -> torch.nn.Module:
    """The run's model without weights (meta device): its modules, names and shapes."""
    from transformers import AutoModelForCausalLM

    where = cfg.model.path if cfg.model.init == "pretrained" else cfg.model.config
    config = read_model_config(str(where), cfg.model.revision)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, cfg.model.dtype), attn_implementation=cfg.model.attn_implementation
        )


def _weights(checkpoint: Path, kind: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `model` as a whole CPU tensor, read from the checkpoint."""
    if kind == "replicated":
        from safetensors.torch import load_file

        return load_file(checkpoint / REPLICATED_FILE)
    import torch.distributed.checkpoint as dcp

    check_sharded_metadata(checkpoint)
    template = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    state = {"model": template}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_FOLDER))  # the shards, reassembled
    return state["model"]


def export_checkpoint(checkpoint: Path, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the model of step checkpoint `checkpoint` as a Hugging Face folder `out`; returns what was exported."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    checkpoint = Path(checkpoint)
    kind = checkpoint_kind(checkpoint)
    try:
        cfg, state, tokenizer, model = _read(checkpoint, kind)
    except (Exception, CheckpointException) as e:
        gone = _gone(checkpoint, read=True)  # removed while it was read: the training that wrote it rotated it away
        if gone is None:
            raise
        raise gone from e
    full = dict(model.state_dict())
    record = {"checkpoint": str(checkpoint.absolute()), "kind": kind, "step": state["step"], "tokens": state["tokens"]}
    extra = {STATE_FILE: json.dumps(state) + "\n"}
    write_model_folder(
        model, full, tokenizer, cfg, Path(out), overwrite=overwrite, extra=extra, inputs=(checkpoint,), progress=state
    )
    return record


def _read(checkpoint: Path, kind: str) -> tuple[TrainConfig, dict[str, Any], Any, torch.nn.Module]:
    """The run's config, the train state, the tokenizer and the model with the checkpoint's weights."""
    cfg = configlib.load(TrainConfig, checkpoint / TRAIN_CONFIG)
    state = read_state(checkpoint)
    for setting in ("path", "config", "tokenizer"):  # a deleted source folder: say so, not "Repo id must be..."
        value = getattr(cfg.model, setting)
        if value and not looks_like_repo_id(str(value)) and not Path(value).exists():
            raise UptrainError(
                f"the run of {checkpoint} read model.{setting} from {value}, which no longer exists; export "
                "takes the model's config and tokenizer from there: restore that folder"
            )
    tokenizer_from = cfg.model.tokenizer or cfg.model.path
    if tokenizer_from is None:  # from scratch: the folder of the config
        where = Path(str(cfg.model.config))
        tokenizer_from = str(where.parent if where.is_file() else where)
    tokenizer = load_tokenizer(tokenizer_from, None if cfg.model.tokenizer else cfg.model.revision)
    from torch.distributed.checkpoint.api import CheckpointException

    model = _structure(cfg)
    try:
        weights = _weights(checkpoint, kind, model)
    except UptrainError:
        raise
    except (Exception, CheckpointException) as e:  # a missing, truncated or empty shard: many types
        raise UptrainError(
            f"cannot read the weights of {checkpoint}: it is damaged or incomplete ({type(e).__name__}: "
            f"{first_line(e)}); "
            "export another checkpoint"
        ) from e
    model.load_state_dict(weights, strict=False, assign=True)
    model.tie_weights()  # a replicated checkpoint stores a tied head once
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UptrainError(f"{checkpoint} lacks weights for {', '.join(missing[:3])}; it does not match its config")
    return cfg, state, tokenizer, model
