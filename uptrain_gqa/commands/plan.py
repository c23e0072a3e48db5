"""`uptrain plan`."""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from uptrain_gqa import config as configlib
from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json, table_wanted
from uptrain_gqa.conversion.calibrate import DEFAULT_MIX, RANDOM
from uptrain_gqa.conversion.preflight import CheckedSource
from uptrain_gqa.conversion.refine import DEFAULT_LR
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.progress import verbosity
from uptrain_gqa.serving import (
    DTYPE_BYTES,
    ServedModel,
    ServingBudget,
    ServingRow,
    check_plot_target,
    choose_by_quality,
    draw,
    plan_table,
    served_model,
    serving_rows,
    why_none_fits,
)
from uptrain_gqa.units import parse_size

DEFAULT_MAX_KL = 0.1
LIMITS = {"layers": 10_000, "heads": 10_000, "kv_heads": 10_000, "head_dim": 65_536, "hidden": 10**7}
"""Far above any real model: larger values are typos (and would only make the table slow)."""


@dataclass
class PlanOptions:
    """A serving budget to choose G for (`uptrain plan`); with `quality`, each G's merge measured too."""

    model: str | None = configlib.argument_default(None)
    """Checkpoint folder, config.json, or Hub repo id (omit with --layers/--heads/...)."""
    memory: str = "80GB"
    """Memory of each GPU, e.g. 80GB (10^9 bytes) or 80GiB (2^30 bytes)."""
    context: int = 4096
    """Tokens per request (prompt + generated)."""
    batch: int = 1
    """Concurrent requests to serve."""
    kv_dtype: Literal["bf16", "fp16", "fp8", "fp32"] = "bf16"
    """Storage type of the KV cache."""
    weights_dtype: Literal["bf16", "fp16", "fp8", "int8", "int4", "fp32"] | None = None
    """Storage type of the weights; default: the checkpoint's (bf16 for bare numbers)."""
    tp: int = 1
    """Tensor-parallel degree: GPUs that share the weights and the KV heads."""
    num_kv_heads: int | None = None
    """A G to draw in the plot (default: the recommendation); must divide the heads."""
    layers: int | None = None
    """Number of layers (models not on disk)."""
    heads: int | None = None
    """Attention (query) heads per layer."""
    kv_heads: int | None = None
    """Today's KV heads (default: heads, i.e. MHA)."""
    head_dim: int | None = None
    """Dimension of each head."""
    hidden: int | None = None
    """Hidden size (default: heads x head_dim); only the K/V weight savings use it."""
    params: float | None = None
    """Parameter count, e.g. 13e9."""
    units: Literal["GB", "GiB"] = "GB"
    """Print sizes in GB (10^9 bytes) or GiB (2^30 bytes)."""
    quality: list[str] | None = None
    """Measure each G's quality before converting, on one or several held-out texts, each [NAME=]DATA: text
    files (globs), a Hub dataset id, a built-in text (uptrain:heldout: legal English, C, documentation, Python
    and plays that calibration never reads), or `random`. Every reachable G is merged in memory as `convert
    --method svd` merges it (calibrated on --calibration, refined as convert refines), layer by layer during
    one calibration pass (no checkpoint written), and its KL to the source and top-1 agreement are measured
    on --quality-tokens of each text (windows of 512 side by side): per text, and their mean. The
    recommendation becomes the smallest cache that fits and whose mean KL stays within --max-kl."""
    quality_tokens: int = 8192
    """Held-out tokens the KL is measured on, per text (a text that calibration also reads starts after the
    tokens calibration took from it)."""
    calibration: list[str] | None = None
    """What the merges are calibrated on, as `convert --calibration` (default: as convert: uptrain:broad; with
    --quality random alone, random tokens: a data-free estimate)."""
    calibration_tokens: int | None = None
    """Calibration tokens; default: 65,536 of text, 8,192 random (as convert)."""
    calibration_mix: float = DEFAULT_MIX
    """Share of uptrain:broad mixed into your own --calibration text, as convert's."""
    max_kl: float = DEFAULT_MAX_KL
    """The KL to the source (per token, before uptraining) a recommended G may cost; docs/results.md relates it to
    top-1 agreement on real models. Uptraining recovers much of the rest."""
    refine_steps: int | None = None
    """Refinement steps per layer, as `convert --refine-steps`; default: convert's (36 with text, 0 with random
    tokens). Each G is refined during the one calibration pass."""
    refine_lr: float = DEFAULT_LR
    """Peak learning rate of the refinement, as `convert --refine-lr`."""

    def __post_init__(self) -> None:
        configlib.accept_paths_and_single_items(self, paths=("model",), lists=("quality", "calibration"))
        configlib.check_types(self)
        counts = {"context": self.context, "batch": self.batch, "tp": self.tp, "num_kv_heads": self.num_kv_heads,
                  "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                  "hidden": self.hidden}  # fmt: skip
        for name, value in counts.items():  # one clear line for every impossible number, before any work
            flag = "--" + name.replace("_", "-")
            if value is not None and value < 1:
                raise UptrainError(f"{flag} must be at least 1, got {value}")
            if value is not None and value > LIMITS.get(name, value):
                raise UptrainError(
                    f"{flag} {value:,} is not a real model's (at most {LIMITS[name]:,}); check the number"
                )
        if self.params is not None and not (math.isfinite(self.params) and self.params >= 1):
            raise UptrainError(f"--params must be a parameter count like 7e9, got {self.params}")
        given = [n for n in ("layers", "heads", "kv_heads", "head_dim", "hidden") if counts.get(n) is not None]
        if self.model is not None and (given or self.params is not None):
            flags = ", ".join(
                "--" + n.replace("_", "-") for n in [*given, *(["params"] if self.params is not None else [])]
            )
            raise UptrainError(
                f"{flags} describe a model not on disk; with MODEL they would be ignored: leave them out"
            )
        if re.fullmatch(r"\s*[\d.]+\s*", self.memory):
            n = self.memory.strip()
            raise UptrainError(f"--memory {n}: give a unit, e.g. {n}GB (10^9 bytes) or {n}GiB (2^30 bytes)")
        given_merge = {"--calibration": self.calibration, "--calibration-tokens": self.calibration_tokens,
                       "--refine-steps": self.refine_steps}  # fmt: skip
        if self.quality is None and any(v is not None for v in given_merge.values()):
            flags = ", ".join(k for k, v in given_merge.items() if v is not None)
            raise UptrainError(f"{flags} shape the merges --quality measures; add --quality TEXT (or leave them out)")
        if self.quality is not None and not (math.isfinite(self.max_kl) and self.max_kl >= 0):
            raise UptrainError(f"--max-kl must be a KL per token, at least 0; got {self.max_kl}")


@dataclass
class PlanResult:
    """What `uptrain plan` found: every G's row, the recommendation and how to make it."""

    options: PlanOptions
    """What was planned for."""
    model: ServedModel
    """The model planned for (its shape and weights' dtype)."""
    rows: list[ServingRow]
    """One row per G dividing the heads, MHA first."""
    recommended_num_kv_heads: int | None
    """The recommendation (None: no G fits; `reason` says why)."""
    reason: str | None
    command: str | None
    """The `uptrain convert` that makes the recommendation from MODEL (None when no conversion is needed)."""
    texts: list[str] = field(default_factory=list)
    """With --quality: the held-out texts' labels."""
    calibration: dict[str, Any] | None = None
    """With --quality: the calibration the merges were measured with."""
    quality_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """What `uptrain plan --json` prints."""
        o = self.options
        best = self.recommended_num_kv_heads
        return {
            "model": self.model.record(),
            "memory_per_gpu": parse_size(o.memory),
            "context": o.context,
            "batch": o.batch,
            "kv_dtype": o.kv_dtype,
            "tp": o.tp,
            "units": o.units,
            "rows": [asdict(r) for r in self.rows],
            "recommended_num_kv_heads": best,
            "reason": self.reason,
            "convert": best is not None and best != self.model.shape.kv_heads,
            "quality": {
                "data": o.quality,
                "texts": self.texts,
                "calibration": self.calibration,
                "held_out_tokens": o.quality_tokens,
                "max_kl": o.max_kl,
                "note": self.quality_note,
            }
            if o.quality is not None
            else None,
            "command": self.command,
        }


def make_plan(options: PlanOptions | Mapping[str, Any] | None = None, /, **fields: Any) -> PlanResult:
    """Choose G for a serving budget (see `uptrain plan --help`), e.g. `make_plan(model="llama", memory="80GB",
    context=32768, batch=16)`; `fields` override the options'. Raises UptrainError; prints nothing (progress
    bars of --quality aside)."""
    o = configlib.options_of(PlanOptions, options, fields, "make_plan")
    m = served_model(o.model, o.layers, o.heads, o.kv_heads, o.head_dim, o.hidden, o.params, o.weights_dtype)
    mem = parse_size(o.memory)
    rows, best = serving_rows(m, mem, o.context, o.batch, DTYPE_BYTES[o.kv_dtype], o.tp)
    if o.num_kv_heads is not None and m.shape.heads % o.num_kv_heads:
        valid = ", ".join(str(r.num_kv_heads) for r in rows)
        raise UptrainError(
            f"--num-kv-heads {o.num_kv_heads} does not divide the {m.shape.heads} heads (valid: {valid})"
        )
    quality_note, texts, calibration_record = None, [], None
    if o.quality is not None:
        if o.model is None or Path(o.model).is_file():
            raise UptrainError("--quality reads the weights: give MODEL as a checkpoint folder or Hub id")
        reachable = [r.num_kv_heads for r in rows if r.reachable and not r.current]
        measured, texts, calibration_record = measure_quality(o, reachable)
        several = len(texts) > 1  # a table per text only when there are several
        exact = {"kl": 0.0, "top1_agreement": 1.0}
        rows = [
            replace(r, **exact, by_text=dict.fromkeys(texts, exact) if several else None) if r.current
            else replace(r, **measured[r.num_kv_heads] | ({} if several else {"by_text": None}))
            if r.num_kv_heads in measured else r
            for r in rows
        ]  # fmt: skip
        chosen, quality_note = choose_by_quality(rows, o.max_kl)
        best = chosen if chosen is not None else best
    command = None
    if best is not None and best != m.shape.kv_heads:
        command = convert_command(o.model, best, o if o.quality is not None else None)
    reason = why_none_fits(rows, mem, o.context, o.batch) if best is None else None
    return PlanResult(o, m, rows, best, reason, command, texts, calibration_record, quality_note)


def plan(options: PlanOptions, *, plot: str | None = None, json: JsonOption = None) -> PlanResult:
    """Choose G for a serving budget: KV cache, memory and capacity for every G from MHA to MQA.

    For each G dividing the attention heads: the KV cache of one request and of the batch at the
    context length, weights + cache per GPU against the memory, how many such requests fit, the
    KV bytes each decoded token reads, and H/G. The recommendation is the largest G (closest to
    the original quality) that fits the batch, divides --tp, and can be reached by converting
    today's checkpoint. MODEL is a checkpoint folder, a config.json or a Hub id; models not on
    disk are described with --layers --heads --head-dim --params.

    Args:
        options: The budget (PlanOptions: one option per field).
        plot: Draw KV cache against context for MHA, the chosen G and MQA into FILE.png, .svg or .pdf (the suffix
            chooses; needs matplotlib).
        json: The plan as JSON: alone, to stdout instead of the table; with FILE, written to FILE as well.
    """
    check_json_target(json)
    if plot:  # before any work: a plot that cannot be written would be found only after the measurement
        check_plot_target(plot)
        check_json_target(plot, "--plot")
    result = make_plan(options)
    o, best, m, rows = options, result.recommended_num_kv_heads, result.model, result.rows
    mem = parse_size(o.memory)
    budget = ServingBudget(mem, o.context, o.batch, o.kv_dtype, o.tp, o.units)
    if plot:
        draw(m, rows, o.num_kv_heads or best or 1, budget, Path(plot))
    emit_json(result.to_json(), json)
    if table_wanted(json):
        print(plan_table(m, rows, best, budget, result.quality_note, result.command))
    return result


def convert_command(model: str | None, num_kv_heads: int, measured_with: PlanOptions | None) -> str:
    """The `uptrain convert` that makes the recommended G from the user's own model: with --quality, the svd
    merge as it was measured (the same calibration and refinement settings), else the default."""
    name = Path(model).name if model is not None and Path(model).exists() else (model or "MODEL").split("/")[-1]
    out = (
        f"{Path(name).stem if name.endswith('.json') else name}-{'mqa' if num_kv_heads == 1 else f'gqa{num_kv_heads}'}"
    )
    args = ["uptrain", "convert", model or "MODEL", out, "--num-kv-heads", str(num_kv_heads)]
    if measured_with is not None:
        args += ["--method", "svd"]
        if measured_with.calibration:
            args += ["--calibration", *measured_with.calibration]
        defaults = {"calibration_mix": DEFAULT_MIX, "refine_lr": DEFAULT_LR}
        for key in ("calibration_tokens", "calibration_mix", "refine_steps", "refine_lr"):
            value = getattr(measured_with, key)
            if value is not None and value != defaults.get(key):
                args += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(args)


def measure_quality(o: PlanOptions, groups: list[int]) -> tuple[dict[int, dict[str, Any]], list[str], dict[str, Any]]:
    """({G: {"kl", "top1_agreement", "by_text"}}, the held-out texts' labels, the calibration's record): each G's
    merge (as `convert --method svd --calibration ...` makes it) against the source on each held-out text, and the
    mean over the texts (each weighing the same)."""
    from uptrain_gqa.conversion.calibrate import Calibration
    from uptrain_gqa.conversion.convert import refinement_for
    from uptrain_gqa.data.builtin import BROAD
    from uptrain_gqa.io.folders import has_tokenizer

    quality, calibration, held_tokens, quiet = o.quality or [], o.calibration, o.quality_tokens, verbosity() == "quiet"
    if held_tokens < 2:
        raise UptrainError(f"--quality-tokens must be at least 2, got {held_tokens}")
    if RANDOM in quality and quality != [RANDOM]:
        raise UptrainError("--quality random measures on random tokens: give it alone, or give text only")
    source = CheckedSource.open(str(o.model))  # convert's pre-flight: config, family and shape, no weights yet
    if calibration is None:  # as convert chooses, but a data-free estimate stays data-free
        calibration = [RANDOM] if quality == [RANDOM] or not has_tokenizer(source.path) else [BROAD]
    calib = Calibration(tuple(calibration), o.calibration_tokens, mix=o.calibration_mix)
    calib.check()
    refinement = refinement_for(calib, o.refine_steps, o.refine_lr, 0)
    return (*quality_of_merges(source, quality, calib, refinement, groups, held_tokens, quiet), calib.record())


def quality_of_merges(
    source: Path | CheckedSource,
    quality: list[str],
    calib: Any,
    refinement: Any,
    groups: list[int],
    held_tokens: int,
    quiet: bool = False,
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """`measure_quality` for a checkpoint folder (or a source opened by the pre-flight), a Calibration and a
    Refinement (or None) already chosen (also what experiments/calibration_domains.py compares recipes with). The source
    is read through `convert`'s checks (conversion/preflight.py): NaN/inf in an attention weight, weights that
    disagree with the config, no tokenizer for the text to read, an unknown family: each one line."""
    import torch

    from uptrain_gqa.conversion.estimate import check_held_out_tokens, merge_quality
    from uptrain_gqa.data.documents import token_stream
    from uptrain_gqa.data.sources import parse_sources
    from uptrain_gqa.evaluation.quality import add_scores, strided

    checked = source if isinstance(source, CheckedSource) else CheckedSource.open(str(source))
    texts = [] if quality == [RANDOM] else parse_sources(quality, "--quality")
    for t in texts:
        t.check("--quality")
    config, arch, shape = checked.config, checked.arch, checked.shape
    check_held_out_tokens(shape, len(groups), held_tokens, max(1, len(texts)))  # before anything is allocated
    reading = [f for f, reads in (("--quality", bool(texts)), ("--calibration", calib.kind == "text")) if reads]
    tokenizer = checked.tokenizer(reading[0], f"pass {reading[0]} random") if reading else None
    reader = checked.weights(passing="measured as it is")
    try:
        checked.check_attention(reader, groups)  # headers against the config, as convert checks them
        # windows of 512 side by side (as `eval --window 512 --stride 512`): each held-out token scored once
        window = min(512, int(config.get("max_position_embeddings") or 512))
        held: dict[str, list[Any]] = {}
        if not texts:
            vocab = int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))
            ids = torch.randint(0, vocab, (held_tokens,), generator=torch.Generator().manual_seed(calib.seed + 1))
            held[RANDOM] = strided(ids, window, window)
        else:
            read = {s.spec: n for s, n in calib.allotment()}  # never measured on what was fitted
            for t in texts:
                skip = read.get(t.spec, 0)
                stream, _ = token_stream(t.data(quiet), tokenizer, skip + held_tokens, t.doc_tokens)
                if len(stream) - skip < 2:
                    raise UptrainError(
                        f"--quality {t.label}={t.spec} has {len(stream):,} tokens, all taken by the {skip:,} tokens "
                        "calibration reads from it; pass more text or lower --calibration-tokens"
                    )
                held[t.label] = strided(stream[skip:], window, window)
        totals = merge_quality(reader, arch, shape, groups, calib, held, add_scores, refinement, quiet=quiet)
    finally:
        reader.close()
    out = {}
    for g, per_text in totals.items():
        by_text = {
            t: {"kl": x["kl"] / x["count"], "top1_agreement": x["agree"] / x["count"], "tokens": int(x["count"]),
                "perplexity": math.exp(x["nll"] / x["count"]), "source_perplexity": math.exp(x["ref_nll"] / x["count"])}
            for t, x in per_text.items()
        }  # fmt: skip
        out[g] = {
            "kl": sum(x["kl"] for x in by_text.values()) / len(by_text),
            "top1_agreement": sum(x["top1_agreement"] for x in by_text.values()) / len(by_text),
            "by_text": by_text,
        }
        if not math.isfinite(out[g]["kl"]):  # printed as "nan" beside a top-1 of 100 %: never a measurement
            damaged = sorted(reader.reported)
            why = (
                f"{', '.join(damaged)} {'holds' if len(damaged) == 1 else 'hold'} NaN/inf values; the source "
                "checkpoint is damaged (re-download it)"
                if damaged
                else "the source's own outputs hold NaN/inf on the held-out text; check the source"
            )
            raise UptrainError(f"the KL to the source is not finite for G = {g} ({out[g]['kl']}): {why}")
    return out, list(held)
