"""The model side of training: checks before any work, loading, optimizer, schedule, final save."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa import config as configlib
from uptrain_gqa.data.config import DEFAULT_SEQ_LEN, fitted, validation_description
from uptrain_gqa.data.documents import expand_files
from uptrain_gqa.device import compute_device, inference_dtype, launched_processes
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.cards import licence_files, source_licence, write_card
from uptrain_gqa.io.folders import CONVERSION_RECORD, TRAIN_CONFIG, atomic_output_dir, write_failure
from uptrain_gqa.io.hub import looks_like_repo_id
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.io.tensors import SAFE_INDEX, SAFE_SINGLE
from uptrain_gqa.model.loading import check_model_folder, load_tokenizer, read_model_config
from uptrain_gqa.model.shape import matmul_parameters
from uptrain_gqa.training.budget import default_global_batch
from uptrain_gqa.training.checkpointer import failures_everywhere
from uptrain_gqa.training.config import DistillConfig, ModelConfig, OptimConfig, TrainConfig


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


def _stored_dtype(source: str | None, config: Any) -> torch.dtype:
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
    return RunModel(config, source, _stored_dtype(source, config), n, tied), tokenizer


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


def load_model(m: ModelConfig, info: RunModel, *, meta: bool = False, compile: bool = True) -> torch.nn.Module:
    """The model to train, on the CPU; with `meta`, only its structure (no memory; the weights come later)."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, m.dtype)
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                info.config, dtype=dtype, attn_implementation=m.attn_implementation
            )
    elif info.source is None:
        model = AutoModelForCausalLM.from_config(info.config, dtype=dtype, attn_implementation=m.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            info.source, revision=m.revision, dtype=dtype, attn_implementation=m.attn_implementation
        )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if m.compile and compile:
        compile_layers(model)
    return model


def load_teacher(d: DistillConfig, m: ModelConfig, *, meta: bool = False) -> torch.nn.Module:
    """The frozen teacher, on the CPU, in eval mode; with `meta`, only its structure (FSDP2 ranks but 0)."""
    from transformers import AutoModelForCausalLM

    dtype = inference_dtype(compute_device(), cpu=getattr(torch, m.dtype))
    if meta:
        config = read_model_config(d.teacher)  # type: ignore[arg-type]
        with torch.device("meta"):
            teacher = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=m.attn_implementation)
    else:
        teacher = AutoModelForCausalLM.from_pretrained(
            d.teacher, dtype=dtype, attn_implementation=m.attn_implementation
        )
    teacher.requires_grad_(False)
    return teacher.eval()


def compile_layers(model: torch.nn.Module) -> int:
    """torch.compile each decoder layer in place (module tree and state-dict keys unchanged, no
    _orig_mod.): the layers are where the time goes, one compiled graph serves them all, and
    FSDP2's per-layer hooks and activation checkpointing stay outside the graphs. Returns the count."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    for layer in layers:
        layer.compile()
    if not layers:  # a model that names no layer class: the whole forward
        model.compile()
    return len(layers)


def freeze_untrained(model: torch.nn.Module, pattern: str) -> int:
    """Turn off gradients of the parameters `pattern` (optim.trainable) does not match; returns how many
    parameter elements still train. Before sharding or DDP, so neither keeps gradients for frozen ones."""
    names = trainable_names(model, pattern)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def trainable_names(model: torch.nn.Module, pattern: str) -> set[str]:
    """Names of the parameters optim.trainable matches; refuses a pattern that matches none."""
    names = {n for n, _ in model.named_parameters() if re.search(pattern, n)}
    if not names:
        some = ", ".join(n for n, _ in list(model.named_parameters())[:3])
        raise UptrainError(f"optim.trainable={pattern!r} matches no parameter of the model (names look like: {some})")
    return names


def build_optimizer(model: torch.nn.Module, o: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only: norms, biases and embedding tables are not decayed."""
    embeddings = {id(mod.weight) for mod in model.modules() if isinstance(mod, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and all(p.dtype.is_floating_point for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)


def lr_factor(step: int, total: int, o: OptimConfig) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based): linear warmup, then decay to the floor."""
    warmup = round(o.warmup * total) if o.warmup < 1 else int(o.warmup)
    if step < warmup:
        return (step + 1) / warmup
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, steps: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, o))


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
    return _stored_dtype(cfg.model.path, read_model_config(cfg.model.path or "", cfg.model.revision))
