"""Which G fits a serving budget (what `uptrain plan` prints), and the memory arithmetic behind it.

The KV cache follows `ModelShape.kv_bytes` (sliding-window layers capped). Weights shrink too: each
merged KV head removes 2 · head_dim · hidden parameters per layer. With tensor parallelism of degree N, each GPU
holds 1/N of the weights and of the KV heads (at least one head: GPUs share a head when G < N).
Sizes are printed in GB = 10⁹ bytes unless --units GiB (2³⁰).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import write_file
from uptrain_gqa.model.facts import checkpoint_facts
from uptrain_gqa.model.loading import read_model_config
from uptrain_gqa.model.shape import ModelShape, attention_kind, count_parameters
from uptrain_gqa.units import byte_unit, format_bytes, format_count
from uptrain_gqa.version import install_hint

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
TORCH_TO_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
PLOT_FORMATS = ("png", "svg", "pdf")
"""What `--plot FILE` writes, chosen by FILE's suffix."""


@dataclass(frozen=True)
class ServingBudget:
    """What the model is served with: memory per GPU, requests, their context, the KV cache's dtype, GPUs."""

    memory: int
    """Bytes of memory per GPU."""
    context: int
    """Tokens of context per request."""
    batch: int
    """Requests served at once."""
    kv_dtype: str
    """The KV cache's dtype (a key of DTYPE_BYTES)."""
    tp: int = 1
    """Tensor-parallel degree: GPUs sharing the model."""
    units: str = "GB"
    """What sizes are printed in: GB (10^9 bytes) or GiB (2^30)."""

    @property
    def kv_itemsize(self) -> float:
        return DTYPE_BYTES[self.kv_dtype]


@dataclass(frozen=True)
class ServedModel:
    """A model to serve: its shape (with its parameter count), a name to print, its weights' storage dtype."""

    name: str
    shape: ModelShape
    dtype: str = "bf16"
    """Storage dtype of the weights (a key of DTYPE_BYTES)."""

    def record(self) -> dict[str, Any]:
        """The `model` entry of `uptrain plan --json`."""
        s = self.shape
        return {"name": self.name, "layers": s.layers, "heads": s.heads, "kv_heads": s.kv_heads,
                "head_dim": s.head_dim, "hidden": s.hidden, "params": s.params, "windows": list(s.windows),
                "dtype": self.dtype}  # fmt: skip


@dataclass(frozen=True)
class ServingRow:
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
    kl: float | None = None
    """With `plan --quality`: KL(source ‖ G-head merge) per held-out token, before any uptraining."""
    top1_agreement: float | None = None
    """With `plan --quality`: how often the merge's most likely next token is the source's."""
    by_text: dict[str, dict[str, float]] | None = None
    """With `plan --quality` on several texts: each text's `kl` and `top1_agreement` (the fields above: their mean)."""


def serving_rows(
    model: ServedModel, memory: int, context: int, batch: int, kv_itemsize: float, tp: int = 1
) -> tuple[list[ServingRow], int | None]:
    """Every G dividing H, MHA first; and the largest G that fits (None when none does)."""
    if memory <= 0 or context <= 0 or batch <= 0 or tp <= 0:
        raise UptrainError("memory, context, batch and tp must all be positive")
    m = model.shape
    if m.heads % tp:
        raise UptrainError(f"--tp {tp} does not divide the {m.heads} query heads; tensor parallelism shards them")
    rows = []
    weight_itemsize = DTYPE_BYTES[model.dtype]
    for g in sorted((g for g in range(1, m.heads + 1) if m.heads % g == 0), reverse=True):
        weights = math.ceil(m.params_at(g) * weight_itemsize / tp)
        per_gpu_heads = max(1, math.ceil(g / tp))  # a head is never split; with G < tp GPUs share it
        kv_req = m.kv_bytes(context, itemsize=kv_itemsize, kv_heads=g)
        kv_req_gpu = m.kv_bytes(context, itemsize=kv_itemsize, kv_heads=per_gpu_heads)
        free = memory - weights
        rows.append(
            ServingRow(
                num_kv_heads=g,
                attention=attention_kind(m.heads, g),
                ratio=m.heads / g,
                kv_per_request=kv_req,
                kv_batch=kv_req * batch,
                weights_per_gpu=weights,
                kv_batch_per_gpu=kv_req_gpu * batch,
                total_per_gpu=weights + kv_req_gpu * batch,
                fits=weights + kv_req_gpu * batch <= memory,
                max_requests=max(0, free // kv_req_gpu) if kv_req_gpu else 0,
                kv_read_per_token=kv_req,
                tp_divisible=g % tp == 0,
                reachable=m.kv_heads % g == 0,
                current=g == m.kv_heads,
            )
        )
    fitting = [r.num_kv_heads for r in rows if r.fits and r.tp_divisible and r.reachable]
    return rows, (max(fitting) if fitting else None)


def choose_by_quality(rows: list[ServingRow], max_kl: float) -> tuple[int | None, str | None]:
    """With measured quality: the smallest cache (smallest G) that fits and stays within `max_kl`; else the
    fitting G with the lowest KL, and a line saying that none stays within it. (None, None): none fits."""
    fitting = [r for r in rows if r.fits and r.tp_divisible and r.reachable and r.kl is not None]
    if not fitting:
        return None, None
    within = [r for r in fitting if r.kl is not None and r.kl <= max_kl]
    if within:
        return min(within, key=lambda r: r.num_kv_heads).num_kv_heads, None
    best = min(fitting, key=lambda r: r.kl if r.kl is not None else math.inf)
    return best.num_kv_heads, (
        f"no G that fits stays within --max-kl {max_kl:g}; G = {best.num_kv_heads} has the lowest KL ({best.kl:.3f}): "
        "expect uptraining to be needed, or raise --max-kl"
    )


def served_model(
    src: str | None, layers: int | None, heads: int | None, kv_heads: int | None, head_dim: int | None,
    hidden: int | None, params: float | None, weights_dtype: str | None,
) -> ServedModel:  # fmt: skip
    """The model to plan for: a checkpoint folder or Hub id, a config.json, or the numbers given."""
    numbers = {"layers": layers, "heads": heads, "head_dim": head_dim, "params": params}
    if src is None:
        missing = [f"--{k.replace('_', '-')}" for k, v in numbers.items() if v is None]
        if missing:
            raise UptrainError(f"give MODEL (a folder, config.json or Hub id) or all of {', '.join(missing)}")
        assert layers and heads and head_dim and params
        shape = ModelShape(
            layers=layers, hidden=hidden or heads * head_dim, heads=heads, kv_heads=kv_heads or heads,
            head_dim=head_dim, params=int(params),
        )  # fmt: skip
        return ServedModel("model given by numbers", shape, weights_dtype or "bf16")
    path = Path(src)
    if path.is_file():  # a bare config.json: parameters counted on a weightless model
        config = read_model_config(str(path))
        return ServedModel(str(path), ModelShape.from_config(config, count_parameters(config)),
                           weights_dtype or _stored_dtype(config))  # fmt: skip
    facts = checkpoint_facts(src)
    dtype = weights_dtype or TORCH_TO_SHORT.get(facts["dtype"], "bf16")
    config = read_model_config(str(facts["source"].get("path") or src), None)
    return ServedModel(src, ModelShape.from_config(config, facts["parameters"]), dtype)


def _stored_dtype(config: Any) -> str:
    stored = getattr(config, "dtype", None)
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    return TORCH_TO_SHORT.get(stored or "", "bf16")


def why_none_fits(rows: list[ServingRow], memory: int, context: int, batch: int) -> str:
    """The reason no G serves the batch, and what to change."""
    mqa = rows[-1]
    if mqa.weights_per_gpu > memory:
        return (
            f"the weights alone need {format_bytes(mqa.weights_per_gpu)} per GPU, more than the {format_bytes(memory)} "
            "of memory; add GPUs (--tp) or store the weights in fewer bits (--weights-dtype)"
        )
    if mqa.max_requests < 1:
        return (
            f"not even one request of {context:,} tokens fits next to the weights, even with MQA; "
            "shorten --context, add GPUs (--tp) or use --kv-dtype fp8"
        )
    return f"no G fits {batch} requests of {context:,} tokens; with MQA at most {mqa.max_requests:,} fit"


def _quality_cells(r: ServingRow) -> str:
    if r.kl is None or r.top1_agreement is None:
        return " — | — |"
    return f" {r.kl:.4f} | {r.top1_agreement:.1%} |"


def _size(n: float, unit: tuple[str, float]) -> str:
    """`n` bytes as a number of `unit` (name, bytes)."""
    return f"{n / unit[1]:,.0f}" if unit[0] == "B" else f"{n / unit[1]:,.2f}"


def plan_table(
    model: ServedModel, rows: list[ServingRow], best: int | None, budget: ServingBudget,
    quality_note: str | None = None, command: str | None = None,
) -> str:  # fmt: skip
    """What `uptrain plan` prints: the model and budget, a row per G, per-text quality, the recommendation."""
    b, m, binary = budget, model.shape, budget.units == "GiB"
    memory, context, batch, kv_dtype, tp, units = b.memory, b.context, b.batch, b.kv_dtype, b.tp, b.units
    lines: list[str] = []
    add = lines.append
    add(
        f"{model.name}: {m.layers} layers, {m.heads} heads x {m.head_dim}, {m.kv_heads} KV heads today, "
        f"{format_count(m.params)} parameters in {model.dtype}"
    )
    add(
        f"serving {batch} request(s) x {context:,} tokens, KV cache in {kv_dtype}, "
        f"{tp} GPU(s) x {format_bytes(memory, binary)} ({units} = {'2^30' if binary else '10^9'} bytes)"
    )
    # each column of sizes in the smallest unit that keeps its largest value under 10,000 of it: a tiny model
    # reads kB, not 0.00 GB
    request, whole, per_gpu, read = (
        byte_unit(max(values) / 10, binary)
        for values in (
            [r.kv_per_request for r in rows],
            [r.kv_batch for r in rows],
            [r.total_per_gpu for r in rows],
            [r.kv_read_per_token for r in rows],
        )
    )
    if any(m.windows):
        add(f"sliding-window layers: {sum(w is not None for w in m.windows)} of {m.layers} (cache capped)")
    add("")
    measured = any(r.kl is not None for r in rows)
    texts = next((list(r.by_text) for r in rows if r.by_text), [])
    mean = " (mean)" if texts else ""
    quality_head, quality_rule = (f" KL to source{mean} | top-1{mean} |", "---|---|") if measured else ("", "")
    add(
        f"| G | attention | H/G | KV per request ({request[0]}) | KV for batch ({whole[0]}) | weights + KV per GPU "
        f"({per_gpu[0]}) | fits | max requests | KV read per token ({read[0]}) |{quality_head} notes |"
    )
    add(f"|---|---|---|---|---|---|---|---|---|{quality_rule}---|")
    for r in rows:
        notes = [n for n, on in (("today", r.current), ("recommended", r.num_kv_heads == best)) if on]
        if not r.tp_divisible:
            notes.append(f"not divisible by tp {tp}")
        if not r.reachable:
            notes.append(f"not reachable from {m.kv_heads} KV heads")
        add(
            f"| {r.num_kv_heads} | {r.attention} | {r.ratio:g} | {_size(r.kv_per_request, request)} "
            f"| {_size(r.kv_batch, whole)} | {_size(r.weights_per_gpu, per_gpu)} + "
            f"{_size(r.kv_batch_per_gpu, per_gpu)} = {_size(r.total_per_gpu, per_gpu)} | {'yes' if r.fits else 'no'} "
            f"| {r.max_requests:,} | {_size(r.kv_read_per_token, read)} |{_quality_cells(r) if measured else ''} "
            f"{', '.join(notes)} |"
        )
    if texts:
        add("\nKL to the source / top-1 agreement, per held-out text:\n")
        add("| G | " + " | ".join(texts) + " | mean |")
        add("|---|" + "---|" * (len(texts) + 1))
        for r in rows:
            if r.by_text:
                cells = [f"{r.by_text[t]['kl']:.4f} / {r.by_text[t]['top1_agreement']:.1%}" for t in texts]
                add(f"| {r.num_kv_heads} | " + " | ".join(cells) + f" | {r.kl:.4f} / {r.top1_agreement:.1%} |")
    add("")
    if best is None:
        add(why_none_fits(rows, memory, context, batch))
        return "\n".join(lines)
    row = next(r for r in rows if r.num_kv_heads == best)
    if quality_note:
        add(quality_note)
    if row.kl is not None and not row.current:
        add(
            f"recommended: G = {best} ({row.attention}, cache {row.ratio:g}x smaller than MHA, KL {row.kl:.3f} to the "
            f"source before uptraining): {command}"
        )
    elif row.current:
        add(
            f"recommended: G = {best}, what the model has today ({row.attention}): it fits as it is, nothing to convert"
        )
    else:
        add(f"recommended: G = {best} ({row.attention}, cache {row.ratio:g}x smaller than MHA): {command}")
    return "\n".join(lines)


def check_plot_target(path: str | Path) -> None:
    """Refuse, before any work, a `--plot` file that could not be drawn: a suffix other than PLOT_FORMATS' (the
    format follows it), or no matplotlib. (Whether the folder can be written: `check_json_target(path, "--plot")`.)"""
    import importlib.util

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise UptrainError(
            f"--plot {path}: the format follows the file's suffix; give a name ending "
            f"{', '.join('.' + f for f in PLOT_FORMATS[:-1])} or .{PLOT_FORMATS[-1]}"
        )
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UptrainError(f"--plot needs matplotlib: {install_hint('plot')}")


def draw(model: ServedModel, rows: list[ServingRow], chosen: int, budget: ServingBudget, path: Path) -> None:
    """KV cache of the batch (per GPU) against context, with the memory left after the weights; written to `path`
    whole or not at all, in the format its suffix names (PLOT_FORMATS)."""
    import io

    m = model.shape
    memory, context, batch, kv_itemsize, tp, units = (
        budget.memory, budget.context, budget.batch, budget.kv_itemsize, budget.tp, budget.units
    )  # fmt: skip
    check_plot_target(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UptrainError(f"--plot needs matplotlib: {install_hint('plot')}") from e
    scale = 2**30 if units == "GiB" else 1e9
    xs = sorted({max(1, int(context * f)) for f in (1 / 64, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4)})
    measured = [r for r in rows if r.kl is not None]
    if measured:  # `plan --quality`: what each G costs beside what it saves
        fig, (ax, qx) = plt.subplots(1, 2, figsize=(13, 4.5))
        per_token = [m.kv_bytes(1, itemsize=kv_itemsize, kv_heads=r.num_kv_heads) / 1e3 for r in measured]
        qx.plot(per_token, [r.kl for r in measured], marker="o", linestyle="none")
        for x, r in zip(per_token, measured, strict=True):
            qx.annotate(f"G={r.num_kv_heads}", (x, r.kl), textcoords="offset points", xytext=(5, 5))
        qx.set_xscale("log")
        qx.set_xlabel("KV cache per token (kB)")
        qx.set_ylabel("KL to the source per token, before uptraining")
        qx.set_title("quality each G costs (plan --quality)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in sorted({m.heads, chosen, 1}, reverse=True):
        per_gpu = max(1, math.ceil(g / tp))
        ys = [m.kv_bytes(x, batch=batch, itemsize=kv_itemsize, kv_heads=per_gpu) / scale for x in xs]
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
    ax.set_title(model.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format=Path(path).suffix.lower().lstrip("."), dpi=120)
    plt.close(fig)
    write_file(Path(path), image.getvalue(), "--plot")
