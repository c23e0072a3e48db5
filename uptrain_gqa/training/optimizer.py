"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from uptrain_gqa.training.config import OptimConfig


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
