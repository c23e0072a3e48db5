"""`uptrain plan`: which G fits a serving budget, and the KV-cache arithmetic behind it.

KV cache of one request at T tokens = Σ over layers 2 (K and V) · G · head_dim · bytes ·
cached(T), where cached(T) = T on full-attention layers and min(T, window − 1) on
sliding-window layers (what transformers' cache keeps). Weights shrink too: each merged KV head
removes 2 · head_dim · hidden parameters per layer. With tensor parallelism of degree N, each GPU
holds 1/N of the weights and of the KV heads (at least one head: GPUs share a head when G < N).
Sizes are printed in GB = 10⁹ bytes unless --units GiB (2³⁰).
"""

from __future__ import annotations

import json as jsonlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from uptrain.architectures import attention_kind
from uptrain.errors import UptrainError
from uptrain.units import parse_size

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
TORCH_TO_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class ServingModel:
    """The shape facts that decide memory: from a config, or given as numbers."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    """KV heads today (H for MHA)."""
    head_dim: int
    hidden: int
    params: int
    """Parameters at today's KV-head count."""
    windows: tuple[int | None, ...] = ()
    """Per layer: the sliding window, or None for full attention (empty: all full)."""
    dtype: str = "bf16"
    """Storage dtype of the weights (a key of DTYPE_BYTES)."""

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "kv_heads", "head_dim", "hidden", "params"):
            if getattr(self, name) < 1:
                raise UptrainError(f"{name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise UptrainError(f"{self.kv_heads} KV heads do not divide {self.heads} attention heads")

    def params_at(self, g: int) -> int:
        """Parameters after converting to G KV heads (K and V projections shrink)."""
        return self.params - 2 * self.layers * (self.kv_heads - g) * self.head_dim * self.hidden

    def cached_tokens(self, tokens: int) -> list[int]:
        windows = self.windows or (None,) * self.layers
        return [tokens if w is None else min(tokens, w - 1) for w in windows]

    def kv_bytes(self, g: int, tokens: int, batch: int = 1, itemsize: float = 2) -> int:
        """Bytes of K and V cached for `batch` requests of `tokens` tokens with G KV heads."""
        per_token_layer = 2 * g * self.head_dim * itemsize
        return int(sum(per_token_layer * t for t in self.cached_tokens(tokens)) * batch)

    def kv_bytes_per_token(self, g: int | None = None, itemsize: float = 2) -> int:
        """The full-attention figure: 2 · layers · G · head_dim · bytes."""
        return int(2 * self.layers * (self.kv_heads if g is None else g) * self.head_dim * itemsize)


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer, the sliding window transformers' cache applies (None: full attention)."""
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * layers
    return tuple(window if t == "sliding_attention" and window else None for t in types)


def model_from_config(config: Any, name: str, params: int | None = None, dtype: str | None = None) -> ServingModel:
    """A ServingModel from a transformers config (parameters counted on a weightless model if not given)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if params is None:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    stored = getattr(config, "dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    return ServingModel(
        name=name,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden=config.hidden_size,
        params=params,
        windows=layer_windows(config),
        dtype=dtype or TORCH_TO_SHORT.get(stored or "", "bf16"),
    )


@dataclass(frozen=True)
class PlanRow:
    """One candidate G. Sizes in bytes; per-GPU figures account for tensor parallelism."""

    num_kv_heads: int
    attention: str
    ratio: float
    """H / G: how many times smaller than MHA the cache is."""
    kv_per_request: int
    """KV cache of one request at the context length (all GPUs together)."""
    kv_batch: int
    """KV cache of the whole batch (all GPUs together)."""
    weights_per_gpu: int
    kv_batch_per_gpu: int
    total_per_gpu: int
    fits: bool
    """Weights + the batch's cache fit in the memory of each GPU."""
    max_requests: int
    """Requests at the context length that fit next to the weights."""
    kv_read_per_token: int
    """Bytes of KV cache one decoded token reads (one request at the context length)."""
    tp_divisible: bool
    reachable: bool
    """G divides today's KV-head count (so `uptrain convert` can produce it)."""
    current: bool


def plan_rows(
    model: ServingModel, memory: int, context: int, batch: int, kv_itemsize: float, tp: int = 1
) -> tuple[list[PlanRow], int | None]:
    """Every G dividing H, MHA first; and the largest G that fits (None when none does)."""
    if memory <= 0 or context <= 0 or batch <= 0 or tp <= 0:
        raise UptrainError("memory, context, batch and tp must all be positive")
    if model.heads % tp:
        raise UptrainError(f"--tp {tp} does not divide the {model.heads} query heads; tensor parallelism shards them")
    rows = []
    weight_itemsize = DTYPE_BYTES[model.dtype]
    for g in sorted((g for g in range(1, model.heads + 1) if model.heads % g == 0), reverse=True):
        weights = math.ceil(model.params_at(g) * weight_itemsize / tp)
        per_gpu_heads = max(1, math.ceil(g / tp))  # a head is never split; with G < tp GPUs share it
        kv_req = model.kv_bytes(g, context, 1, kv_itemsize)
        kv_req_gpu = model.kv_bytes(per_gpu_heads, context, 1, kv_itemsize)
        free = memory - weights
        rows.append(
            PlanRow(
                num_kv_heads=g,
                attention=attention_kind(model.heads, g),
                ratio=model.heads / g,
                kv_per_request=kv_req,
                kv_batch=kv_req * batch,
                weights_per_gpu=weights,
                kv_batch_per_gpu=kv_req_gpu * batch,
                total_per_gpu=weights + kv_req_gpu * batch,
                fits=weights + kv_req_gpu * batch <= memory,
                max_requests=max(0, free // kv_req_gpu) if kv_req_gpu else 0,
                kv_read_per_token=kv_req,
                tp_divisible=g % tp == 0,
                reachable=model.kv_heads % g == 0,
                current=g == model.kv_heads,
            )
        )
    weights = rows[-1].weights_per_gpu
    if weights > memory:
        raise UptrainError(
            f"the weights alone need {weights / 1e9:.2f} GB per GPU, more than the {memory / 1e9:.2f} GB of memory; "
            "add GPUs (--tp) or store the weights in fewer bits (--weights-dtype)"
        )
    if rows[-1].max_requests < 1:
        raise UptrainError(
            f"not even one request of {context:,} tokens fits next to the weights, even with MQA; "
            "shorten --context, add GPUs (--tp) or use --kv-dtype fp8"
        )
    fitting = [r.num_kv_heads for r in rows if r.fits and r.tp_divisible and r.reachable]
    return rows, (max(fitting) if fitting else None)


def _model(
    src: str | None, layers: int | None, heads: int | None, kv_heads: int | None, head_dim: int | None,
    hidden: int | None, params: float | None, weights_dtype: str | None,
) -> ServingModel:  # fmt: skip
    numbers = {"layers": layers, "heads": heads, "head_dim": head_dim, "params": params}
    if src is None:
        missing = [f"--{k.replace('_', '-')}" for k, v in numbers.items() if v is None]
        if missing:
            raise UptrainError(f"give MODEL (a folder, config.json or Hub id) or all of {', '.join(missing)}")
        assert layers and heads and head_dim and params
        return ServingModel(
            name="model given by numbers",
            layers=layers,
            heads=heads,
            kv_heads=kv_heads or heads,
            head_dim=head_dim,
            hidden=hidden or heads * head_dim,
            params=int(params),
            dtype=weights_dtype or "bf16",
        )
    from uptrain.describe import describe
    from uptrain.modeling import read_model_config

    path = Path(src)
    if path.is_file():  # a bare config.json
        return model_from_config(read_model_config(str(path)), str(path), dtype=weights_dtype)
    facts = describe(src)
    dtype = weights_dtype or TORCH_TO_SHORT.get(facts["dtype"], "bf16")
    config = read_model_config(str(facts["source"].get("path") or src), None)
    return model_from_config(config, src, params=facts["parameters"], dtype=dtype)


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
    m = _model(model, layers, heads, kv_heads, head_dim, hidden, params, weights_dtype)
    mem = parse_size(memory)
    rows, best = plan_rows(m, mem, context, batch, DTYPE_BYTES[kv_dtype], tp)
    if num_kv_heads is not None and (num_kv_heads < 1 or m.heads % num_kv_heads):
        valid = ", ".join(str(r.num_kv_heads) for r in rows)
        raise UptrainError(f"--num-kv-heads {num_kv_heads} does not divide the {m.heads} heads (valid: {valid})")
    result = {
        "model": asdict(m) | {"windows": list(m.windows)},
        "memory_per_gpu": mem,
        "context": context,
        "batch": batch,
        "kv_dtype": kv_dtype,
        "tp": tp,
        "units": units,
        "rows": [asdict(r) for r in rows],
        "recommended_num_kv_heads": best,
    }
    if plot:
        draw(m, rows, num_kv_heads or best or 1, mem, context, batch, DTYPE_BYTES[kv_dtype], tp, units, Path(plot))
    if json:
        print(jsonlib.dumps(result, indent=2))
    else:
        print_plan(m, rows, best, mem, context, batch, kv_dtype, tp, units)
    return result


def _size(n: float, units: str) -> str:
    return f"{n / (2**30 if units == 'GiB' else 1e9):,.2f}"


def print_plan(
    m: ServingModel, rows: list[PlanRow], best: int | None, memory: int, context: int, batch: int,
    kv_dtype: str, tp: int, units: str,
) -> None:  # fmt: skip
    u = units
    print(
        f"{m.name}: {m.layers} layers, {m.heads} heads x {m.head_dim}, {m.kv_heads} KV heads today, "
        f"{m.params / 1e9:.2f} B parameters in {m.dtype}"
    )
    print(
        f"serving {batch} request(s) x {context:,} tokens, KV cache in {kv_dtype}, "
        f"{tp} GPU(s) x {_size(memory, u)} {u} ({u} = {'2^30' if u == 'GiB' else '10^9'} bytes)"
    )
    if any(m.windows):
        print(f"sliding-window layers: {sum(w is not None for w in m.windows)} of {m.layers} (cache capped)")
    print()
    print(
        f"| G | attention | H/G | KV per request ({u}) | KV for batch ({u}) | weights + KV per GPU ({u}) "
        f"| fits | max requests | KV read per token ({u}) | notes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        notes = [n for n, on in (("today", r.current), ("recommended", r.num_kv_heads == best)) if on]
        if not r.tp_divisible:
            notes.append(f"not divisible by tp {tp}")
        if not r.reachable:
            notes.append(f"not reachable from {m.kv_heads} KV heads")
        print(
            f"| {r.num_kv_heads} | {r.attention} | {r.ratio:g} | {_size(r.kv_per_request, u)} "
            f"| {_size(r.kv_batch, u)} | {_size(r.weights_per_gpu, u)} + {_size(r.kv_batch_per_gpu, u)} = "
            f"{_size(r.total_per_gpu, u)} | {'yes' if r.fits else 'no'} | {r.max_requests:,} "
            f"| {_size(r.kv_read_per_token, u)} | {', '.join(notes)} |"
        )
    print()
    if best is None:
        mqa = rows[-1]
        print(f"no G fits {batch} requests of {context:,} tokens; with MQA at most {mqa.max_requests:,} fit")
    else:
        row = next(r for r in rows if r.num_kv_heads == best)
        print(
            f"recommended: G = {best} ({row.attention}, cache {row.ratio:g}x smaller than MHA): "
            f"uptrain convert MODEL OUT --num-kv-heads {best}"
        )


def draw(
    m: ServingModel, rows: list[PlanRow], chosen: int, memory: int, context: int, batch: int, kv_itemsize: float,
    tp: int, units: str, path: Path,
) -> None:  # fmt: skip
    """KV cache of the batch (per GPU) against context, with the memory left after the weights."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UptrainError("--plot needs matplotlib: pip install 'uptrain[plot]'") from e
    scale = 2**30 if units == "GiB" else 1e9
    xs = sorted({max(1, int(context * f)) for f in (1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4)})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in sorted({m.heads, chosen, 1}, reverse=True):
        per_gpu = max(1, math.ceil(g / tp))
        ys = [m.kv_bytes(per_gpu, x, batch, kv_itemsize) / scale for x in xs]
        ax.plot(xs, ys, marker="o", label=f"G={g} ({attention_kind(m.heads, g)})")
    free = (memory - next(r for r in rows if r.num_kv_heads == chosen).weights_per_gpu) / scale
    ax.axhline(
        free, color="black", linestyle="--", label=f"memory left after the G={chosen} weights ({free:,.1f} {units})"
    )
    ax.axvline(context, color="grey", linestyle=":", label=f"context {context:,}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"KV cache of {batch} request(s) per GPU ({units})")
    ax.set_title(m.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
