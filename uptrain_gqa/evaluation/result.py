"""The `uptrain eval` result: a stable JSON schema (these dataclasses), a table, and side-by-side comparison.

`schema_version` changes only when a field changes meaning or disappears; new fields may appear.
Sizes are bytes, times seconds, losses nats per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import read_json_object

SCHEMA_VERSION = 1


@dataclass
class ModelInfo:
    path: str
    """Folder or Hub id the model was loaded from."""
    model_type: str
    """transformers model_type, e.g. llama."""
    layers: int
    """Decoder layers."""
    num_attention_heads: int
    """Query heads per layer (H)."""
    num_kv_heads: int
    """Key/value heads per layer (G)."""
    head_dim: int
    """Dimension of each head."""
    parameters: int
    """Parameters (tied weights counted once)."""
    dtype: str
    """dtype the model was evaluated in."""
    attention: str = "default"
    """Attention implementation: uptrain_sdpa (decode reads shared K/V heads once), or the family's default."""


@dataclass
class DataInfo:
    source: str
    """What the text was: files, Hub dataset and split, or the held-out blocks of a run config."""
    mode: str
    """'strided': one token stream scored in overlapping windows; 'blocks': fixed blocks, each on its own."""
    tokens: int
    """Tokens scored (predicted), the denominator of every per-token figure."""
    windows: int
    """Windows (or blocks) scored."""
    window: int
    """Tokens per window (the context each prediction sees at most)."""
    stride: int
    """Tokens between window starts (= window in 'blocks' mode)."""


@dataclass
class Quality:
    perplexity: float
    """exp(nll)."""
    nll: float
    """Mean negative log-likelihood per scored token."""
    reference_perplexity: float | None = None
    """The reference's perplexity on the same tokens."""
    reference_nll: float | None = None
    """The reference's mean negative log-likelihood on the same tokens."""
    kl: float | None = None
    """Mean per-token KL(reference || model) over the full vocabulary."""
    top1_agreement: float | None = None
    """Share of positions where both models' most likely next token is the same."""


@dataclass
class Domain:
    label: str
    """Name of the held-out text (eval --data NAME=DATA, a mixture source's label)."""
    data: DataInfo
    """What was scored."""
    quality: Quality
    """Perplexity and, with a reference, KL and agreement, on this text alone."""


@dataclass
class KVCache:
    bytes_per_token: int
    """2 · layers · kv_heads · head_dim · bytes (full-attention layers)."""
    batch: int
    """Sequences generated together."""
    cached_tokens: int
    """Tokens in the cache after generation (prompt + generated − 1)."""
    formula_bytes: int
    """Cache size from the config, sliding-window layers capped at window − 1 tokens."""
    measured_bytes: int
    """Sum of the key and value tensors in the DynamicCache after generation."""
    match: bool
    """measured_bytes == formula_bytes."""


@dataclass
class Decode:
    prompt_tokens: int
    """Prompt length of each sequence."""
    new_tokens: int
    """Tokens generated per sequence."""
    batch: int
    """Sequences generated together."""
    prefill_seconds: float
    """Time to process the prompt and produce the first token."""
    decode_tokens_per_s: float
    """Generated tokens per second after the prefill, over the whole batch."""
    peak_memory_bytes: int | None
    """Peak memory while generating (see peak_memory_kind); None where it cannot be read."""
    peak_memory_kind: str
    """'cuda_allocated' (torch.cuda.max_memory_allocated) or 'process_rss' (peak resident memory on CPU)."""


@dataclass
class EvalResult:
    schema_version: int
    """Version of this schema."""
    uptrain_version: str
    """uptrain that wrote the file."""
    device: str
    """Where the measurements ran, e.g. 'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (16 cores)'."""
    model: ModelInfo
    """The evaluated model."""
    reference: ModelInfo | None = None
    """The reference (--reference), if any."""
    data: DataInfo | None = None
    """The held-out text, if perplexity was measured (several texts: their sum, `source` naming each)."""
    quality: Quality | None = None
    """Perplexity and, with a reference, KL and agreement (several texts: their mean, each text weighing the same;
    perplexity = exp of the mean NLL)."""
    domains: list[Domain] = field(default_factory=list)
    """Each held-out text on its own, when several were scored (in the order given)."""
    kv_cache: dict[str, KVCache] = field(default_factory=dict)
    """'model' and, with --reference, 'reference'."""
    decode: dict[str, Decode] = field(default_factory=dict)
    """'model' and, with --reference, 'reference'."""
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """lm-evaluation-harness results: task -> metric -> value."""
    task_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """How each lm-eval task ran: task -> n_shot, version, limit, chat_template (compare only equal settings)."""

    def to_json(self) -> dict[str, Any]:
        """What `uptrain eval --json` writes (docs/eval-schema.md)."""
        return asdict(self)


def load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    data = read_json_object(p, f"{p} not found")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise UptrainError(f"{p} is not an `uptrain eval --json` result (schema_version {SCHEMA_VERSION})")
    return data


def rows_of(r: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines for one result; missing figures show as '-'."""
    q, kv, dec = r.get("quality") or {}, r.get("kv_cache") or {}, r.get("decode") or {}

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    m = r["model"]
    rows = [
        ("model", f"{m['path']} ({m['model_type']}, {m['num_kv_heads']} of {m['num_attention_heads']} KV heads)"),
        ("perplexity", num(q.get("perplexity"), ".3f")),
        ("reference perplexity", num(q.get("reference_perplexity"), ".3f")),
        ("KL(reference ‖ model)", num(q.get("kl"), ".4f")),
        ("top-1 agreement", "-" if q.get("top1_agreement") is None else f"{q['top1_agreement']:.2%}"),
        ("scored tokens", num((r.get("data") or {}).get("tokens"), ",")),
        ("KV bytes/token", num((kv.get("model") or {}).get("bytes_per_token"), ",")),
        ("KV measured = formula", "-" if "model" not in kv else ("yes" if kv["model"]["match"] else "NO")),
        ("decode tokens/s", num((dec.get("model") or {}).get("decode_tokens_per_s"), ",.1f")),
        ("peak memory (MB)", "-" if not dec.get("model") or dec["model"]["peak_memory_bytes"] is None
         else f"{dec['model']['peak_memory_bytes'] / 1e6:,.0f}"),
    ]  # fmt: skip
    for d in r.get("domains") or []:
        dq, name = d["quality"], d["label"]
        agree = "-" if dq.get("top1_agreement") is None else f"{dq['top1_agreement']:.2%}"
        rows += [(f"{name}: perplexity", num(dq.get("perplexity"), ".3f")), (f"{name}: KL", num(dq.get("kl"), ".4f")),
                 (f"{name}: top-1", agree)]  # fmt: skip
    for task, metrics in (r.get("tasks") or {}).items():
        rows += [(f"{task} {k}", f"{v:.4f}") for k, v in metrics.items()]
    return rows


def domain_table(domains: list[dict[str, Any]], mean: dict[str, Any] | None) -> list[str]:
    """A markdown table of each held-out text's figures (KL and top-1 when measured), and their mean."""
    with_ref = any(d["quality"].get("kl") is not None for d in domains)
    head = "| text | tokens | perplexity |" + (
        " reference perplexity | KL(reference ‖ model) | top-1 |" if with_ref else ""
    )
    lines = [head, "|---|---|---|" + ("---|---|---|" if with_ref else "")]
    rows = [(d["label"], f"{d['data']['tokens']:,}", d["quality"]) for d in domains]
    if mean is not None:
        rows.append((f"mean of {len(domains)}", "", mean))
    for label, tokens, q in rows:
        line = f"| {label} | {tokens} | {q['perplexity']:.3f} |"
        if with_ref:
            line += f" {q['reference_perplexity']:.3f} | {q['kl']:.4f} | {q['top1_agreement']:.2%} |"
        lines.append(line)
    return lines


def print_result(r: dict[str, Any]) -> None:
    d = r.get("data")
    print(f"uptrain eval on {r['device']}")
    for one in r.get("domains") or ([{"label": None, "data": d}] if d else []):
        x, label = one["data"], f"{one['label']}: " if one["label"] else ""
        print(
            f"data: {label}{x['source']} — {x['tokens']:,} tokens scored in {x['windows']:,} {x['mode']} window(s) "
            f"of {x['window']:,} (stride {x['stride']:,})"
        )
    if r.get("reference"):
        ref = r["reference"]
        print(f"reference: {ref['path']} ({ref['num_kv_heads']} of {ref['num_attention_heads']} KV heads)")
    if r.get("domains"):
        print()
        print("\n".join(domain_table(r["domains"], r.get("quality"))))
    print()
    print("| | model | reference |")
    print("|---|---|---|")
    own = dict(rows_of(r))
    ref_rows = _reference_rows(r)
    mean = f" (mean of {len(r['domains'])} texts)" if r.get("domains") else ""
    for label, value in own.items():
        if label in ("reference perplexity", "model") or (value == "-" and label not in ref_rows) or ": " in label:
            continue  # not measured in this run, or a text's own figure (in the table above)
        if label in ("perplexity", "KL(reference ‖ model)", "top-1 agreement"):
            label += mean
        print(f"| {label} | {value} | {ref_rows.get(label, '')} |")
    for name, kv in (r.get("kv_cache") or {}).items():
        print(
            f"\nKV cache ({name}): {kv['measured_bytes']:,} bytes measured for {kv['batch']} x {kv['cached_tokens']} "
            f"tokens, formula {kv['formula_bytes']:,} -> {'equal' if kv['match'] else 'DIFFERENT'}"
        )


def _reference_rows(r: dict[str, Any]) -> dict[str, str]:
    q, out = r.get("quality") or {}, {}
    if q.get("reference_perplexity") is not None:
        out["perplexity"] = f"{q['reference_perplexity']:.3f}"
    if "reference" in (r.get("kv_cache") or {}):
        out["KV bytes/token"] = f"{r['kv_cache']['reference']['bytes_per_token']:,}"
        out["KV measured = formula"] = "yes" if r["kv_cache"]["reference"]["match"] else "NO"
    dec = (r.get("decode") or {}).get("reference")
    if dec:
        out["decode tokens/s"] = f"{dec['decode_tokens_per_s']:,.1f}"
        if dec["peak_memory_bytes"] is not None:
            out["peak memory (MB)"] = f"{dec['peak_memory_bytes'] / 1e6:,.0f}"
    return out


def print_compare(paths: list[str]) -> list[dict[str, Any]]:
    """Several results side by side, one column each."""
    results = [load(p) for p in paths]
    tables = []
    for path, r in zip(paths, results, strict=True):
        try:
            tables.append(dict(rows_of(r)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UptrainError(
                f"{path} lacks or garbles a field ({type(e).__name__}: {e}); "
                "is it a whole `uptrain eval --json` result?"
            ) from e
    labels = list(dict.fromkeys(label for t in tables for label in t))
    print("| | " + " | ".join(Path(p).stem for p in paths) + " |")
    print("|---|" + "---|" * len(paths))
    for label in labels:
        print(f"| {label} | " + " | ".join(t.get(label, "-") for t in tables) + " |")
    return results


def plot_compare(paths: list[str], results: list[dict[str, Any]], out: Path) -> None:
    """A PNG of the compared results: perplexity (and the reference's) and KL to the reference, a bar each."""
    import importlib.util
    import io

    from uptrain_gqa.io.folders import write_file
    from uptrain_gqa.version import install_hint

    if importlib.util.find_spec("matplotlib") is None:
        raise UptrainError(f"--plot draws with matplotlib, which is not installed: {install_hint('plot')}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [Path(p).stem for p in paths]
    quality = [r.get("quality") or {} for r in results]
    fig = Figure(figsize=(max(6.0, 1.4 * len(names) + 3), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    panels = [("perplexity", "perplexity (lower is better)"), ("kl", "KL to the reference (nats per token)")]
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        values = [q.get(key) if q.get(key) is not None else 0.0 for q in quality]
        ax.bar(names, values, color="tab:blue" if key == "perplexity" else "tab:orange")
        if key == "perplexity":
            refs = [q.get("reference_perplexity") for q in quality]
            for x, ref in enumerate(refs):
                if ref is not None:
                    ax.hlines(ref, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("uptrain eval --compare (dashed: the reference's perplexity)", fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_file(out, png.getvalue(), "--plot")


def schema_markdown() -> str:
    """docs/eval-schema.md, generated from the dataclasses above (a test keeps the file in step)."""
    import dataclasses
    import typing

    from uptrain_gqa.config import field_docs

    lines = [
        "# `uptrain eval --json` schema",
        "",
        "The JSON that `uptrain eval --json FILE` writes (and `--json` alone prints), "
        f"version {SCHEMA_VERSION} (`schema_version`).",
        "`schema_version` changes only when a field changes meaning or disappears; new fields may be added.",
        "Sizes are bytes, times seconds, losses nats per token. Defined in `uptrain_gqa/evaluation/result.py`.",
        "",
    ]
    for cls in (EvalResult, ModelInfo, DataInfo, Quality, Domain, KVCache, Decode):
        lines += [f"## `{cls.__name__}`", "", "| field | type | meaning |", "|---|---|---|"]
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = getattr(hints[f.name], "__name__", None) if not typing.get_args(hints[f.name]) else None
            tp = tp or str(hints[f.name]).replace("typing.", "").replace("uptrain_gqa.evaluation.result.", "")
            lines.append(f"| `{f.name}` | `{tp.replace(' | None', '')}`{' or null' if ' | None' in tp else ''} "
                         f"| {docs.get(f.name, '')} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)
