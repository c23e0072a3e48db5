"""How each family's attention layout turns into steps, one layer at a time.

- separate k_proj / v_proj rows: each pooled on its own (weight and bias);
- stacked [Q; K; V] rows (phi3): Q kept, K and V blocks pooled;
- key norms with one entry per KV head (flat, rows, per-head modules): pooled like the heads,
  modules beyond G dropped; norms shared by every head are kept as they are;
- joint merges (least squares, or similarity grouping): q/k/v/o of the layer computed together.
"""

from __future__ import annotations

from functools import partial

from uptrain_gqa.conversion.checks import TensorChecks
from uptrain_gqa.conversion.joint import JointLayer
from uptrain_gqa.conversion.pooling import merge_modules, merge_rows, merge_stacked, tensor_seed
from uptrain_gqa.conversion.steps import LayerSteps, MergeOptions, Op, Step
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.tensors import TensorInfo, TensorSpec
from uptrain_gqa.model.families import Architecture
from uptrain_gqa.model.shape import ModelShape


def layer_steps(
    layer: int, checks: TensorChecks, arch: Architecture, shape: ModelShape, options: MergeOptions
) -> LayerSteps:
    """The steps that replace one layer's attention tensors."""
    if options.joint:
        out = joint_layer(layer, checks, arch, shape, options)
    elif arch.qkv_layout == "separate":
        out = separate_kv(layer, checks, arch, shape, options)
    else:
        out = stacked_qkv(layer, checks, arch, shape, options)
    if arch.k_norm is not None and arch.k_norm_layout != "shared":
        out.add(key_norms(layer, checks, arch, shape, options))
    return out


def _replace(info: TensorInfo, rows: int, op: Op) -> dict[str, list[Step]]:
    return {info.name: [Step(TensorSpec(info.name, info.dtype, (rows, *info.shape[1:])), (info.name,), op)]}


def separate_kv(
    layer: int, checks: TensorChecks, arch: Architecture, shape: ModelShape, options: MergeOptions
) -> LayerSteps:
    s, g, d = shape, options.num_kv_heads, shape.head_dim
    out = LayerSteps()
    q = checks.tensor(f"{arch.module(arch.q_proj, layer)}.weight")
    if q is not None:
        checks.rows(q, s.heads * d, f"{s.heads} query heads")
    for proj in (arch.k_proj, arch.v_proj):
        for suffix in ("weight", "bias"):
            info = checks.tensor(f"{arch.module(proj, layer)}.{suffix}", required=suffix == "weight")
            if info is None:
                continue
            checks.rows(info, s.kv_heads * d, f"{s.kv_heads} KV heads")
            seed = tensor_seed(options.seed, info.name)
            op = partial(merge_rows, heads=s.kv_heads, groups=g, method=options.merge, role=suffix, seed=seed)
            out.replaced |= _replace(info, g * d, op)
    return out


def stacked_qkv(
    layer: int, checks: TensorChecks, arch: Architecture, shape: ModelShape, options: MergeOptions
) -> LayerSteps:
    s, g, d = shape, options.num_kv_heads, shape.head_dim
    out = LayerSteps()
    for suffix in ("weight", "bias"):
        info = checks.tensor(f"{arch.module(arch.qkv_proj, layer)}.{suffix}", required=suffix == "weight")
        if info is None:
            continue
        checks.rows(info, (s.heads + 2 * s.kv_heads) * d, f"{s.heads} query + 2×{s.kv_heads} KV heads")
        seeds = (tensor_seed(options.seed, info.name + ":k"), tensor_seed(options.seed, info.name + ":v"))
        op = partial(
            merge_stacked, heads=s.heads, kv_heads=s.kv_heads, groups=g, method=options.merge, role=suffix, seeds=seeds
        )
        out.replaced |= _replace(info, (s.heads + 2 * g) * d, op)
    return out


def key_norms(
    layer: int, checks: TensorChecks, arch: Architecture, shape: ModelShape, options: MergeOptions
) -> LayerSteps:
    """Key norms with one entry per KV head: 'flat' (KV·d,), 'rows' (KV, d), or one module per head."""
    s, g, d = shape, options.num_kv_heads, shape.head_dim
    out = LayerSteps()
    for suffix in ("weight", "bias"):
        if arch.k_norm_layout == "modules":
            names = [f"{arch.module(arch.k_norm, layer, head=h)}.{suffix}" for h in range(s.kv_heads)]
            infos = [checks.tensor(n) for n in names]
            if not any(infos):
                continue
            if not all(infos):
                missing = names[[x is None for x in infos].index(True)]
                raise UptrainError(f"the checkpoint has per-head key norms but no {missing}")
            for info in infos:
                checks.norm(info, (d,))  # type: ignore[arg-type]
            per = s.group_size(g)
            for j in range(g):
                spec = TensorSpec(names[j], infos[j].dtype, (d,))  # type: ignore[union-attr]
                op = partial(merge_modules, method=options.merge)
                out.replaced[names[j]] = [Step(spec, tuple(names[j * per : (j + 1) * per]), op)]
            out.dropped.update(names[g:])
        else:
            info = checks.tensor(f"{arch.module(arch.k_norm, layer)}.{suffix}")
            if info is None:
                continue
            flat = arch.k_norm_layout == "flat"
            checks.norm(info, (s.kv_heads * d,) if flat else (s.kv_heads, d))
            op = partial(merge_rows, heads=s.kv_heads, groups=g, method=options.merge, role="norm", seed=0)
            spec = TensorSpec(info.name, info.dtype, (g * d,) if flat else (g, d))
            out.replaced[info.name] = [Step(spec, (info.name,), op)]
    return out


def joint_layer(
    layer: int, checks: TensorChecks, arch: Architecture, shape: ModelShape, options: MergeOptions
) -> LayerSteps:
    """One JointLayer computes the layer's q/k/v/o tensors (and biases); each is a step of it."""
    s, g, d = shape, options.num_kv_heads, shape.head_dim
    k_norm = arch.k_norm is not None and any(
        name.startswith(arch.module(arch.k_norm.split(".{head}")[0], layer)) for name in checks.tensors
    )
    if k_norm and options.grouping == "similarity" and arch.k_norm_layout != "shared":
        raise UptrainError(
            f"--grouping similarity cannot reorder the per-head query/key norms of {s.model_type}; "
            "use --grouping contiguous"
        )
    if arch.qkv_layout == "separate":
        projections = {"q": arch.q_proj, "k": arch.k_proj, "v": arch.v_proj}
        rows = {"q": s.heads * d, "k": s.kv_heads * d, "v": s.kv_heads * d}
        out_rows = {"q": s.heads * d, "k": g * d, "v": g * d}
    else:
        projections = {"qkv": arch.qkv_proj}  # type: ignore[dict-item]
        rows = {"qkv": (s.heads + 2 * s.kv_heads) * d}
        out_rows = {"qkv": (s.heads + 2 * g) * d}
    names: dict[str, str] = {}
    infos: dict[str, TensorInfo] = {}
    for key, proj in projections.items():
        for suffix, tag in (("weight", key), ("bias", f"{key}_b")):
            info = checks.tensor(f"{arch.module(proj, layer)}.{suffix}", required=suffix == "weight")
            if info is not None:
                checks.rows(info, rows[key], f"{key} rows")
                names[tag], infos[tag] = info.name, info
    o = checks.tensor(f"{arch.module(arch.o_proj, layer)}.weight", required=True)
    assert o is not None
    checks.output_projection(o)
    names["o"], infos["o"] = o.name, o
    merge = JointLayer(layer, names, shape, options, arch.rotary_pairs, fold_k=not k_norm)
    out = LayerSteps(merges=[merge])
    for tag, info in infos.items():
        key = tag.removesuffix("_b")
        out_shape = info.shape if key == "o" else (out_rows[key], *info.shape[1:])
        out.replaced[info.name] = [Step(TensorSpec(info.name, info.dtype, out_shape), (), job=merge.tensor(info.name))]
    return out
