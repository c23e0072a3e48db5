"""`uptrain convert`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json, table_wanted
from uptrain_gqa.conversion.convert import ConvertResult
from uptrain_gqa.conversion.convert import convert as convert_stage
from uptrain_gqa.conversion.options import ConvertOptions
from uptrain_gqa.errors import Stopped, signal_exit_code
from uptrain_gqa.io.hub import check_push, push_folder
from uptrain_gqa.progress import verbosity
from uptrain_gqa.units import format_bytes, format_count


def convert(
    options: ConvertOptions,
    *,
    push_to_hub: str | None = None,
    public: bool = False,
    json: JsonOption = None,
) -> ConvertResult:
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
        options: The conversion (ConvertOptions: one option per field).
        push_to_hub: Upload OUT (with its model card) to this Hub repo, e.g. you/llama-2-7b-gqa8.
        public: Create the --push-to-hub repo public (default: private).
        json: The conversion record as JSON: alone, to stdout instead of the summary; with FILE, written to
            FILE as well.
    """
    check_json_target(json)
    check_push(push_to_hub)
    try:
        result = convert_stage(options)
    except KeyboardInterrupt as e:
        raise Stopped("interrupted; nothing was written", signal_exit_code(e)) from None
    emit_json(result.to_json(), json)
    if verbosity() != "quiet" and table_wanted(json):
        _print_summary(result.record, result.out, result.bytes_written)
        if options.method == "mean":
            o = options
            again = shlex.join(["uptrain", "convert", o.src, o.out, "--num-kv-heads", str(o.num_kv_heads), "--method",
                                "svd"])  # fmt: skip
            print(f"uptrain convert: note: mean pooling (the GQA paper's start) loses the most before uptraining; "
                  f"--method svd merges and refines each layer on built-in text, much closer to the source "
                  f"(docs/results.md measures both): {again} --overwrite",
                  file=sys.stderr)  # fmt: skip
    if push_to_hub:
        url = push_folder(result.out, push_to_hub, private=not public, message="uptrain convert")
        print(f"uptrain convert: pushed {result.out} to {url}", file=sys.stderr)
    return result


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
