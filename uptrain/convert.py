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
from collections.abc import Callable, Iterator
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
from uptrain.hub import fetch_weights, resolve_source
from uptrain.merge import METHODS, Method, Role, merge_heads, tensor_seed
from uptrain.units import format_bytes, format_count, parse_size

REPORT = "uptrain_conversion.json"
DtypeOption = Literal["auto", "bfloat16", "float16", "float32"]
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Op = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """How one output tensor is made: read `sources`, apply `op` (None = as stored), cast."""

    spec: TensorSpec
    sources: tuple[str, ...]
    op: Op | None = None

    def chunks(self, reader: CheckpointReader) -> Iterator[torch.Tensor]:
        """The output tensor in row pieces: copies stream through in chunks, merges come whole."""
        if self.op is None:
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
    ) -> None:
        self.reader, self.arch, self.shape = reader, arch, shape
        self.groups, self.method, self.seed = groups, method, seed
        self.replaced: dict[str, list[Step]] = {}  # source name -> the output steps standing in its place
        self.dropped: set[str] = set()

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

    def layer(self, i: int) -> None:
        a, s, g = self.arch, self.shape, self.groups
        d = s.head_dim
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
                    step = Step(out, tuple(names[j * per : (j + 1) * per]), partial(_merge_modules, method=self.method))
                    self.replaced[names[j]] = [step]
                self.dropped.update(names[g:])
            else:
                info = self.tensor(f"{a.module(a.k_norm, i)}.{suffix}")
                if info is None:
                    continue
                flat = a.k_norm_layout == "flat"
                self.check_norm(info, (s.kv_heads * d,) if flat else (s.kv_heads, d))
                op = partial(_merge_rows, heads=s.kv_heads, groups=g, method=self.method, role="norm", seed=0)
                out = TensorSpec(info.name, info.dtype, (g * d,) if flat else (g, d))
                self.replaced[info.name] = [Step(out, (info.name,), op)]

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
) -> list[Step]:
    """Every output tensor, in source order: attention K/V tensors merged, the rest copied.
    Reads headers only; raises UptrainError on any mismatch with the config."""
    shape.check_target(num_kv_heads)
    planner = _Planner(reader, arch, shape, num_kv_heads, method, seed)
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
            (the group's first head), random (fresh init with the source weights' std; seeded).
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
    steps = plan_conversion(reader, arch, shape, num_kv_heads, method, seed, target_dtype)
    by_name = {s.spec.name: s for s in steps}

    kv_before = _kv_dtype(reader, arch, None).itemsize
    kv_after = _kv_dtype(reader, arch, target_dtype).itemsize
    report: dict[str, Any] = {
        "uptrain_version": __version__,
        "source": source.describe(),
        "model_type": shape.model_type,
        "method": method,
        "seed": seed,
        "num_attention_heads": shape.heads,
        "source_num_kv_heads": shape.kv_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": shape.head_dim,
        "num_layers": shape.layers,
        "group_map": shape.group_map(num_kv_heads),
        "dtype": dtype_name(_kv_dtype(reader, arch, target_dtype)),
        "parameters": {"before": reader.num_parameters, "after": sum(s.spec.numel for s in steps)},
        "kv_cache_bytes_per_token": {
            "before": shape.kv_bytes_per_token(kv_before),
            "after": shape.kv_bytes_per_token(kv_after, num_kv_heads),
        },
    }
    from tqdm.auto import tqdm

    with atomic_output_dir(out_path, overwrite) as tmp:
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
        for path in side_files(source.path):
            if path.name != REPORT:
                shutil.copy2(path, tmp / path.name)
        new_config = converted_config(config, arch, num_kv_heads, target_dtype)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        if (source.path / REPORT).is_file():
            report["previous"] = json.loads((source.path / REPORT).read_text())
        report["shards"] = len([f for f in files if f.endswith(".safetensors")])
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
