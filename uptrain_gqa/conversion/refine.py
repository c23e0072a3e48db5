"""Layer-wise refinement (`uptrain convert --refine-steps`): fit each merged attention's output to the source's.

The closed-form merges fit the K and V projections on their own; what a layer computes is
o_proj(softmax(q·kᵀ)·v), and neither the softmax nor the way K and V errors combine is in their
objective. Refinement starts from the closed-form merge of a layer and optimises every parameter of
the converted attention module — q/k/v/o projections (or the fused qkv), their biases and the
attention's own norms — so that its output matches the source attention's output on the calibration
text (relative squared error, Adam, cosine decay). Only values change: the module is the family's
own transformers attention with G KV heads, so the output stays a standard GQA checkpoint, and
fused QKV, key norms, partial rotary, sliding windows and soft-capping are whatever that module does.

It runs inside the pass (conversion/walk.py, through merge.LayerMerger), one layer at a time, while that
layer's source weights and captured attention inputs/outputs are in memory; what the layer keeps is written
as it is. The last
⌈windows/8⌉ calibration windows are held out: a layer keeps its refined weights only if they lower the
error there, so refinement never makes a layer worse than its closed-form start on unseen text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from uptrain_gqa.conversion.layered import SourceAttention
from uptrain_gqa.device import compute_device
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.model.families import Architecture

DEFAULT_STEPS = 36
"""Steps per layer when the source reads calibration text (why: docs/results.md)."""
DEFAULT_LR = 1e-3
MAX_LR = 1.0
"""Largest --refine-lr accepted: Adam moves each weight by about lr a step, and the merged weights it starts from
are well below 1, so a larger rate discards the merge in the first step (and a non-finite one would write
Infinity into the record)."""


@dataclass(frozen=True)
class Refinement:
    """How each merged attention layer is fitted to the source's."""

    steps: int = DEFAULT_STEPS
    """Adam steps per layer, one calibration window each (0: the closed-form merge only)."""
    lr: float = DEFAULT_LR
    """Peak learning rate, decayed to 0 by a cosine over the steps."""
    seed: int = 0
    """Order in which the windows are visited."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise UptrainError(f"--refine-steps must not be negative, got {self.steps}")
        if not 0 < self.lr <= MAX_LR:  # NaN fails too
            raise UptrainError(
                f"--refine-lr must be positive and at most {MAX_LR:g} (0 < lr <= {MAX_LR:g}; default {DEFAULT_LR:g}), "
                f"got {self.lr}"
            )

    def record(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "objective": "relative squared error of the attention output"}


def split_windows(n: int, may_hold_out: list[bool] | None = None) -> tuple[list[int], list[int]]:
    """(trained on, held out): ⌈n/8⌉ windows are held out, the last of those that may be (all by default; with
    a user's text mixed with built-in text, the built-in windows); a single window is both."""
    if n < 2:
        return list(range(n)), list(range(n))
    eligible = [i for i in range(n) if may_hold_out is None or may_hold_out[i]] or list(range(n))
    held = eligible[-math.ceil(n / 8) :]
    return [i for i in range(n) if i not in held], held


def _output(attention: torch.nn.Module, w: SourceAttention, dtype: torch.dtype) -> torch.Tensor:
    """The attention's output on the window's input, cast to the attention's `dtype`."""
    out = attention(w.x.to(dtype), *w.args, **w.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def relative_error(attention: torch.nn.Module, windows: list[SourceAttention], dtype: torch.dtype) -> float:
    """Σ‖f(x) − y‖² / Σ‖y‖² over the windows."""
    err, ref = 0.0, 0.0
    for w in windows:
        y = w.y.to(dtype)
        err += float((_output(attention, w, dtype) - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-30)


def refine_attention(
    attention: torch.nn.Module, windows: list[SourceAttention], settings: Refinement, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Fit `attention` (the converted module, parameters in `dtype`) to the windows' source outputs, in place.
    Keeps the closed-form start when refining does not lower the held-out error. Returns what was done."""
    started = time.perf_counter()
    train, held = split_windows(len(windows), [w.may_hold_out for w in windows])
    held_out = [windows[i] for i in held]
    before = relative_error(attention, held_out, dtype)
    result: dict[str, Any] = {"error_before": before, "error_after": before, "kept": False, "steps": 0,
                              "held_out": [w.label for w in held_out]}  # fmt: skip
    if settings.steps == 0 or not train:
        return result | {"seconds": round(time.perf_counter() - started, 3)}
    start = {n: p.detach().clone() for n, p in attention.named_parameters()}
    params = [p for p in attention.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps))
    )
    order = _visits(train, settings.seed)
    with torch.enable_grad():
        for step in range(settings.steps):
            w = windows[next(order)]
            y = w.y.to(dtype)
            # relative squared error of this window: layers with large outputs do not dominate the step size
            loss = (_output(attention, w, dtype) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            result["steps"] = step + 1
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    after = relative_error(attention, held_out, dtype)
    if not math.isfinite(after) or after >= before:  # never worse than the closed form on held-out text
        with torch.no_grad():
            for n, p in attention.named_parameters():
                p.copy_(start[n])
    else:
        result |= {"error_after": after, "kept": True}
    return result | {"seconds": round(time.perf_counter() - started, 3)}


def _visits(train: list[int], seed: int) -> Iterator[int]:
    """Training windows in seeded random order, every window once before any twice."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from (train[i] for i in torch.randperm(len(train), generator=gen).tolist())


class ConvertedAttention:
    """The family's attention module with G KV heads (its transformers class, so fused QKV, key norms, partial
    rotary, sliding windows and soft-capping are what the family does), built with empty weights; one layer's
    module gets real weights at a time."""

    def __init__(self, reader: Any, arch: Architecture, num_kv_heads: int) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader, self.arch, self.device = reader, arch, compute_device()
        converted = AutoConfig.from_pretrained(reader.folder)
        setattr(converted, arch.kv_heads_field, num_kv_heads)
        with init_empty_weights(include_buffers=False):  # one attention module gets real weights at a time
            self.model = AutoModelForCausalLM.from_config(converted)

    def load(self, layer: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Layer `layer`'s attention, float32 on the device: `tensors` where given (its merge), the source's
        otherwise. Call `release` when done with it."""
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.arch.attention.format(layer=layer)
        attention = self.model.get_submodule(prefix)
        for name, _ in attention.named_parameters():
            full = f"{prefix}.{name}"
            value = tensors[full] if full in tensors else self.reader.read(full)
            set_module_tensor_to_device(attention, name, self.device, value=value, dtype=torch.float32)
        for name, _ in attention.named_buffers():
            set_module_tensor_to_device(attention, name, self.device)
        return attention

    def tensors(self, layer: int, attention: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{checkpoint name: tensor} of the loaded module."""
        prefix = self.arch.attention.format(layer=layer)
        return {f"{prefix}.{n}": p for n, p in attention.named_parameters()}

    def release(self, attention: torch.nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in attention.named_parameters():
            set_module_tensor_to_device(attention, name, "meta")
