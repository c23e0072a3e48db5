"""What a checkpoint is and which G it can be converted to (what `uptrain inspect` prints).

Reads config.json and safetensors headers only (for Hub repos, headers come by range
requests): nothing here loads a weight.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import CONVERSION_RECORD, read_config
from uptrain_gqa.io.hub import hub_tensor_headers, resolve_source
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.io.tensors import SAFE_INDEX, SAFE_SINGLE, dtype_from_name, dtype_name
from uptrain_gqa.model.families import Architecture, lookup
from uptrain_gqa.model.shape import ModelShape, attention_kind, shape_of_config_json


def checkpoint_facts(src: str, revision: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Facts about a checkpoint as a JSON-ready dict: family, shape, dtype, parameters, KV cache per
    token, and every valid --num-kv-heads with its cache (what `uptrain inspect --json` prints)."""
    source = resolve_source(src, revision)
    config = read_config(source.path)
    if config.get("model_type") is None:
        raise UptrainError(f"{source.path}/config.json has no model_type; is this a transformers checkpoint?")
    convertible, reason = True, None
    try:
        arch = lookup(config)
    except UptrainError as e:
        convertible, reason, arch = False, str(e), Architecture()
    shape = shape_of_config_json(config, arch.kv_heads_field)

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
        "source": source.record(),
        "model_type": shape.model_type,
        "architectures": config.get("architectures") or [],
        "layers": shape.layers,
        "hidden_size": shape.hidden,
        "num_attention_heads": shape.heads,
        "num_kv_heads": shape.kv_heads,
        "attention": shape.kind,
        "head_dim": shape.head_dim,
        "dtype": dtype,
        "parameters": sum(n for _, n in headers.values()),
        "kv_cache_bytes_per_token": shape.kv_bytes_per_token(itemsize),
        "sliding_window": _sliding_window(shape),
        "convertible": convertible,
        "reason": reason,
        "valid_num_kv_heads": [
            {
                "num_kv_heads": g,
                "attention": attention_kind(shape.heads, g),
                "kv_cache_bytes_per_token": shape.kv_bytes_per_token(itemsize, kv_heads=g),
                "reduction": shape.kv_heads / g,
            }
            for g in (shape.valid_num_kv_heads() if convertible else [])
        ],
    }
    if (source.path / CONVERSION_RECORD).is_file():
        info["conversion"] = json.loads((source.path / CONVERSION_RECORD).read_text())
    return info


def _weights_cached(folder: Path) -> bool:
    index = folder / SAFE_INDEX
    if index.is_file():
        files = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / f).is_file() for f in files)
    return (folder / SAFE_SINGLE).is_file()


def _sliding_window(shape: ModelShape) -> dict[str, int] | None:
    """The window and how many layers slide (None when every layer attends to all tokens)."""
    sliding = [w for w in shape.windows if w is not None]
    return {"window": sliding[0], "layers": len(sliding)} if sliding else None
