"""The source model run one decoder layer at a time, so memory holds one layer's weights plus the
hidden states of the tokens it reads (calibration, and `plan --quality`'s estimates).

1. the model is built with empty (meta) weights; only the modules before the first layer
   (embeddings, rotary tables) get real weights;
2. a forward over every window records what the model hands each decoder layer (hidden states
   for the first, masks and rotary tables for all) without running any layer;
3. the pass (conversion/walk.py) then loads one layer's weights (`load_layer`), runs the windows through it,
   hands each `Visitor` what the layer's attention saw, and drops the weights again (`unload`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import Architecture
from uptrain_gqa.model.shape import ModelShape


@dataclass
class SourceAttention:
    """One calibration window as the source attention saw it: input x (1, T, hidden), the rest of the call
    (rotary tables, masks), and the source's output y (1, T, hidden)."""

    x: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    y: torch.Tensor
    may_hold_out: bool = True
    """The window may be kept out of a refinement's fit to judge it (refine.split_windows)."""
    label: str = ""
    """The calibration text the window comes from."""


def attention_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, the other positional arguments, the keyword arguments) of an attention call."""
    if "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), args, kwargs
    return args[0], args[1:], kwargs


@dataclass
class LayerState:
    """What the pass knows of layer `index` once its calibration windows ran; visitors, in order, read what the
    ones before them left."""

    index: int
    sigma: torch.Tensor | None = None
    """Σ̃ (hidden+1, hidden+1) of the attention input (calibrate.Covariance)."""
    converted: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Per G: the layer's attention tensors as `convert` writes them (merge.LayerMerger, when asked)."""


class Visitor(Protocol):
    """Work on each layer while the pass holds it in memory: Σ, each G's merge (and refinement), held-out scores."""

    label: str
    """What it adds to the progress bar's description ("" for nothing)."""
    units: int
    """Progress-bar units each layer's `layer` call accounts for."""
    windows: list[torch.Tensor]
    """Token ids (B, L) it runs through the source beside the calibration windows (not part of Σ)."""
    keeps_windows: bool
    """Holds every calibration window's attention input and output until the layer is done (memory)."""

    def begin(self, source: LayeredSource, first: int) -> None:
        """Before layer 0: `source` holds `windows` as its windows first, first + 1, ..."""

    def window(self, layer: int, seen: SourceAttention) -> None:
        """One calibration window through layer `layer`'s attention, as the source ran it."""

    def layer(self, state: LayerState, done: Callable[[], None]) -> None:
        """Layer `state.index` ran every calibration window; call `done` once per unit of work."""

    def release(self, state: LayerState) -> None:
        """Every visitor is done with the layer: drop what was held for it."""


class _Stop(Exception):
    """Raised by the last layer's recorder: the recording forward needs nothing after it."""


class LayeredSource:
    """The source's decoder layers, loaded one at a time, and what each receives for every window.

    `hidden[w]`: window w's hidden states entering the first layer; `inputs[i][w]`: the other
    arguments (masks, rotary tables) layer i receives for window w. `purpose` names the option that
    needs this and `hint` what to do instead, for error messages."""

    def __init__(
        self,
        reader: CheckpointReader,
        arch: Architecture,
        shape: ModelShape,
        windows: list[torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        purpose: str,
        hint: str = "",
    ) -> None:
        from accelerate import init_empty_weights
        from accelerate.utils import set_module_tensor_to_device
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader, self.arch, self.shape, self.device, self.dtype = reader, arch, shape, device, dtype
        src = reader.folder
        config = AutoConfig.from_pretrained(src)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            self.model = AutoModelForCausalLM.from_config(config).eval()
        for name, _ in self.model.named_buffers():
            set_module_tensor_to_device(self.model, name, device)
        self.prefix = arch.attention.rsplit(".", 2)[0]  # "model.layers" from "model.layers.{layer}.self_attn"
        self.layers = self.model.get_submodule(self.prefix)
        if not isinstance(self.layers, torch.nn.ModuleList) or len(self.layers) != shape.layers:
            raise UptrainError(f"{src}: expected {shape.layers} decoder layers under {self.prefix}; cannot run it")
        head = self.model.get_output_embeddings()
        self.head_names = tuple(f"{n}." for n, m in self.model.named_modules() if m is head and n)
        # weights are read by the module's own names; a family whose checkpoints transformers renames
        # or fuses at load time (MoE experts) cannot be run this way
        missing = [
            n for n, _ in self.model.named_parameters() if not n.startswith(self.head_names) and n not in reader.tensors
        ]
        if missing:
            raise UptrainError(
                f"{purpose} runs {config.model_type} one layer at a time by parameter name, but {src} stores "
                f"{missing[0]} (and {len(missing) - 1} more) under other names{hint}"
            )
        self._load(
            [n for n, _ in self.model.named_parameters() if not n.startswith((*self.head_names, f"{self.prefix}."))]
        )
        self.windows = windows
        self.hidden: list[torch.Tensor] = []
        self.inputs: dict[int, list[tuple[tuple, dict]]] = {i: [] for i in range(shape.layers)}
        self._record(windows)

    def _load(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, self.device, value=self.reader.read(name), dtype=self.dtype)

    def _record(self, windows: list[torch.Tensor]) -> None:
        def recorder(i: int):
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                x = args[0] if args else kwargs.pop("hidden_states")
                if i == 0:
                    self.hidden.append(x)
                self.inputs[i].append((args[1:], kwargs))
                if i == self.shape.layers - 1:
                    raise _Stop
                return x

            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = recorder(i)  # an instance attribute shadows the class's forward
        try:
            for ids in windows:
                with contextlib.suppress(_Stop):
                    self.model(ids, use_cache=False)
        finally:
            for layer in self.layers:
                del layer.forward
        if any(len(v) != len(windows) for v in self.inputs.values()):
            reached = sum(len(v) == len(windows) for v in self.inputs.values())
            raise UptrainError(
                f"the windows reached {reached} of {self.shape.layers} decoder layers; is this a decoder?"
            )

    def load_layer(self, i: int) -> list[str]:
        """Layer i's real weights in; returns their names, for `unload`."""
        names = [f"{self.prefix}.{i}.{n}" for n, _ in self.layers[i].named_parameters()]
        self._load(names)
        return names

    def unload(self, names: list[str]) -> None:
        """Back to meta: one layer's weights in memory at a time."""
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            set_module_tensor_to_device(self.model, name, "meta")

    def run_layer(self, i: int, hidden: list[torch.Tensor], first: int = 0) -> list[torch.Tensor]:
        """Hidden states of windows first, first+1, ... (one per entry of `hidden`) through layer i (loaded)."""
        out = []
        for x, (args, kwargs) in zip(hidden, self.inputs[i][first : first + len(hidden)], strict=True):
            y = self.layers[i](x, *args, **kwargs)
            out.append(y[0] if isinstance(y, tuple) else y)
        return out

    def load_head(self) -> None:
        """The output head's weights in (the input embedding's when tied), for `logits`."""
        self.model.tie_weights()
        for name, p in self.model.named_parameters():
            if p.is_meta and name.startswith(self.head_names):
                self._load([name])

    def logits(self, w: int, final: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Window w's logits from `final`, the hidden states leaving the last decoder layer (of the window's
        `rows` when it holds several): the model's own forward, its decoder layers passed through (the first
        hands on `final`), so the final norm and head run as the model runs them."""

        def first(*args: Any, **kwargs: Any) -> torch.Tensor:
            return final

        def passed(*args: Any, **kwargs: Any) -> torch.Tensor:
            return args[0] if args else kwargs["hidden_states"]

        for i, layer in enumerate(self.layers):
            layer.forward = first if i == 0 else passed
        try:
            return self.model(self.windows[w][rows], use_cache=False).logits
        finally:
            for layer in self.layers:
                del layer.forward
