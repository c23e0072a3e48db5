"""The model to train and the distillation teacher: loaded, compiled, frozen where optim.trainable says."""

from __future__ import annotations

import torch

from uptrain_gqa.device import compute_device, inference_dtype
from uptrain_gqa.model.loading import read_model_config
from uptrain_gqa.training.config import DistillConfig, ModelConfig
from uptrain_gqa.training.preflight import RunModel, trainable_names


def load_model(m: ModelConfig, info: RunModel, *, meta: bool = False) -> torch.nn.Module:
    """The model to train, on the CPU; with `meta`, only its structure (no memory; the weights come later).
    Its layers are compiled (model.compile) by the run's parallelism, where its wrapping allows."""
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
