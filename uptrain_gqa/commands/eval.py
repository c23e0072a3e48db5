"""`uptrain eval`."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from uptrain_gqa import config as configlib
from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json, table_wanted
from uptrain_gqa.config import Overrides
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.data.sources import parse_sources
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.evaluation.evaluate import HeldOutText, Placement, evaluate_model
from uptrain_gqa.evaluation.options import DATA_HELP, DATA_KEYS, EvalOptions
from uptrain_gqa.evaluation.result import EvalResult, plot_compare, print_compare, print_result
from uptrain_gqa.io.cards import add_eval_results
from uptrain_gqa.training.config import TrainConfig
from uptrain_gqa.units import parse_size


def _held_out_texts(o: EvalOptions) -> list[HeldOutText]:
    """--config RUN.yaml (its data and seed; --data.* settings apply), or the --data.* settings, or --data
    NAME=DATA texts (other --data.* settings apply to each), or nothing."""
    settings = dict(o.data_settings)
    if o.data:
        where = [f"--data.{k}" for k in ("files", "dataset") if k in settings]
        if o.config is not None or where:
            raise UptrainError(
                f"--data NAME=DATA names the held-out texts; {(o.config and '--config') or ', '.join(where)} would "
                "name them again: give one of the two"
            )
        subset, split = settings.pop("name", None), settings.pop("split", "train")
        out = []
        for source in parse_sources(o.data, "--data", subset, split):
            given = source.data()
            fields: dict[str, Any] = {"files": given.files}
            if given.dataset:
                fields = {"dataset": given.dataset, "name": given.name, "split": given.split, "streaming": True}
            cfg = configlib.from_dict(DataConfig, settings | fields, "data")
            out.append(HeldOutText(cfg, label=source.label, doc_tokens=source.doc_tokens))
        return out
    if o.config is not None:
        run = configlib.load(TrainConfig, o.config, {f"data.{k}": v for k, v in settings.items()})
        return [HeldOutText(run.data, run_config=o.config, seed=run.seed)]
    if not settings:
        return []
    return [HeldOutText(configlib.from_dict(DataConfig, settings, "data"))]


def run_evaluation(options: EvalOptions | Mapping[str, Any] | None = None, /, **fields: Any) -> EvalResult:
    """Evaluate a model (see `uptrain eval --help`), e.g. `run_evaluation(model="llama-gqa8", reference="llama",
    data=["uptrain:heldout"])`; `fields` override the options'. Returns the EvalResult (`.to_json()`: the
    schema of docs/eval-schema.md). Raises UptrainError; prints nothing (progress bars aside)."""
    o = configlib.options_of(EvalOptions, options, fields, "run_evaluation")
    if o.model is None:
        raise UptrainError("give MODEL to evaluate (or --compare A.json B.json ...)")
    if o.log_samples:
        _check_creatable_folder(Path(o.log_samples), "--log-samples")
    memory = _max_memory(o.max_memory) if o.max_memory is not None else None
    if o.device_map is not None:
        _check_devices_here(o.device_map, memory, o.max_memory)
    if o.offload_folder is not None:
        _check_creatable_folder(Path(o.offload_folder), "--offload-folder")
    texts = _held_out_texts(o)
    with contextlib.ExitStack() as stack:
        placement = None
        if o.device_map is not None:  # scratch space of ours, removed however the evaluation ends
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="uptrain-eval-", dir=o.offload_folder))
            placement = Placement(o.device_map, memory, Path(folder))
        return evaluate_model(o, texts, placement)


def evaluate(
    options: EvalOptions,
    *,
    compare: list[str] | None = None,
    json: JsonOption = None,
    update_card: bool = False,
    plot: str | None = None,
    overrides: Annotated[list[str] | None, Overrides(DataConfig, "data", DATA_KEYS, DATA_HELP)] = None,
) -> EvalResult | None:
    """Evaluate a (converted) model: perplexity, KL and agreement with its source, KV cache, decode speed.

    Held-out text comes as in `uptrain train` (--data.files=..., --data.dataset=... --data.split=...), or as
    several named texts (--data prose=docs/*.md code=src/*.c, or uptrain:heldout, the built-in suite of five
    kinds of text), or --config RUN.yaml scores a training run's held-out blocks. Several texts, and each
    source of a mixture, are scored one by one and reported each and as their mean. The KV cache is computed from the
    config and measured from the cache transformers holds after generation; decode speed is measured
    on the current device (a GPU if present, synchronised, after a warm-up). A table goes to stdout;
    --json [FILE] gives the result as JSON (schema in docs/eval-schema.md); --compare A.json B.json ... prints
    saved results side by side.

    Args:
        options: The evaluation (EvalOptions: one option per field).
        compare: Saved --json results to print side by side (no evaluation).
        json: The result as JSON (schema in docs/eval-schema.md): alone, to stdout instead of the table;
            with FILE, written to FILE as well.
        update_card: Write the held-out results (perplexity; KL and top-1 agreement with --reference) into
            MODEL's model card (README.md) as its Hub model-index, one entry per text; earlier ones are replaced.
        plot: With --compare: also draw the results' perplexity and KL to the reference as bars (a PNG file; needs
            matplotlib).
        overrides: --data.key=value settings for the held-out text.
    """
    if plot is not None and not compare:
        raise UptrainError("--plot draws saved results: give them with --compare A.json B.json ...")
    if compare:
        if plot is not None:
            check_json_target(plot, "--plot")  # a file that can be written, checked before anything is read
        results = print_compare(compare)
        if plot is not None:
            plot_compare(compare, results, Path(plot))
        return None
    parsed = configlib.parse_overrides(overrides or [])
    bad = [k for k in parsed if not k.startswith("data.")]
    if bad:
        raise UptrainError(f"unknown option(s) {', '.join('--' + k for k in bad)}; eval takes --data.* settings")
    options = replace(options, data_settings={k.removeprefix("data."): v for k, v in parsed.items()})
    check_json_target(json)  # before the evaluation, not after it
    if update_card and (options.model is None or not Path(options.model).is_dir()):
        raise UptrainError("--update-card writes into MODEL's README.md: give MODEL as a local folder")
    if update_card and not (options.data or options.config or options.data_settings):
        raise UptrainError("--update-card records held-out scores: give held-out text with --data FILES")
    result = run_evaluation(options)
    out = result.to_json()
    if table_wanted(json):
        print_result(out)
    if not options.data and not options.config and not options.data_settings and options.tasks is None:
        print("uptrain eval: no held-out text, so no perplexity or KL; give some with --data FILES (globs, a Hub "
              "dataset id, or uptrain:heldout, the built-in suite)", file=sys.stderr)  # fmt: skip
    try:
        emit_json(out, json)
    except OSError as e:  # a full disk: the table above is printed; no partial file is left
        raise UptrainError(f"--json {json}: cannot write it ({e.strerror}); the results are printed above") from e
    if update_card:
        add_eval_results(Path(str(options.model)), out)
        print(f"uptrain eval: wrote the results into {Path(str(options.model)) / 'README.md'}", file=sys.stderr)
    return result


def _max_memory(text: str) -> dict[int | str, int]:
    """'0=70GiB,cpu=200GiB' -> {0: 70·2³⁰, 'cpu': 200·2³⁰}."""
    out: dict[int | str, int] = {}
    for part in text.split(","):
        where, sep, size = part.strip().partition("=")
        where = where.strip()
        if not sep or not (where.isdigit() or where in ("cpu", "mps")):
            raise UptrainError(
                f"--max-memory {text}: write it as DEVICE=SIZE pairs, e.g. 0=70GiB,1=70GiB,cpu=200GiB "
                "(GPU indices, cpu or mps)"
            )
        out[int(where) if where.isdigit() else where] = parse_size(size)
    return out


def _check_devices_here(device_map: str, memory: dict[int | str, int] | None, memory_text: str | None) -> None:
    """Refuse, before any model is read, a placement that names a GPU this machine does not have (accelerate
    and torch would fail with a traceback): `--device-map cuda:1`, `--max-memory 0=70GiB` without GPU 0."""
    import torch

    one = re.fullmatch(r"(?:cuda(?::(\d+))?|(\d+))", device_map.strip())
    named = [(f"--device-map {device_map}", int(one.group(1) or one.group(2) or 0))] if one else []
    named += [(f"--max-memory {memory_text}", key) for key in memory or {} if isinstance(key, int)]
    count = torch.cuda.device_count()
    for flag, index in named:
        if index < count:
            continue
        if count == 0:
            here = "there is no GPU here"
        else:
            here = f"there {'is' if count == 1 else 'are'} only {count} GPU{'s' if count > 1 else ''} " + (
                f"({', '.join(str(i) for i in range(count))})"
            )
        instead = "give cpu entries (cpu=200GiB)" if flag.startswith("--max-memory") else "use --device-map auto or cpu"
        raise UptrainError(f"{flag} names GPU {index}, but {here}; {instead}, or run on a machine with that GPU")
    mps = device_map.strip() == "mps" or (memory is not None and "mps" in memory)
    if mps and not torch.backends.mps.is_available():
        raise UptrainError("--device-map/--max-memory name mps, but there is no Apple GPU (mps) here; use cpu entries")


def _check_creatable_folder(path: Path, flag: str) -> None:
    """Create the folder `path` before any work (as --json's parent is), or fail in one line."""
    if path.exists() and not path.is_dir():
        raise UptrainError(f"{flag} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UptrainError(f"{flag} {path}: cannot create it ({e.strerror}); choose another folder") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UptrainError(f"{flag} {path}: cannot write into it (permission denied); choose another folder")
