"""Calibration for `uptrain convert --calibration`: Σ = E[x̃ x̃ᵀ] of every attention layer's input.

The source model reads the calibration text once; a forward pre-hook on each attention module
adds xᵀx (and the sum of x) for its input x, the hidden states after the layer's input norm.
Σ stays on the layer's device in float32 (hidden² per layer); on GPUs the model is spread with
accelerate's device_map="auto", which offloads to CPU memory when the GPUs are full.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from uptrain.architectures import Architecture, AttentionShape
from uptrain.errors import UptrainError


@torch.no_grad()
def input_covariance(
    src: Path, arch: Architecture, shape: AttentionShape, files: str, tokens: int, quiet: bool = False
) -> dict[int, torch.Tensor]:
    """{layer: Σ̃ (hidden+1, hidden+1)}: [[E[x xᵀ], E[x]], [E[x]ᵀ, 1]] over `tokens` calibration tokens."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uptrain.data import expand_files
    from uptrain.evaluate import token_stream
    from uptrain.train_config import DataConfig

    if tokens < 1:
        raise UptrainError(f"--calibration-tokens must be positive, got {tokens}")
    expand_files([files])  # a clear error for a missing file or an empty glob
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": "auto"} if cuda else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    stream, _ = token_stream(DataConfig(files=[files]), tokenizer, tokens)
    if len(stream) < tokens:
        print(f"calibration text has {len(stream):,} tokens, fewer than {tokens:,}; using them all", file=sys.stderr)
    seq = min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)

    stats: dict[int, list[Any]] = {}  # layer -> [Σ xᵀx, Σ x, count]

    def hook(layer: int):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            x = x.reshape(-1, x.shape[-1]).float()  # (B·T, hidden)
            s = stats.setdefault(layer, [0.0, 0.0, 0])
            s[0] = s[0] + x.T @ x
            s[1] = s[1] + x.sum(0)
            s[2] += x.shape[0]

        return pre

    handles = [
        model.get_submodule(arch.attention.format(layer=i)).register_forward_pre_hook(hook(i), with_kwargs=True)
        for i in range(shape.layers)
    ]
    device = next(model.parameters()).device
    try:
        for begin in tqdm(range(0, len(stream), seq), desc="calibration", unit="window", disable=quiet):
            model(stream[begin : begin + seq][None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, (xx, xs, n) in stats.items():
        sigma = torch.ones(shape.hidden_size + 1, shape.hidden_size + 1)
        sigma[:-1, :-1] = (xx / n).cpu()
        sigma[:-1, -1] = sigma[-1, :-1] = (xs / n).cpu()
        out[layer] = sigma
    if len(out) != shape.layers:
        raise UptrainError(f"calibration reached {len(out)} of {shape.layers} attention layers; is this a decoder?")
    return out
