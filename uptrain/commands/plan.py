"""`uptrain plan`."""

from __future__ import annotations

import json as jsonlib
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from uptrain.errors import UptrainError
from uptrain.serving import DTYPE_BYTES, draw, print_plan, served_model, serving_rows, why_none_fits
from uptrain.units import parse_size


def plan(
    model: str | None = None,
    *,
    memory: str = "80GB",
    context: int = 4096,
    batch: int = 1,
    kv_dtype: Literal["bf16", "fp16", "fp8", "fp32"] = "bf16",
    weights_dtype: Literal["bf16", "fp16", "fp8", "int8", "int4", "fp32"] | None = None,
    tp: int = 1,
    num_kv_heads: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    hidden: int | None = None,
    params: float | None = None,
    units: Literal["GB", "GiB"] = "GB",
    plot: str | None = None,
    json: bool = False,
) -> dict[str, Any]:
    """Choose G for a serving budget: KV cache, memory and capacity for every G from MHA to MQA.

    For each G dividing the attention heads: the KV cache of one request and of the batch at the
    context length, weights + cache per GPU against the memory, how many such requests fit, the
    KV bytes each decoded token reads, and H/G. The recommendation is the largest G (closest to
    the original quality) that fits the batch, divides --tp, and can be reached by converting
    today's checkpoint. MODEL is a checkpoint folder, a config.json or a Hub id; models not on
    disk are described with --layers --heads --head-dim --params.

    Args:
        model: Checkpoint folder, config.json, or Hub repo id (omit with --layers/--heads/...).
        memory: Memory of each GPU, e.g. 80GB (10^9 bytes) or 80GiB (2^30 bytes).
        context: Tokens per request (prompt + generated).
        batch: Concurrent requests to serve.
        kv_dtype: Storage type of the KV cache.
        weights_dtype: Storage type of the weights; default: the checkpoint's (bf16 for bare numbers).
        tp: Tensor-parallel degree: GPUs that share the weights and the KV heads.
        num_kv_heads: A G to draw in the plot (default: the recommendation); must divide the heads.
        layers: Number of layers (models not on disk).
        heads: Attention (query) heads per layer.
        kv_heads: Today's KV heads (default: heads, i.e. MHA).
        head_dim: Dimension of each head.
        hidden: Hidden size (default: heads x head_dim); only the K/V weight savings use it.
        params: Parameter count, e.g. 13e9.
        units: Print sizes in GB (10^9 bytes) or GiB (2^30 bytes).
        plot: Write a PNG of KV cache against context for MHA, the chosen G and MQA (needs matplotlib).
        json: Print the plan as JSON.
    """
    _check_numbers(model, memory, context=context, batch=batch, tp=tp, num_kv_heads=num_kv_heads, layers=layers,
                   heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, params=params)  # fmt: skip
    m = served_model(model, layers, heads, kv_heads, head_dim, hidden, params, weights_dtype)
    mem = parse_size(memory)
    rows, best = serving_rows(m, mem, context, batch, DTYPE_BYTES[kv_dtype], tp)
    if num_kv_heads is not None and (num_kv_heads < 1 or m.shape.heads % num_kv_heads):
        valid = ", ".join(str(r.num_kv_heads) for r in rows)
        raise UptrainError(f"--num-kv-heads {num_kv_heads} does not divide the {m.shape.heads} heads (valid: {valid})")
    result = {
        "model": m.record(),
        "memory_per_gpu": mem,
        "context": context,
        "batch": batch,
        "kv_dtype": kv_dtype,
        "tp": tp,
        "units": units,
        "rows": [asdict(r) for r in rows],
        "recommended_num_kv_heads": best,
        "reason": why_none_fits(rows, mem, context, batch) if best is None else None,
        "convert": best is not None and best != m.shape.kv_heads,
    }
    if plot:
        draw(m, rows, num_kv_heads or best or 1, mem, context, batch, DTYPE_BYTES[kv_dtype], tp, units, Path(plot))
    if json:
        print(jsonlib.dumps(result, indent=2))
    else:
        print_plan(m, rows, best, mem, context, batch, kv_dtype, tp, units)
    return result


LIMITS = {"layers": 10_000, "heads": 10_000, "kv_heads": 10_000, "head_dim": 65_536, "hidden": 10**7}
"""Far above any real model: larger values are typos (and would only make the table slow)."""


def _check_numbers(model: str | None, memory: str, *, params: float | None, **counts: int | None) -> None:
    """One clear line for every impossible number, before any work."""
    for name, value in counts.items():
        flag = "--" + name.replace("_", "-")
        if value is not None and value < 1:
            raise UptrainError(f"{flag} must be at least 1, got {value}")
        if value is not None and value > LIMITS.get(name, value):
            raise UptrainError(f"{flag} {value:,} is not a real model's (at most {LIMITS[name]:,}); check the number")
    if params is not None and not (math.isfinite(params) and params >= 1):
        raise UptrainError(f"--params must be a parameter count like 7e9, got {params}")
    given = [n for n in ("layers", "heads", "kv_heads", "head_dim", "hidden") if counts.get(n) is not None]
    if model is not None and (given or params is not None):
        flags = ", ".join("--" + n.replace("_", "-") for n in [*given, *(["params"] if params is not None else [])])
        raise UptrainError(f"{flags} describe a model not on disk; with MODEL they would be ignored: leave them out")
    if re.fullmatch(r"\s*[\d.]+\s*", memory):
        n = memory.strip()
        raise UptrainError(f"--memory {n}: give a unit, e.g. {n}GB (10^9 bytes) or {n}GiB (2^30 bytes)")
