"""`uptrain inspect`."""

from __future__ import annotations

from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json, table_wanted
from uptrain_gqa.model.facts import checkpoint_facts
from uptrain_gqa.units import format_bytes, format_count


def inspect(src: str, *, revision: str | None = None, allow_pickle: bool = False, json: JsonOption = None) -> dict:
    """Describe a checkpoint: family, heads, KV cache per token, and the valid --num-kv-heads values.

    Reads config.json and the safetensors headers only; no weights are loaded (for a Hub repo,
    the headers are fetched by range requests).

    Args:
        src: Local Hugging Face checkpoint folder, or a Hub repo id (org/name).
        revision: Hub branch, tag or commit (Hub repo ids only).
        allow_pickle: Read pytorch_model*.bin checkpoints (weights_only=True); refused by default.
        json: The facts as JSON: alone, to stdout instead of the table; with FILE, written to FILE as well.
    """
    check_json_target(json)
    info = checkpoint_facts(src, revision, allow_pickle)
    emit_json(info, json)
    if not table_wanted(json):
        return info
    src_text = info["source"].get("path") or f"{info['source']['repo_id']} @ {info['source']['commit']}"
    kv = info["kv_cache_bytes_per_token"]
    rows = [
        ("source", src_text),
        ("family", f"{info['model_type']} ({', '.join(info['architectures']) or '?'})"),
        ("layers", info["layers"]),
        ("hidden size", info["hidden_size"]),
        ("query heads (H)", info["num_attention_heads"]),
        ("KV heads", f"{info['num_kv_heads']} ({info['attention']})"),
        ("head_dim", info["head_dim"]),
        ("dtype", info["dtype"]),
        ("parameters", f"{info['parameters']:,} ({format_count(info['parameters'])})"),
        ("KV cache", f"{kv:,} bytes/token ({format_bytes(kv)}; x 4096 tokens = {format_bytes(kv * 4096)})"),
    ]
    if info["sliding_window"]:
        sw = info["sliding_window"]
        rows.append(("sliding window", f"{sw['window']} tokens on {sw['layers']} of {info['layers']} layers"))
    if "conversion" in info:
        c = info["conversion"]
        rows.append(
            ("converted by", f"uptrain {c['uptrain_version']}: {c['method']} from {c['source_num_kv_heads']} KV heads")
        )
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print()
    if not info["convertible"]:
        print(f"not convertible: {info['reason']}")
    elif not info["valid_num_kv_heads"]:
        print("already MQA (1 KV head): nothing left to merge")
    else:
        print("valid --num-kv-heads (G):")
        print(f"  {'G':>4}  {'attention':<9}  {'KV bytes/token':>15}  {'cache':>12}")
        for v in reversed(info["valid_num_kv_heads"]):
            smaller = f"{v['reduction']:g}x smaller"
            print(f"  {v['num_kv_heads']:>4}  {v['attention']:<9}  {v['kv_cache_bytes_per_token']:>15,}  {smaller:>12}")
    return info
