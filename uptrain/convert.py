"""Convert a checkpoint to G shared key/value heads, streaming one tensor at a time.

Two phases. `plan_conversion` reads only config.json and safetensors headers, checks every
attention tensor against the config and decides, for each output tensor, its name, dtype,
shape and how to compute it. `convert` then writes those tensors in order through the
streaming shard writer into a temporary folder that is renamed to OUT at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from uptrain import __version__
from uptrain.architectures import Architecture, AttentionShape, attention_shape, kv_heads_keys, lookup
from uptrain.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    TensorInfo,
    TensorSpec,
    atomic_output_dir,
    dtype_name,
    read_json_object,
    side_files,
)
from uptrain.errors import UptrainError
from uptrain.fold import (
    Geometry,
    augment,
    identity_sigma,
    merge_k,
    merge_v,
    permute_rows,
    query_order,
    similarity_order,
)
from uptrain.hub import fetch_weights, resolve_source
from uptrain.merge import GROUPINGS, METHODS, Grouping, Method, Role, merge_heads, tensor_seed
from uptrain.units import format_bytes, format_count, parse_size

REPORT = "uptrain_conversion.json"
CALIBRATION = ".calibration"  # Σ files, inside the temporary output folder while converting
DtypeOption = Literal["auto", "bfloat16", "float16", "float32"]
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Op = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """How one output tensor is made: read `sources`, apply `op` (None = as stored), cast."""

    spec: TensorSpec
    sources: tuple[str, ...]
    op: Op | None = None
    job: Callable[[CheckpointReader], torch.Tensor] | None = None
    """Computes the tensor together with the rest of its layer (joint merges); overrides op."""

    def chunks(self, reader: CheckpointReader) -> Iterator[torch.Tensor]:
        """The output tensor in row pieces: copies stream through in chunks, merges come whole."""
        if self.job is not None:
            yield self.job(reader).to(self.spec.dtype)
        elif self.op is None:
            for piece in reader.read_chunks(self.sources[0]):
                yield piece.to(self.spec.dtype)
        else:
            yield self.op([reader.read(name) for name in self.sources]).to(self.spec.dtype)


def _merge_rows(ts: list[torch.Tensor], heads: int, groups: int, method: Method, role: Role, seed: int) -> torch.Tensor:
    """Rows laid out head by head, (heads·d, *rest) -> (groups·d, *rest)."""
    rows = ts[0].unflatten(0, (heads, -1))  # (KV, d, *rest)
    return merge_heads(rows, groups, method, role, seed).flatten(0, 1)


def _merge_stacked(
    ts: list[torch.Tensor], heads: int, kv_heads: int, groups: int, method: Method, role: Role, seeds: tuple[int, int]
) -> torch.Tensor:
    """Fused rows [Q; K; V] (phi3): Q rows kept, K and V blocks pooled."""
    d = ts[0].shape[0] // (heads + 2 * kv_heads)
    q, k, v = ts[0].split([heads * d, kv_heads * d, kv_heads * d])
    k = _merge_rows([k], kv_heads, groups, method, role, seeds[0])
    v = _merge_rows([v], kv_heads, groups, method, role, seeds[1])
    return torch.cat([q.float(), k, v])


def _merge_modules(ts: list[torch.Tensor], method: Method) -> torch.Tensor:
    """One norm module per KV head (stablelm): the group's modules -> one."""
    return merge_heads(torch.stack(ts), 1, method, "norm")[0]


class _LayerJob:
    """One layer's attention tensors merged jointly (`svd`, or any method with similarity grouping):
    computed once when the first of them is written, handed out one by one, then dropped."""

    def __init__(self, planner: _Planner, layer: int, names: dict[str, str], fold_k: bool) -> None:
        self.p, self.layer, self.names, self.fold_k = planner, layer, names, fold_k
        self.out: dict[str, torch.Tensor] | None = None

    def tensor(self, name: str) -> Callable[[CheckpointReader], torch.Tensor]:
        def get(reader: CheckpointReader) -> torch.Tensor:
            if self.out is None:
                self.out = self.compute(reader)
            return self.out.pop(name)

        return get

    def compute(self, reader: CheckpointReader) -> dict[str, torch.Tensor]:
        p, s, n = self.p, self.p.shape, self.names
        d, hidden = s.head_dim, s.hidden_size
        read = {key: reader.read(name).float() for key, name in n.items()}
        if "qkv" in read:  # fused rows [Q; K; V]
            q_w, k_w, v_w = read["qkv"].split([s.heads * d, s.kv_heads * d, s.kv_heads * d])
            q_b, k_b, v_b = read["qkv_b"].split([len(q_w), len(k_w), len(v_w)]) if "qkv_b" in read else (None,) * 3
        else:
            q_w, k_w, v_w = read["q"], read["k"], read["v"]
            q_b, k_b, v_b = read.get("q_b"), read.get("k_b"), read.get("v_b")
        q, k, v, o = augment(q_w, q_b), augment(k_w, k_b), augment(v_w, v_b), read["o"]
        geo = Geometry(s.heads, s.kv_heads, p.groups, d, s.rotary_dim, p.arch.rotary_pairs)
        sigma = p.sigma[self.layer] if p.sigma is not None else identity_sigma(hidden)
        order = list(range(s.kv_heads))
        if p.grouping == "similarity":
            order = similarity_order(k, v, geo, sigma)
            qo = query_order(order, geo.t)
            k, v, q = permute_rows(k, order, d), permute_rows(v, order, d), permute_rows(q, qo, d)
            o = permute_rows(o.T, qo, d).T
        if p.method == "svd":
            k, q, k_err, k_mean = merge_k(k, q, geo, sigma, "svd" if self.fold_k else "mean")
            v, o, v_err, v_mean = merge_v(v, o, geo, sigma, "svd")
        else:
            _, _, k_err, k_mean = merge_k(k, q, geo, sigma, "mean")
            _, _, v_err, v_mean = merge_v(v, o, geo, sigma, "mean")
            k_name, v_name = n.get("k", n.get("qkv", "")), n.get("v", n.get("qkv", "")) + ":v"
            k = _merge_rows([k], s.kv_heads, p.groups, p.method, "weight", tensor_seed(p.seed, k_name))
            v = _merge_rows([v], s.kv_heads, p.groups, p.method, "weight", tensor_seed(p.seed, v_name))
            if p.method == "random":  # fresh weights, zero biases
                k[:, -1], v[:, -1] = 0.0, 0.0
            if p.method != "mean":
                k_err = v_err = None  # only mean pooling's error is reported for first/random
        p.errors[self.layer] = {
            "groups": [order[g * geo.r : (g + 1) * geo.r] for g in range(p.groups)],
            "k": {"error": k_err, "mean_pooling_error": k_mean, "folded": self.fold_k and p.method == "svd"},
            "v": {"error": v_err, "mean_pooling_error": v_mean},
        }
        out = {"o": o}
        if "qkv" in read:
            out["qkv"] = torch.cat([q[:, :-1], k[:, :-1], v[:, :-1]])
            if "qkv_b" in read:
                out["qkv_b"] = torch.cat([q[:, -1], k[:, -1], v[:, -1]])
        else:
            out |= {"q": q[:, :-1], "k": k[:, :-1], "v": v[:, :-1]}
            out |= {f"{key}_b": t[:, -1] for key, t in (("q", q), ("k", k), ("v", v)) if f"{key}_b" in read}
        return {n[key]: t for key, t in out.items()}


class _Planner:
    """Collects the steps for the attention tensors of every layer, checking shapes as it goes."""

    def __init__(
        self,
        reader: CheckpointReader,
        arch: Architecture,
        shape: AttentionShape,
        groups: int,
        method: Method,
        seed: int,
        grouping: Grouping = "contiguous",
        sigma: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self.reader, self.arch, self.shape = reader, arch, shape
        self.groups, self.method, self.seed = groups, method, seed
        self.grouping, self.sigma = grouping, sigma
        self.replaced: dict[str, list[Step]] = {}  # source name -> the output steps standing in its place
        self.dropped: set[str] = set()
        self.errors: dict[int, dict[str, Any]] = {}  # per layer, filled in as layers are merged

    def tensor(self, name: str, required: bool = False) -> TensorInfo | None:
        info = self.reader.tensors.get(name)
        if info is None and required:
            raise UptrainError(
                f"the checkpoint has no tensor {name}, which a {self.shape.model_type} model with "
                f"{self.shape.layers} layers needs; config.json and the weights do not match"
            )
        return info

    def check_rows(self, info: TensorInfo, rows: int, what: str) -> None:
        s = self.shape
        ok = info.shape[:1] == (rows,) and (len(info.shape) == 1 or info.shape[1:] == (s.hidden_size,))
        if not ok:
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies {rows} rows "
                f"({what}, head_dim {s.head_dim}, hidden {s.hidden_size}); config and weights disagree"
            )

    def replace(self, info: TensorInfo, rows: int, op: Op) -> None:
        out = TensorSpec(info.name, info.dtype, (rows, *info.shape[1:]))
        self.replaced[info.name] = [Step(out, (info.name,), op)]

    def joint_layer(self, i: int) -> None:
        """Register one _LayerJob for the layer's q/k/v/o tensors (and biases)."""
        a, s, g = self.arch, self.shape, self.groups
        d = s.head_dim
        k_norm = a.k_norm is not None and any(
            name.startswith(a.module(a.k_norm.split(".{head}")[0], i)) for name in self.reader.tensors
        )
        if k_norm and self.grouping == "similarity" and a.k_norm_layout != "shared":
            raise UptrainError(
                f"--grouping similarity cannot reorder the per-head query/key norms of {s.model_type}; "
                "use --grouping contiguous"
            )
        if a.qkv_layout == "separate":
            fused = {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj}
            rows = {"q": s.heads * d, "k": s.kv_heads * d, "v": s.kv_heads * d}
            out_rows = {"q": s.heads * d, "k": g * d, "v": g * d}
        else:
            fused = {"qkv": a.qkv_proj}  # type: ignore[dict-item]
            rows = {"qkv": (s.heads + 2 * s.kv_heads) * d}
            out_rows = {"qkv": (s.heads + 2 * g) * d}
        names: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        for key, proj in fused.items():
            for suffix, tag in (("weight", key), ("bias", f"{key}_b")):
                info = self.tensor(f"{a.module(proj, i)}.{suffix}", required=suffix == "weight")
                if info is not None:
                    self.check_rows(info, rows[key], f"{key} rows")
                    names[tag], infos[tag] = info.name, info
        o = self.tensor(f"{a.module(a.o_proj, i)}.weight", required=True)
        assert o is not None
        if o.shape != (s.hidden_size, s.heads * d):
            raise UptrainError(
                f"tensor {o.name} has shape {list(o.shape)} but config.json implies {[s.hidden_size, s.heads * d]}"
            )
        names["o"], infos["o"] = o.name, o
        job = _LayerJob(self, i, names, fold_k=not k_norm)
        for tag, info in infos.items():
            key = tag.removesuffix("_b")
            shape = info.shape if key == "o" else (out_rows[key], *info.shape[1:])
            self.replaced[info.name] = [Step(TensorSpec(info.name, info.dtype, shape), (), job=job.tensor(info.name))]
        if a.k_norm is not None and a.k_norm_layout != "shared":
            self.k_norm(i)

    def layer(self, i: int) -> None:
        a, s, g = self.arch, self.shape, self.groups
        d = s.head_dim
        if self.method == "svd" or self.grouping == "similarity":
            return self.joint_layer(i)
        if a.qkv_layout == "separate":
            q = self.tensor(f"{a.module(a.q_proj, i)}.weight")
            if q is not None:
                self.check_rows(q, s.heads * d, f"{s.heads} query heads")
            for proj in (a.k_proj, a.v_proj):
                for suffix in ("weight", "bias"):
                    info = self.tensor(f"{a.module(proj, i)}.{suffix}", required=suffix == "weight")
                    if info is None:
                        continue
                    self.check_rows(info, s.kv_heads * d, f"{s.kv_heads} KV heads")
                    seed = tensor_seed(self.seed, info.name)
                    self.replace(
                        info,
                        g * d,
                        partial(_merge_rows, heads=s.kv_heads, groups=g, method=self.method, role=suffix, seed=seed),
                    )
        else:
            for suffix in ("weight", "bias"):
                info = self.tensor(f"{a.module(a.qkv_proj, i)}.{suffix}", required=suffix == "weight")
                if info is None:
                    continue
                self.check_rows(info, (s.heads + 2 * s.kv_heads) * d, f"{s.heads} query + 2×{s.kv_heads} KV heads")
                seeds = (tensor_seed(self.seed, info.name + ":k"), tensor_seed(self.seed, info.name + ":v"))
                op = partial(
                    _merge_stacked,
                    heads=s.heads,
                    kv_heads=s.kv_heads,
                    groups=g,
                    method=self.method,
                    role=suffix,
                    seeds=seeds,
                )
                self.replace(info, (s.heads + 2 * g) * d, op)
        if a.k_norm is not None and a.k_norm_layout != "shared":
            self.k_norm(i)

    def k_norm(self, i: int) -> None:
        a, s, g = self.arch, self.shape, self.groups
        d = s.head_dim
        for suffix in ("weight", "bias"):
            if a.k_norm_layout == "modules":
                names = [f"{a.module(a.k_norm, i, head=h)}.{suffix}" for h in range(s.kv_heads)]
                infos = [self.tensor(n) for n in names]
                if not any(infos):
                    continue
                if not all(infos):
                    missing = names[[x is None for x in infos].index(True)]
                    raise UptrainError(f"the checkpoint has per-head key norms but no {missing}")
                for info in infos:
                    self.check_norm(info, (d,))  # type: ignore[arg-type]
                per = s.kv_heads // g
                for j in range(g):
                    out = TensorSpec(names[j], infos[j].dtype, (d,))  # type: ignore[union-attr]
                    op = partial(_merge_modules, method=self.norm_method)
                    step = Step(out, tuple(names[j * per : (j + 1) * per]), op)
                    self.replaced[names[j]] = [step]
                self.dropped.update(names[g:])
            else:
                info = self.tensor(f"{a.module(a.k_norm, i)}.{suffix}")
                if info is None:
                    continue
                flat = a.k_norm_layout == "flat"
                self.check_norm(info, (s.kv_heads * d,) if flat else (s.kv_heads, d))
                op = partial(_merge_rows, heads=s.kv_heads, groups=g, method=self.norm_method, role="norm", seed=0)
                out = TensorSpec(info.name, info.dtype, (g * d,) if flat else (g, d))
                self.replaced[info.name] = [Step(out, (info.name,), op)]

    @property
    def norm_method(self) -> Method:
        """Key norms are not projections: they are pooled (mean) whenever heads are merged jointly."""
        return "mean" if self.method == "svd" else self.method

    def check_norm(self, info: TensorInfo, expected: tuple[int, ...]) -> None:
        if info.shape != expected:
            raise UptrainError(
                f"tensor {info.name} has shape {list(info.shape)} but config.json implies {list(expected)} "
                f"({self.shape.kv_heads} KV heads, head_dim {self.shape.head_dim}); config and weights disagree"
            )

    def check_no_extra_layers(self) -> None:
        """Attention tensors of layers beyond config's count would be copied unconverted."""
        a = self.arch
        pattern = re.compile(re.escape(a.attention).replace(re.escape("{layer}"), r"(\d+)") + r"\.")
        for name in self.reader.tensors:
            m = pattern.match(name)
            if m and int(m.group(1)) >= self.shape.layers:
                raise UptrainError(
                    f"the checkpoint has {name} but config.json says {self.shape.layers} layers; "
                    "config and weights disagree"
                )


def plan_conversion(
    reader: CheckpointReader,
    arch: Architecture,
    shape: AttentionShape,
    num_kv_heads: int,
    method: Method = "mean",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    grouping: Grouping = "contiguous",
    sigma: Mapping[int, torch.Tensor] | None = None,
    errors: dict[int, dict[str, Any]] | None = None,
) -> list[Step]:
    """Every output tensor, in source order: attention K/V tensors merged, the rest copied.
    Reads headers only; raises UptrainError on any mismatch with the config. Joint merges
    (svd, similarity grouping) fill `errors` per layer as the tensors are computed."""
    shape.check_target(num_kv_heads)
    planner = _Planner(reader, arch, shape, num_kv_heads, method, seed, grouping, sigma)
    if errors is not None:
        planner.errors = errors
    planner.check_no_extra_layers()
    for layer in range(shape.layers):
        planner.layer(layer)
    steps: list[Step] = []
    for name, info in reader.tensors.items():
        if name in planner.dropped:
            continue
        steps += planner.replaced.get(name, [Step(TensorSpec(name, info.dtype, info.shape), (name,))])
    if dtype is not None:
        steps = [
            Step(TensorSpec(s.spec.name, dtype, s.spec.shape), s.sources, s.op) if s.spec.dtype in _CASTABLE else s
            for s in steps
        ]
    return steps


def read_config(folder: Path) -> dict[str, Any]:
    missing = f"no config.json in {folder}; SRC must be a Hugging Face checkpoint folder"
    return read_json_object(Path(folder) / "config.json", missing)


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


def convert(
    src: str,
    out: str,
    *,
    num_kv_heads: int,
    method: Method = "mean",
    grouping: Grouping = "contiguous",
    calibration: str | None = None,
    calibration_tokens: int = 65536,
    dtype: DtypeOption = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    seed: int = 0,
    revision: str | None = None,
    allow_pickle: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Convert a checkpoint to G shared key/value heads (MHA -> GQA, or GQA -> fewer heads / MQA).

    Each new KV head is built from the consecutive group of source KV heads that the query
    heads sharing it used to read (transformers' repeat_kv: query head h reads KV head
    h // (H/G)). Weights are streamed one tensor at a time, so a 70B checkpoint converts in a
    few GB of RAM. The output is a standard Hugging Face folder (safetensors shards, index,
    config, tokenizer) that loads with AutoModelForCausalLM.from_pretrained, plus
    uptrain_conversion.json describing what was done. It is written to a temporary folder
    beside OUT and renamed at the end: a failed or interrupted run leaves no OUT.

    Args:
        src: Local Hugging Face checkpoint folder, or a Hub repo id (org/name) to download.
        out: Output folder for the converted checkpoint.
        num_kv_heads: G, the number of key/value heads to keep; must divide the source's
            KV-head count and be smaller (1 = MQA). `uptrain inspect SRC` lists valid values.
        method: How each group's heads become one: mean (average, the paper's default), first
            (the group's first head), random (fresh init with the source weights' std; seeded),
            svd (least-squares shared heads with per-head maps folded exactly into the query and
            output projections; docs/merging.md).
        grouping: Which source heads share a KV head: contiguous (the ones repeat_kv pairs
            today) or similarity (similar heads together; query and output heads are permuted
            to match, which changes no output by itself).
        calibration: Text files (txt/jsonl/parquet, globs allowed) to weight the merge by the
            layer inputs the source model sees; without it every input direction counts alike.
        calibration_tokens: Tokens of --calibration text to run through the source model, one
            decoder layer at a time (memory: one layer plus these tokens' hidden states).
        dtype: Cast floating-point tensors on the way (auto keeps each tensor's dtype).
        max_shard_size: Largest output shard, e.g. 5GB, 500MB, 2GiB.
        overwrite: Replace OUT if it exists (only once the new checkpoint is complete).
        seed: Seed for --method random.
        revision: Hub branch, tag or commit (Hub repo ids only).
        allow_pickle: Accept pytorch_model*.bin checkpoints (unpickling can run code; loaded
            with weights_only=True). Refused by default.
        quiet: No progress bar or summary.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise UptrainError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if grouping not in GROUPINGS:
        raise UptrainError(f"unknown grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
    if dtype not in typing.get_args(DtypeOption):
        raise UptrainError(f"unknown dtype {dtype!r}; choose from {', '.join(typing.get_args(DtypeOption))}")
    shard_cap = parse_size(max_shard_size)
    target_dtype = None if dtype == "auto" else getattr(torch, dtype)
    out_path = Path(out).absolute()
    if out_path.exists() and not overwrite:
        raise UptrainError(f"{out_path} already exists; pass --overwrite to replace it")
    # everything that can be checked from the config is, before any weight is downloaded
    source = resolve_source(src, revision)
    if out_path == source.path or out_path in source.path.parents:
        raise UptrainError(f"OUT {out_path} would replace the source itself; choose another output folder")
    config = read_config(source.path)
    arch = lookup(config)
    shape = attention_shape(config, arch)
    shape.check_target(num_kv_heads)
    source = fetch_weights(source, allow_pickle)
    reader = CheckpointReader(source.path, allow_pickle=allow_pickle)
    errors: dict[int, dict[str, Any]] = {}
    steps = plan_conversion(reader, arch, shape, num_kv_heads, method, seed, target_dtype, grouping, None, errors)

    kv_before = _kv_dtype(reader, arch, None).itemsize
    kv_after = _kv_dtype(reader, arch, target_dtype).itemsize
    report: dict[str, Any] = {
        "uptrain_version": __version__,
        "source": source.describe(),
        "model_type": shape.model_type,
        "method": method,
        "grouping": grouping,
        "calibration": None if calibration is None else {"files": calibration, "tokens": calibration_tokens},
        "seed": seed,
        "num_attention_heads": shape.heads,
        "source_num_kv_heads": shape.kv_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": shape.head_dim,
        "num_layers": shape.layers,
        "group_map": shape.group_map(num_kv_heads) if grouping == "contiguous" else "per layer: merge_errors[].groups",
        "dtype": dtype_name(_kv_dtype(reader, arch, target_dtype)),
        "parameters": {"before": reader.num_parameters, "after": sum(s.spec.numel for s in steps)},
        "kv_cache_bytes_per_token": {
            "before": shape.kv_bytes_per_token(kv_before),
            "after": shape.kv_bytes_per_token(kv_after, num_kv_heads),
        },
    }
    from tqdm.auto import tqdm

    with atomic_output_dir(out_path, overwrite) as tmp:
        if calibration is not None:  # Σ per layer lives on disk beside the output until the merge is written
            from uptrain.calibrate import input_covariance

            sigma = input_covariance(reader, arch, shape, calibration, calibration_tokens, tmp / CALIBRATION, quiet)
            steps = plan_conversion(
                reader, arch, shape, num_kv_heads, method, seed, target_dtype, grouping, sigma, errors
            )
        by_name = {s.spec.name: s for s in steps}
        writer = ShardedWriter(tmp, [s.spec for s in steps], shard_cap)
        desc = f"{shape.kind} -> {num_kv_heads} KV heads"
        with tqdm(total=writer.total_size, unit="B", unit_scale=True, desc=desc, disable=quiet, file=sys.stderr) as bar:
            try:
                for spec in writer.order:
                    writer.write(spec.name, by_name[spec.name].chunks(reader))
                    bar.update(spec.nbytes)
            finally:
                writer.abort()
        files = writer.finish()
        shutil.rmtree(tmp / CALIBRATION, ignore_errors=True)
        for path in side_files(source.path):
            if path.name != REPORT:
                shutil.copy2(path, tmp / path.name)
        new_config = converted_config(config, arch, num_kv_heads, target_dtype)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        if (source.path / REPORT).is_file():
            report["previous"] = json.loads((source.path / REPORT).read_text())
        report["shards"] = len([f for f in files if f.endswith(".safetensors")])
        if errors:  # relative Σ-weighted errors of the merge, and of mean pooling, per layer
            report["merge_errors"] = [{"layer": i, **errors[i]} for i in sorted(errors)]
        report["seconds"] = round(time.perf_counter() - started, 3)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if not quiet:
        _print_summary(report, out_path, writer.total_size)
    return report


def _print_summary(report: dict[str, Any], out: Path, nbytes: int) -> None:
    kv = report["kv_cache_bytes_per_token"]
    params = report["parameters"]
    print(
        f"{report['model_type']}: {report['source_num_kv_heads']} -> {report['num_kv_heads']} KV heads "
        f"({report['method']}) over {report['num_layers']} layers\n"
        f"KV cache: {kv['before']:,} -> {kv['after']:,} bytes/token ({kv['before'] / kv['after']:.1f}x smaller)\n"
        f"parameters: {format_count(params['before'])} -> {format_count(params['after'])}\n"
        f"wrote {out} ({report['shards']} shard(s), {format_bytes(nbytes)}) in {report['seconds']:.1f} s"
    )


convert.cli_interrupted = "interrupted; nothing was written"  # type: ignore[attr-defined]
