"""Convert a checkpoint to G shared key/value heads, streaming one tensor at a time.

Two phases. `conversion_steps` reads only config.json and safetensors headers, checks every
attention tensor against the config and decides, for each output tensor, its name, dtype,
shape and how to compute it. `convert_checkpoint` then writes those tensors in order through the
streaming shard writer into a temporary folder that is renamed to OUT at the end, and returns the
conversion record it wrote beside them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa import config as configlib
from uptrain_gqa.conversion.calibrate import NONE, RANDOM, Covariance
from uptrain_gqa.conversion.checks import FiniteReader, cast_can_overflow, check_cast
from uptrain_gqa.conversion.layer_merge import LayerMerger
from uptrain_gqa.conversion.options import ConvertOptions
from uptrain_gqa.conversion.preflight import CheckedSource, attention_plan
from uptrain_gqa.conversion.refine import DEFAULT_STEPS, Refinement
from uptrain_gqa.conversion.spill import LayerStore
from uptrain_gqa.conversion.steps import ConversionSteps, LayerSteps, MergeOptions, Step
from uptrain_gqa.conversion.walk import calibration_pass
from uptrain_gqa.data.builtin import BROAD
from uptrain_gqa.device import environment
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.cards import CARD, hub_base_model, source_licence, write_card
from uptrain_gqa.io.folders import (
    CONVERSION_RECORD,
    RECORD_PREFIX,
    atomic_output_dir,
    has_tokenizer,
    side_files,
)
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.io.tensors import TensorSpec, dtype_name
from uptrain_gqa.io.writer import ShardedWriter
from uptrain_gqa.model.families import Architecture, kv_heads_keys
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.progress import progress_bar, verbosity
from uptrain_gqa.version import __version__

MERGED = ".merged"  # each layer's merged attention tensors, inside the temporary output folder while converting


def _as_stored(step: Step, reader: FiniteReader) -> tuple[Path, int, int] | None:
    """Where the bytes of a tensor written exactly as stored lie (checked); None for any other step."""
    if not step.copied or reader.tensors[step.sources[0]].dtype != step.spec.dtype:
        return None
    return reader.copyable(step.sources[0])


def _cast_checked(step: Step, reader: FiniteReader) -> Iterator[torch.Tensor]:
    """The step's output chunks; computed ones, and copies cast to a narrower range, are refused if
    non-finite. Copies that keep their range pass unchecked: the reader checked them (damaged sources
    pass as is)."""
    if step.copied and not cast_can_overflow(reader.tensors[step.sources[0]].dtype, step.spec.dtype):
        yield from step.chunks(reader)
        return
    for chunk in step.chunks(reader):
        if not any(name in reader.reported for name in step.sources):  # read by now: reported if damaged
            check_cast(step.spec.name, chunk)
        yield chunk
        del chunk  # not held while the next one is read


def conversion_steps(
    reader: CheckpointReader,
    arch: Architecture,
    shape: ModelShape,
    options: MergeOptions,
    dtype: torch.dtype | None = None,
) -> ConversionSteps:
    """Every output tensor, in source order: attention K/V tensors merged, the rest copied.
    Reads headers only; raises UptrainError on any mismatch with the config."""
    layers = attention_plan(reader, arch, shape, options)  # the header checks `plan --quality` makes too
    changed = LayerSteps()
    for one in layers.values():
        changed.add(one)
    steps: list[Step] = []
    for name, info in reader.tensors.items():
        if name not in changed.dropped:
            steps += changed.replaced.get(name, [Step(TensorSpec(name, info.dtype, info.shape), (name,))])
    return ConversionSteps(steps, layers).cast(dtype)


def converted_config(
    config: dict[str, Any], arch: Architecture, num_kv_heads: int, dtype: torch.dtype | None
) -> dict[str, Any]:
    """config.json edited as JSON: the KV-head field (and `dtype` when casting), nothing else.
    Round-tripping through the config class would rewrite unrelated fields (rope settings)."""
    new = dict(config)
    for key in kv_heads_keys(config, arch):
        new[key] = num_kv_heads
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in new:
                new[key] = dtype_name(dtype)
    return new


def _kv_dtype(reader: CheckpointReader, arch: Architecture, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype K/V projections are stored in: what the KV cache holds when loaded with dtype='auto'."""
    if dtype is not None:
        return dtype
    name = arch.qkv_proj if arch.qkv_layout != "separate" else arch.k_proj
    return reader.tensors[f"{arch.module(name, 0)}.weight"].dtype


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    out: Path
    """The converted checkpoint's folder (loads with AutoModelForCausalLM.from_pretrained)."""
    record: dict[str, Any]
    """The conversion record, as written to OUT/uptrain_conversion.json: source, method, calibration,
    refinement, KV cache and parameters before and after, per-layer merge errors, environment."""
    bytes_written: int
    """Bytes of weights written."""

    @property
    def num_kv_heads(self) -> int:
        return int(self.record["num_kv_heads"])

    @property
    def kv_cache_bytes_per_token(self) -> tuple[int, int]:
        """(before, after): KV-cache bytes per token of context."""
        kv = self.record["kv_cache_bytes_per_token"]
        return int(kv["before"]), int(kv["after"])

    def to_json(self) -> dict[str, Any]:
        """What `uptrain convert --json` prints: the conversion record."""
        return self.record


def convert(options: ConvertOptions | Mapping[str, Any] | None = None, /, **fields: Any) -> ConvertResult:
    """Convert a checkpoint to G shared key/value heads (see `uptrain convert --help`), e.g.
    `convert(src="llama", out="llama-gqa8", num_kv_heads=8, method="svd")` or `convert(ConvertOptions(...))`;
    `fields` override the options'. Raises UptrainError; prints nothing (progress bars aside)."""
    options = configlib.options_of(ConvertOptions, options, fields, "convert")
    record, nbytes = convert_checkpoint(options)
    return ConvertResult(options.out_path, record, nbytes)


def convert_checkpoint(options: ConvertOptions) -> tuple[dict[str, Any], int]:
    """Convert SRC into OUT as `options` say; returns the conversion record and the bytes written.

    calibration None: uptrain:broad, the built-in broad text (random tokens for a source without a tokenizer);
    refine_steps None: 36 when the source reads calibration text, 0 (the closed form) with random tokens or
    none; base_model None: the source's Hub id, when known."""
    o, started = options, time.perf_counter()
    out = o.out_path
    if out.exists() and not o.overwrite:
        raise UptrainError(f"{out} already exists; pass --overwrite to replace it")
    # everything that can be checked from the config is, before any weight is downloaded: the pre-flight that
    # `plan --quality` reads the source through too (conversion/preflight.py)
    checked = CheckedSource.open(o.src, o.revision)
    if out == checked.source.path or out in checked.source.path.parents:
        raise UptrainError(f"OUT {out} would replace the source itself; choose another output folder")
    checked.shape.check_target(o.num_kv_heads)
    merge = MergeOptions(o.num_kv_heads, o.method, o.grouping, o.seed)
    calib, calibration = _calibration(o, checked, merge)
    refinement = refinement_for(calib, o.refine_steps, o.refine_lr, o.seed)
    reader = checked.weights(o.allow_pickle)
    side_files(checked.source.path)  # refuses a side file linking out of the source, before any work
    steps = conversion_steps(reader, checked.arch, checked.shape, merge, o.torch_dtype)  # the plan, made once
    record = _record(o, checked, reader, steps, calibration)
    with atomic_output_dir(out, o.overwrite) as tmp:
        merge_errors = None
        if calib is not None:  # each layer merged (and refined) in the pass; what it keeps waits beside the output
            store = LayerStore(tmp / MERGED)
            merger = LayerMerger(reader, checked.arch, steps.layers, o.num_kv_heads, refinement,
                                 (store, {s.spec.name: s.spec.dtype for s in steps.steps}))  # fmt: skip
            visitors = [Covariance(checked.shape.hidden), merger]
            facts = calibration_pass(reader, checked.arch, checked.shape, calib, visitors, verbosity() == "quiet")
            record["calibration"] |= facts
            steps = steps.made_by({name: store.job(name) for name in store})
            if refinement is not None:
                record["refinement"] = merger.record()
            merge_errors = merger.layers  # refined layers: the closed form's errors, and what refining did
        files, nbytes = _write_weights(tmp, steps, reader, o, f"{checked.shape.kind} -> {o.num_kv_heads} KV heads")
        shutil.rmtree(tmp / MERGED, ignore_errors=True)
        merge_errors = steps.merge_errors() if merge_errors is None else merge_errors
        _finish(tmp, o, checked, files, record, merge_errors, started)
    return record, nbytes


def _calibration(o: ConvertOptions, checked: CheckedSource, merge: MergeOptions) -> tuple[Any, Any]:
    """(what the source reads, or None; the record's `calibration` entry), checked before any weight is read."""
    from uptrain_gqa.conversion.calibrate import Calibration

    specs = list(o.calibration or [])
    if not merge.joint and specs not in ([], [NONE]):
        raise UptrainError(
            f"--calibration weights --method svd or --grouping similarity; --method {o.method} with contiguous "
            "groups reads no inputs, so drop --calibration"
        )
    # a weights-only Σ (identity) and a narrow text both merge worse (docs/results.md): joint merges read broad
    # built-in text unless told otherwise
    chosen = None
    if not specs and merge.joint:
        specs = [BROAD] if has_tokenizer(checked.source.path) else [RANDOM]
        chosen = "default" if specs == [BROAD] else "default: the source has no tokenizer to read text with"
    if not specs or specs == [NONE]:
        return None, "none" if specs == [NONE] and merge.joint else None
    calib = Calibration(tuple(specs), o.calibration_tokens, o.calibration_subset, o.calibration_split, o.seed,
                        o.calibration_mix)  # fmt: skip
    calib.check(checked.shape)  # before any weight is downloaded or written (memory: refinement counted later)
    if calib.kind == "text":
        checked.tokenizer("--calibration", "pass --calibration random")
    return calib, calib.record() | ({"chosen": chosen} if chosen else {})


def _record(
    o: ConvertOptions, checked: CheckedSource, reader: FiniteReader, steps: ConversionSteps, calibration: Any
) -> dict[str, Any]:
    """The conversion record as far as it is known before any weight is written."""
    shape, arch, dtype = checked.shape, checked.arch, o.torch_dtype
    source = checked.source.record()
    kv_before = _kv_dtype(reader, arch, None).itemsize
    kv_after = _kv_dtype(reader, arch, dtype).itemsize
    return {
        "uptrain_version": __version__,
        "source": source,
        "base_model": hub_base_model(source, checked.config, o.base_model),
        "model_type": shape.model_type,
        "method": o.method,
        "grouping": o.grouping,
        "calibration": calibration,
        "seed": o.seed,
        "num_attention_heads": shape.heads,
        "source_num_kv_heads": shape.kv_heads,
        "num_kv_heads": o.num_kv_heads,
        "head_dim": shape.head_dim,
        "num_layers": shape.layers,
        "group_map": shape.group_map(o.num_kv_heads)
        if o.grouping == "contiguous"
        else "per layer: merge_errors[].groups",
        "dtype": dtype_name(_kv_dtype(reader, arch, dtype)),
        "parameters": {"before": reader.num_parameters, "after": steps.parameters},
        "kv_cache_bytes_per_token": {
            "before": shape.kv_bytes_per_token(kv_before),
            "after": shape.kv_bytes_per_token(kv_after, kv_heads=o.num_kv_heads),
        },
    }


def _write_weights(
    tmp: Path, steps: ConversionSteps, reader: FiniteReader, o: ConvertOptions, desc: str
) -> tuple[list[str], int]:
    """Every output tensor, in the writer's order, into shards in `tmp`; (the files written, their bytes)."""
    by_name = {s.spec.name: s for s in steps.steps}
    writer = ShardedWriter(tmp, [s.spec for s in steps.steps], o.shard_bytes)
    quiet = verbosity() == "quiet"
    with progress_bar(total=writer.total_size, unit="B", unit_scale=True, desc=desc, disable=quiet) as bar:
        try:
            for spec in writer.order:
                step = by_name[spec.name]
                where = _as_stored(step, reader)
                if where is not None:  # checked, then copied file to file by the kernel
                    writer.copy(spec.name, *where)
                else:
                    writer.write(spec.name, _cast_checked(step, reader))
                bar.update(spec.nbytes)
            reader.wait()  # the checks of copied tensors, running beside the copies
        finally:
            reader.close()
            writer.abort()
    return writer.finish(), writer.total_size


def _finish(
    tmp: Path,
    o: ConvertOptions,
    checked: CheckedSource,
    files: list[str],
    record: dict[str, Any],
    merge_errors: list[dict[str, Any]],
    started: float,
) -> None:
    """Beside the weights: the source's side files, the edited config, and the conversion record (completed in
    place with the merge's errors per layer) and the model card."""
    source, out = checked.source, o.out_path
    for path in side_files(source.path):  # not the source's own records (uptrain_*): this run writes its own
        if not path.name.startswith(RECORD_PREFIX) and path.name != CARD:
            shutil.copy2(path, tmp / path.name)
    new_config = converted_config(checked.config, checked.arch, o.num_kv_heads, o.torch_dtype)
    (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    if (source.path / CONVERSION_RECORD).is_file():
        record["previous"] = json.loads((source.path / CONVERSION_RECORD).read_text())
    record["shards"] = len([f for f in files if f.endswith(".safetensors")])
    if merge_errors:  # relative Σ-weighted errors of the merge, and of mean pooling, per layer
        record["merge_errors"] = merge_errors
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["environment"] = environment()
    (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    write_card(
        tmp,
        title=f"{out.name} ({o.num_kv_heads} KV heads, converted by uptrain)",
        conversion=record,
        licence=source_licence(source.path),
        source_card=source.path / CARD,
    )


def refinement_for(calib: Any, steps: int | None, lr: float, seed: int) -> Refinement | None:
    """What layer-wise refinement does: on by default when the source reads text, asked for otherwise."""
    if steps is None:
        steps = DEFAULT_STEPS if calib is not None and calib.kind != "random" else 0
    elif steps > 0 and calib is None:
        raise UptrainError(
            "--refine-steps fits each merged layer to the source's outputs on calibration text; it needs "
            "--method svd (or --grouping similarity) with --calibration TEXT (or random)"
        )
    settings = Refinement(steps, lr, seed)  # validates
    return settings if settings.steps > 0 else None
