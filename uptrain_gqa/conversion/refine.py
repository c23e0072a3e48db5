"""Layer-wise refinement (`uptrain convert --refine-steps`): fit each merged attention's output to the source's.

The closed-form merges fit the K and V projections on their own; what a layer computes is
o_proj(softmax(q·kᵀ)·v), and neither the softmax nor the way K and V errors combine is in their
objective. Refinement starts from the closed-form merge of a layer and optimises every parameter of
the converted attention module — q/k/v/o projections (or the fused qkv), their biases and the
attention's own norms — so that its output matches the source attention's output on the calibration
text (relative squared error, Adam, cosine decay). Only values change: the module is the family's
own transformers attention with G KV heads, so the output stays a standard GQA checkpoint, and
fused QKV, key norms, partial rotary, sliding windows and soft-capping are whatever that module does.

It runs inside the calibration pass (uptrain_gqa.conversion.calibrate), one layer at a time, while that
layer's source weights and captured attention inputs/outputs are in memory; the refined tensors go to
a `RefinedStore` on disk and replace the closed-form ones when the output is written. The last
⌈windows/8⌉ calibration windows are held out: a layer keeps its refined weights only if they lower the
error there, so refinement never makes a layer worse than its closed-form start on unseen text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.conversion.checks import TensorChecks
from uptrain_gqa.conversion.layouts import layer_steps
from uptrain_gqa.conversion.steps import MergeOptions
from uptrain_gqa.device import compute_device
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.model.families import Architecture
from uptrain_gqa.model.shape import ModelShape

DEFAULT_STEPS = 36
"""Steps per layer when the source reads calibration text (docs/results.md: refinement on SmolLM2-135M)."""
DEFAULT_LR = 1e-3
MAX_LR = 1.0
"""Largest --refine-lr accepted: Adam moves each weight by about lr a step, and the weights it starts from are
of order 0.01-0.1, so a rate above 1 discards the merge in the first step (a non-finite one did nothing at all
and wrote Infinity into the record; 1e308 overflowed Adam)."""


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


@dataclass
class SourceAttention:
    """One calibration window as the source attention saw it: input x (1, T, hidden), the rest of the call
    (rotary tables, masks), and the source's output y (1, T, hidden)."""

    x: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    y: torch.Tensor
    may_hold_out: bool = True
    """The window may be kept out of the fit to judge it (see `split_windows`)."""
    label: str = ""
    """The calibration text the window comes from."""


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


def closed_form(
    reader: Any,
    checks: TensorChecks,
    arch: Architecture,
    shape: ModelShape,
    options: MergeOptions,
    layer: int,
    sigma: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """One layer's converted attention tensors as `uptrain convert` writes them without refinement (merged
    with `sigma`, that layer's Σ̃), and the merge's errors (None for merges that report none)."""
    steps = layer_steps(layer, checks, arch, shape, dataclasses.replace(options, sigma={layer: sigma}))
    tensors = {
        step.spec.name: torch.cat(list(step.chunks(reader))).reshape(step.spec.shape)
        for replaced in steps.replaced.values()
        for step in replaced
    }
    return tensors, next((m.errors for m in steps.merges), None)


def spill(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` as the safetensors file `path`, a spill beside the output (Σ, refined tensors). A write the
    OS refuses (a full disk above all) raises the OSError the final shard writer raises, without the spill's
    internal path, so it reads as the same one line; safetensors' own error type would end in a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except (OSError, SafetensorError) as e:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (found := re.search(r"\(os error (\d+)\)", str(e))):  # safetensors: "... (os error 28)"
            code = int(found[1])
        if code is None:
            raise
        raise OSError(code, os.strerror(code)) from e


class RefinedStore(Mapping[str, torch.Tensor]):
    """{tensor name: refined tensor}, one safetensors file per layer in `folder`, read one tensor at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, Path] = {}

    def put(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"layer-{layer:05d}.safetensors"
        spill({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, path)
        self._where |= dict.fromkeys(tensors, path)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._where[name]
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def job(self, name: str) -> Callable[[Any], torch.Tensor]:
        """A step's job that hands out the refined tensor `name` (the reader is not needed)."""
        return lambda _reader: self[name]


class LayerRefiner:
    """Builds each layer's converted attention (the family's module with G KV heads) from the closed-form
    merge, refines it on the captured windows and stores the result; one layer's module at a time."""

    def __init__(
        self,
        settings: Refinement,
        reader: Any,
        arch: Architecture,
        shape: ModelShape,
        options: MergeOptions,
        store: RefinedStore,
    ) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.settings, self.reader, self.arch, self.shape, self.options = settings, reader, arch, shape, options
        self.store, self.device = store, compute_device()
        self.checks = TensorChecks(reader.tensors, shape)
        converted = AutoConfig.from_pretrained(reader.folder)
        setattr(converted, arch.kv_heads_field, options.num_kv_heads)
        with init_empty_weights(include_buffers=False):  # one attention module gets real weights at a time
            self.model = AutoModelForCausalLM.from_config(converted)
        self.layers: list[dict[str, Any]] = []
        """Per layer: the closed-form merge's groups and errors, and what refinement did."""
        self.held_out: list[str] = []
        """The calibration texts of the windows that decide whether a layer keeps its refinement."""

    def refine(self, layer: int, sigma: torch.Tensor, windows: list[SourceAttention]) -> torch.nn.Module:
        """The layer's converted attention (float32, on the device), refined; its tensors are in the store
        when refinement lowered the held-out error. Call `release` when done with the module."""
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.arch.attention.format(layer=layer)
        attention = self.model.get_submodule(prefix)
        tensors, errors = closed_form(self.reader, self.checks, self.arch, self.shape, self.options, layer, sigma)
        for name, _ in attention.named_parameters():
            full = f"{prefix}.{name}"
            value = tensors[full] if full in tensors else self.reader.read(full)
            set_module_tensor_to_device(attention, name, self.device, value=value, dtype=torch.float32)
        for name, _ in attention.named_buffers():
            set_module_tensor_to_device(attention, name, self.device)
        result = refine_attention(attention, windows, self.settings)
        if result["kept"]:
            self.store.put(layer, {f"{prefix}.{n}": p for n, p in attention.named_parameters()})
        self.held_out = result.pop("held_out")  # the same windows for every layer
        self.layers.append({"layer": layer, **(errors or {}), "refinement": result})
        return attention

    def tensors(self, layer: int, attention: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{checkpoint name: tensor} of `refine`'s module: what `uptrain convert` writes for the layer (refined, or
        the closed form where refining did not help)."""
        prefix = self.arch.attention.format(layer=layer)
        return {f"{prefix}.{n}": p for n, p in attention.named_parameters()}

    def release(self, attention: torch.nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in attention.named_parameters():
            set_module_tensor_to_device(attention, name, "meta")

    def record(self) -> dict[str, Any]:
        done = [r["refinement"] for r in self.layers]
        return self.settings.record() | {
            "held_out": self.held_out,
            "layers_improved": sum(r["kept"] for r in done),
            "seconds": round(sum(r["seconds"] for r in done), 3),
        }
