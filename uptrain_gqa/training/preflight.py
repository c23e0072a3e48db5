"""Checks before any work: what a run config names, read without loading any weights.

The model's config and stored dtype, the data files, the tokenizer and the teacher; and the settings
left unset that depend on the model (`fit_to_model`).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.data.config import DEFAULT_SEQ_LEN, fitted
from uptrain_gqa.data.documents import expand_files
from uptrain_gqa.device import launched_processes
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import CONVERSION_RECORD
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.io.tensors import SAFE_INDEX, SAFE_SINGLE
from uptrain_gqa.model.loading import check_model_folder, load_tokenizer, read_model_config
from uptrain_gqa.model.shape import matmul_parameters
from uptrain_gqa.training.budget import default_global_batch
from uptrain_gqa.training.config import DistillConfig, ModelConfig, TrainConfig


@dataclass
class RunModel:
    """What preflight learned about the model without loading its weights."""

    config: Any
    """The transformers config of the model to train."""
    source: str | None
    """Folder or Hub id of the pretrained weights (None from scratch)."""
    stored_dtype: torch.dtype
    """The dtype the source weights were stored in."""
    matmul_params: int
    """N for 6·N·D: all parameters except an untied input embedding table."""
    tied_embeddings: bool = False
    """The output head is the input embedding table: N counts it once, as the head's matmul."""


def stored_dtype(source: str | None, config: Any) -> torch.dtype:
    """The dtype most of the source's floating-point weights are stored in (float32 from scratch)."""
    if source is not None and ((Path(source) / SAFE_INDEX).is_file() or (Path(source) / SAFE_SINGLE).is_file()):
        sizes: dict[torch.dtype, int] = {}
        for t in CheckpointReader(Path(source)).tensors.values():
            if t.dtype.is_floating_point:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
        if sizes:
            return max(sizes, key=sizes.__getitem__)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and source is not None else torch.float32


def _model_config(m: ModelConfig) -> tuple[Any, str | None]:
    """(transformers config, folder or Hub id of the weights; None from scratch)."""
    if m.init == "pretrained":
        assert m.path is not None
        check_model_folder(m.path, "model.path ")  # a step checkpoint or run folder: say which folder to give
        if Path(m.path).exists() and not (Path(m.path) / "config.json").is_file():
            raise UptrainError(f"model.path {m.path} has no config.json; is it a Hugging Face checkpoint folder?")
        return read_model_config(m.path, m.revision), m.path
    assert m.config is not None
    if not Path(m.config).exists():
        raise UptrainError(f"model.config {m.config} not found")
    return read_model_config(m.config), None


def fit_to_model(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """`cfg` with the settings left unset that depend on the model filled in (data.seq_len from its maximum
    positions, batch.global_batch_size from its size and the processes), and a line saying each value chosen."""
    if cfg.data.seq_len is not None and cfg.batch.global_batch_size is not None:
        return cfg, []
    config, _ = _model_config(cfg.model)
    notes = []
    data = fitted(cfg.data, getattr(config, "max_position_embeddings", None))
    assert data.seq_len is not None
    if cfg.data.seq_len is None:
        notes.append(f"data.seq_len {data.seq_len} (the default {DEFAULT_SEQ_LEN}, at most the model's maximum)")
    batch = cfg.batch
    if batch.global_batch_size is None:
        params, _ = matmul_parameters(config)
        per_step = batch.micro_batch_size * launched_processes()
        size = default_global_batch(params, data.seq_len, per_step)
        batch = replace(batch, global_batch_size=size)
        notes.append(
            f"batch.global_batch_size {size} ({size * data.seq_len:,} tokens per step for {params / 1e6:,.1f}M "
            f"parameters, in micro-batches of {batch.micro_batch_size} on {per_step // batch.micro_batch_size} "
            "process(es))"
        )
    return replace(cfg, data=data, batch=batch), notes


def preflight(cfg: TrainConfig) -> tuple[RunModel, Any]:
    """Every check that needs files, before any work: data, model, positions, tokenizer, teacher."""
    expand_files(cfg.data.files)
    expand_files(cfg.data.validation_files, "data.validation_files")
    for src in cfg.data.mixture:  # each local source too, as data.files is
        expand_files(src.files, f"data.mixture[{src.label}].files")
        expand_files(src.validation_files, f"data.mixture[{src.label}].validation_files")
    m = cfg.model
    config, source = _model_config(m)
    max_positions = getattr(config, "max_position_embeddings", None)
    assert cfg.data.seq_len is not None, "fit_to_model sets it"
    if max_positions is not None and cfg.data.seq_len > max_positions:
        raise UptrainError(
            f"data.seq_len {cfg.data.seq_len} is above the model's max_position_embeddings {max_positions}; "
            "lower data.seq_len"
        )
    if m.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UptrainError("model.attn_implementation flash_attention_2 needs the flash-attn package; or use sdpa")
    if m.tokenizer or m.path:
        tokenizer = load_tokenizer(m.tokenizer or m.path, None if m.tokenizer else m.revision)  # type: ignore[arg-type]
    else:  # from scratch: the folder of the config
        where = Path(m.config)  # type: ignore[arg-type]
        tokenizer = load_tokenizer(str(where.parent if where.is_file() else where))
    if len(tokenizer) > config.vocab_size:
        raise UptrainError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if cfg.optim.trainable is not None:  # names from an empty-weight skeleton: nothing is loaded yet
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():
            trainable_names(AutoModelForCausalLM.from_config(config), cfg.optim.trainable)
    if cfg.distill.teacher:
        check_teacher(cfg.distill, m)
        teacher_cfg = read_model_config(cfg.distill.teacher)
        teacher_tok = load_tokenizer(cfg.distill.teacher, setting="distill.teacher to a folder with a tokenizer")
        if teacher_cfg.vocab_size != config.vocab_size or teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise UptrainError(
                f"the teacher {cfg.distill.teacher} has another vocabulary (vocab_size {teacher_cfg.vocab_size} "
                f"vs {config.vocab_size}, or different tokens); distillation needs the same tokenizer"
            )
    n, tied = matmul_parameters(config)
    return RunModel(config, source, stored_dtype(source, config), n, tied), tokenizer


def check_teacher(d: DistillConfig, m: ModelConfig) -> None:
    """distill.teacher names a model folder (not a file in it) or a Hub id, and another model than the student."""
    teacher = d.teacher
    if not teacher:
        return
    path = Path(teacher)
    if path.is_file():
        raise UptrainError(f"distill.teacher {teacher} is a file; give the teacher's folder ({path.parent})")
    if path.exists():
        check_model_folder(path, "distill.teacher ")
        if not (path / "config.json").is_file():
            raise UptrainError(f"distill.teacher {teacher} has no config.json; is it a Hugging Face checkpoint folder?")
    if m.init != "pretrained" or not m.path:
        return
    student = Path(m.path)
    if path.exists() and student.exists():
        same = path.resolve() == student.resolve()
    else:  # Hub ids (the teacher is read at the default revision)
        same = teacher.rstrip("/") == m.path.rstrip("/") and m.revision in (None, "main")
    if same:
        raise UptrainError(
            f"distill.teacher {teacher} is the model being trained (model.path {m.path}); a model distilled into "
            f"itself learns nothing from the KL term: give the source (MHA) checkpoint it was converted from"
            f"{_converted_from(student)}, or leave distill.teacher empty"
        )


def _converted_from(model: Path) -> str:
    """' (PATH)': the source `uptrain convert` read, from the model's conversion record; '' when unknown."""
    try:
        source = json.loads((model / CONVERSION_RECORD).read_text())["source"]
        where = source.get("repo_id") or source.get("path")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""
    return f" ({where})" if isinstance(where, str) and where else ""


def trainable_names(model: torch.nn.Module, pattern: str) -> set[str]:
    """Names of the parameters optim.trainable matches; refuses a pattern that matches none."""
    names = {n for n, _ in model.named_parameters() if re.search(pattern, n)}
    if not names:
        some = ", ".join(n for n, _ in list(model.named_parameters())[:3])
        raise UptrainError(f"optim.trainable={pattern!r} matches no parameter of the model (names look like: {some})")
    return names
