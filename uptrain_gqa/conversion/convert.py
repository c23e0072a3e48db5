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
from uptrain_gqa.conversion.calibrate import NONE, RANDOM
from uptrain_gqa.conversion.checks import FiniteReader, cast_can_overflow, check_cast
from uptrain_gqa.conversion.options import ConvertOptions
from uptrain_gqa.conversion.preflight import CheckedSource, attention_steps
from uptrain_gqa.conversion.refine import DEFAULT_STEPS, LayerRefiner, RefinedStore, Refinement
from uptrain_gqa.conversion.steps import ConversionSteps, MergeOptions, Step
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

CALIBRATION = ".calibration"  # Σ files, inside the temporary output folder while converting
REFINED = ".refined"  # refined attention tensors, likewise


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
    changed = attention_steps(reader, arch, shape, options)  # the header checks `plan --quality` makes too
    steps: list[Step] = []
    for name, info in reader.tensors.items():
        if name not in changed.dropped:
            steps += changed.replaced.get(name, [Step(TensorSpec(name, info.dtype, info.shape), (name,))])
    return ConversionSteps(steps, changed.merges).cast(dtype)


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
    o = options
    src, num_kv_heads, method, grouping, seed = o.src, o.num_kv_heads, o.method, o.grouping, o.seed
    overwrite, dtype, quiet = o.overwrite, o.torch_dtype, verbosity() == "quiet"
    from uptrain_gqa.conversion.calibrate import Calibration

    started = time.perf_counter()
    out = o.out_path
    if out.exists() and not overwrite:
        raise UptrainError(f"{out} already exists; pass --overwrite to replace it")
    # everything that can be checked from the config is, before any weight is downloaded: the pre-flight that
    # `plan --quality` reads the source through too (conversion/preflight.py)
    checked = CheckedSource.open(src, o.revision)
    source, config, arch, shape = checked.source, checked.config, checked.arch, checked.shape
    if out == source.path or out in source.path.parents:
        raise UptrainError(f"OUT {out} would replace the source itself; choose another output folder")
    shape.check_target(num_kv_heads)
    options = MergeOptions(num_kv_heads, method, grouping, seed)
    specs = list(o.calibration or [])
    if not options.joint and specs not in ([], [NONE]):
        raise UptrainError(
            f"--calibration weights --method svd or --grouping similarity; --method {method} with contiguous "
            "groups reads no inputs, so drop --calibration"
        )
    # a weights-only Σ (identity) measured worse than mean pooling on a real checkpoint, and a narrow text
    # narrows the model: joint merges read broad built-in text unless told otherwise (docs/results.md)
    chosen = None
    if not specs and options.joint:
        specs = [BROAD] if has_tokenizer(source.path) else [RANDOM]
        chosen = "default" if specs == [BROAD] else "default: the source has no tokenizer to read text with"
    calib = None
    if specs and specs != [NONE]:
        calib = Calibration(tuple(specs), o.calibration_tokens, o.calibration_subset, o.calibration_split, seed,
                            o.calibration_mix)  # fmt: skip
    if calib is not None:
        calib.check(shape)  # before any weight is downloaded or written (memory: refinement counted later)
        if calib.kind == "text":
            checked.tokenizer("--calibration", "pass --calibration random")
    refinement = refinement_for(calib, o.refine_steps, o.refine_lr, seed)
    reader = checked.weights(o.allow_pickle)
    source = checked.source
    side_files(source.path)  # refuses a side file linking out of the source, before any work
    steps = conversion_steps(reader, arch, shape, options, dtype)

    kv_before = _kv_dtype(reader, arch, None).itemsize
    kv_after = _kv_dtype(reader, arch, dtype).itemsize
    record: dict[str, Any] = {
        "uptrain_version": __version__,
        "source": source.record(),
        "base_model": hub_base_model(source.record(), config, o.base_model),
        "model_type": shape.model_type,
        "method": method,
        "grouping": grouping,
        "calibration": (calib.record() | ({"chosen": chosen} if chosen else {}))
        if calib is not None
        else ("none" if specs == [NONE] and options.joint else None),
        "seed": seed,
        "num_attention_heads": shape.heads,
        "source_num_kv_heads": shape.kv_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": shape.head_dim,
        "num_layers": shape.layers,
        "group_map": shape.group_map(num_kv_heads) if grouping == "contiguous" else "per layer: merge_errors[].groups",
        "dtype": dtype_name(_kv_dtype(reader, arch, dtype)),
        "parameters": {"before": reader.num_parameters, "after": steps.parameters},
        "kv_cache_bytes_per_token": {
            "before": shape.kv_bytes_per_token(kv_before),
            "after": shape.kv_bytes_per_token(kv_after, kv_heads=num_kv_heads),
        },
    }
    refiner = None
    with atomic_output_dir(out, overwrite) as tmp:
        if calib is not None:  # Σ per layer lives on disk beside the output until the merge is written
            from uptrain_gqa.conversion.calibrate import input_covariance

            facts: dict[str, Any] = {}
            if refinement is not None:
                refiner = LayerRefiner(refinement, reader, arch, shape, options, RefinedStore(tmp / REFINED))
            refiners = [refiner] if refiner is not None else []
            sigma = input_covariance(reader, arch, shape, calib, tmp / CALIBRATION, quiet, facts, refiners)
            record["calibration"] |= facts
            options = MergeOptions(num_kv_heads, method, grouping, seed, sigma)
            steps = conversion_steps(reader, arch, shape, options, dtype)
            if refiner is not None:
                steps = steps.made_by({name: refiner.store.job(name) for name in refiner.store})
                record["refinement"] = refiner.record()
        by_name = {s.spec.name: s for s in steps.steps}
        writer = ShardedWriter(tmp, [s.spec for s in steps.steps], o.shard_bytes)
        desc = f"{shape.kind} -> {num_kv_heads} KV heads"
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
        files = writer.finish()
        shutil.rmtree(tmp / CALIBRATION, ignore_errors=True)
        shutil.rmtree(tmp / REFINED, ignore_errors=True)
        for path in side_files(source.path):  # not the source's own records (uptrain_*): this run writes its own
            if not path.name.startswith(RECORD_PREFIX) and path.name != CARD:
                shutil.copy2(path, tmp / path.name)
        new_config = converted_config(config, arch, num_kv_heads, dtype)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        if (source.path / CONVERSION_RECORD).is_file():
            record["previous"] = json.loads((source.path / CONVERSION_RECORD).read_text())
        record["shards"] = len([f for f in files if f.endswith(".safetensors")])
        # refined layers: the closed-form merge's errors as computed before refining, and what refining did
        merge_errors = refiner.layers if refiner is not None else steps.merge_errors()
        if merge_errors:  # relative Σ-weighted errors of the merge, and of mean pooling, per layer
            record["merge_errors"] = merge_errors
        record["seconds"] = round(time.perf_counter() - started, 3)
        record["environment"] = environment()
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        write_card(
            tmp,
            title=f"{out.name} ({num_kv_heads} KV heads, converted by uptrain)",
            conversion=record,
            licence=source_licence(source.path),
            source_card=source.path / CARD,
        )
    return record, writer.total_size


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
