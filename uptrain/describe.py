"""`uptrain inspect`: what a checkpoint is and which G it can be converted to.

Reads config.json and safetensors headers only (for Hub repos, headers come by range
requests): nothing here loads a weight.
"""

from __future__ import annotations

import json as jsonlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from uptrain.architectures import Architecture, attention_kind, attention_shape, lookup
from uptrain.checkpoint import SAFE_INDEX, SAFE_SINGLE, CheckpointReader, dtype_from_name, dtype_name
from uptrain.convert import REPORT, read_config
from uptrain.errors import UptrainError
from uptrain.hub import hub_tensor_headers, resolve_source
from uptrain.units import format_bytes, format_count


def describe(src: str, revision: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Facts about a checkpoint as a JSON-ready dict (see `inspect` for the fields)."""
    source = resolve_source(src, revision)
    config = read_config(source.path)
    if config.get("model_type") is None:
        raise UptrainError(f"{source.path}/config.json has no model_type; is this a transformers checkpoint?")
    convertible, reason = True, None
    try:
        arch = lookup(config)
    except UptrainError as e:
        convertible, reason, arch = False, str(e), Architecture()
    shape = attention_shape(config, arch)

    if source.repo_id is None or _weights_cached(source.path):
        reader = CheckpointReader(source.path, allow_pickle=allow_pickle)
        headers = {n: (t.dtype, t.numel) for n, t in reader.tensors.items()}
    else:  # a Hub repo whose weights are not downloaded: headers by range requests
        headers = {}
        for name, (dt, dims) in hub_tensor_headers(source.repo_id, source.commit).items():
            numel = 1
            for n in dims:
                numel *= n
            headers[name] = (dtype_from_name(dt), numel)
    by_dtype: Counter[str] = Counter()
    for dt, numel in headers.values():
        by_dtype[dtype_name(dt)] += numel * dt.itemsize
    dtype = by_dtype.most_common(1)[0][0] if by_dtype else "unknown"
    # the KV cache holds activations in the weights' floating dtype (dtype='auto' loading)
    floating = dtype in ("bfloat16", "float16", "float32", "float64")
    itemsize = getattr(torch, dtype).itemsize if floating else 2
    info: dict[str, Any] = {
        "source": source.describe(),
        "model_type": shape.model_type,
        "architectures": config.get("architectures") or [],
        "layers": shape.layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.heads,
        "num_kv_heads": shape.kv_heads,
        "attention": shape.kind,
        "head_dim": shape.head_dim,
        "dtype": dtype,
        "parameters": sum(n for _, n in headers.values()),
        "kv_cache_bytes_per_token": shape.kv_bytes_per_token(itemsize),
        "sliding_window": _sliding_window(config),
        "convertible": convertible,
        "reason": reason,
        "valid_num_kv_heads": [
            {
                "num_kv_heads": g,
                "attention": attention_kind(shape.heads, g),
                "kv_cache_bytes_per_token": shape.kv_bytes_per_token(itemsize, g),
                "reduction": shape.kv_heads / g,
            }
            for g in (shape.valid_num_kv_heads() if convertible else [])
        ],
    }
    if (source.path / REPORT).is_file():
        info["conversion"] = jsonlib.loads((source.path / REPORT).read_text())
    return info


def _weights_cached(folder: Path) -> bool:
    index = folder / SAFE_INDEX
    if index.is_file():
        files = set(jsonlib.loads(index.read_text())["weight_map"].values())
        return all((folder / f).is_file() for f in files)
    return (folder / SAFE_SINGLE).is_file()


def _sliding_window(config: dict[str, Any]) -> dict[str, int] | None:
    window = config.get("sliding_window")
    if not window:
        return None
    types = config.get("layer_types") or []
    layers = sum(t == "sliding_attention" for t in types) if types else config.get("num_hidden_layers", 0)
    return {"window": window, "layers": layers}


def inspect(src: str, *, revision: str | None = None, allow_pickle: bool = False, json: bool = False) -> None:
    """Describe a checkpoint: family, heads, KV cache per token, and the valid --num-kv-heads values.

    Reads config.json and the safetensors headers only; no weights are loaded (for a Hub repo,
    the headers are fetched by range requests).

    Args:
        src: Local Hugging Face checkpoint folder, or a Hub repo id (org/name).
        revision: Hub branch, tag or commit (Hub repo ids only).
        allow_pickle: Read pytorch_model*.bin checkpoints (weights_only=True); refused by default.
        json: Print the facts as JSON instead of a table.
    """
    info = describe(src, revision, allow_pickle)
    if json:
        print(jsonlib.dumps(info, indent=2))
        return
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
