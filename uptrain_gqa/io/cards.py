"""Model cards: the README.md (YAML metadata + text) that every model folder uptrain writes carries.

Built with huggingface_hub's `ModelCard`/`ModelCardData`, so the Hub reads `base_model`, the
licence and the tags. The card names the source, the conversion (H → G KV heads, method, KV-cache
bytes) and, for trained models, the uptraining (tokens, α of the original pretraining, steps,
validation loss). The source's licence travels with it: its `license` metadata, and its licence
files copied beside the card (`licence_files`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.version import DISTRIBUTION, __version__

CARD = "README.md"
TEMPLATE = "---\n{{ card_data }}\n---\n\n# {{ title }}\n\n{{ body }}\n"
LICENCE_NAMES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY", "COPYING")


def source_licence(folder: Path) -> str | None:
    """The `license` the source's own card declares, if it has one."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / CARD
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a README without (valid) metadata: no declared licence
        return None


def licence_files(source: Path, out: Path) -> list[str]:
    """Copy the source's licence files into `out`; returns their names."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name.upper().startswith(LICENCE_NAMES):
            shutil.copy2(path, Path(out) / path.name)
            copied.append(path.name)
    return copied


def _base_model(record: dict[str, Any]) -> str:
    """How the card's text names the source: its Hub id, else its folder's name."""
    source = record.get("source") or {}
    return record.get("base_model") or source.get("repo_id") or Path(str(source.get("path", "source"))).name


def hub_base_model(source: dict[str, Any], config: dict[str, Any], given: str | None = None) -> str | None:
    """The Hub id a derived model's card names as `base_model`: `given` (--base-model, refused if it is not a
    Hub id), the source's repo id,
    or the `_name_or_path` its config.json was saved with when that is an 'org/name' Hub id and no local
    folder; None otherwise (the metadata then leaves base_model out rather than name a local folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if given is not None:
        try:
            validate_repo_id(given)
        except HFValidationError as e:
            raise UptrainError(
                f"--base-model {given!r} is not a Hub model id ({e}); give e.g. meta-llama/Llama-2-7b-hf"
            ) from None
        return given
    candidates = [source.get("repo_id")]
    name = config.get("_name_or_path")
    if isinstance(name, str) and name.count("/") == 1 and not Path(name).expanduser().exists():
        candidates.append(name)
    for candidate in candidates:
        if not candidate:
            continue
        try:
            validate_repo_id(candidate)
        except HFValidationError:
            continue
        return candidate
    return None


def _usage(kv_heads: int | None) -> list[str]:
    """How to load the model: transformers, and llama.cpp's converter (a standard GQA checkpoint)."""
    heads = f" ({kv_heads} KV heads)" if kv_heads else ""
    return [
        "## Usage",
        "",
        f"A standard Hugging Face checkpoint of the source's family{heads}: it loads as the source does, with",
        "transformers, vLLM or llama.cpp's converter, with no code of uptrain's.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_ID")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")',
        "```",
        "",
        "```bash",
        "python convert_hf_to_gguf.py PATH --outfile model.gguf   # llama.cpp's converter",
        "```",
        "",
    ]


def conversion_lines(record: dict[str, Any]) -> list[str]:
    kv = record.get("kv_cache_bytes_per_token") or {}
    lines = [
        f"- **Source:** `{_base_model(record)}` ({record.get('model_type')}, {record.get('num_attention_heads')} query "
        f"heads, {record.get('source_num_kv_heads')} KV heads)",
        f"- **Converted to:** {record.get('num_kv_heads')} KV heads by `{record.get('method')}` "
        f"({record.get('grouping')} grouping), dtype {record.get('dtype')}",
    ]
    if kv:
        lines.append(f"- **KV cache:** {kv.get('before'):,} → {kv.get('after'):,} bytes per token")
    c = record.get("calibration")
    if isinstance(c, dict) and c.get("sources"):
        texts = ", ".join(f"{s['label']} (`{s['data']}`, {s['tokens']:,} tokens)" for s in c["sources"])
        lines.append(
            f"- **Calibration:** the source read {c.get('tokens_used', c['tokens']):,} tokens of text, one layer at "
            f"a time, to weight the merge by what each layer sees: {texts}"
        )
    elif isinstance(c, dict):
        lines.append(f"- **Calibration:** {c.get('tokens_used', c['tokens']):,} {c['kind']} tokens")
    elif c == "none":
        lines.append("- **Calibration:** none (the merge weighs the weights alone)")
    r = record.get("refinement")
    if isinstance(r, dict) and r.get("steps"):
        layers = record.get("num_layers")
        kept = f"; kept on {r['layers_improved']} of {layers} layers" if "layers_improved" in r and layers else ""
        lines.append(
            f"- **Refinement:** each merged attention trained for {r['steps']} steps (lr {r['lr']:g}) to reproduce "
            f"the source layer's output on the calibration text{kept}, where it lowered the error on held-out "
            "windows"
        )
    return lines


def write_card(
    out: Path,
    *,
    title: str,
    conversion: dict[str, Any] | None,
    training: dict[str, Any] | None = None,
    base_model: str | None = None,
    licence: str | None = None,
    body: str = "",
    source_card: Path | None = None,
) -> None:
    """OUT/README.md for a converted (`conversion`) and possibly uptrained (`training`) model."""
    from huggingface_hub import ModelCard, ModelCardData

    lines = [body, ""] if body else []
    lines += _usage((conversion or {}).get("num_kv_heads"))
    if conversion:
        lines += ["## Conversion (uptrain convert)", "", *conversion_lines(conversion), ""]
        base_model = base_model or conversion.get("base_model")
    if training:
        lines += ["## Uptraining (uptrain train)", "", *(f"- **{k}:** {v}" for k, v in training.items()), ""]
    done = "converted to grouped-query attention and uptrained" if training else "converted to grouped-query attention"
    record = (
        "`uptrain_conversion.json` and `uptrain_train.yaml` hold" if training else "`uptrain_conversion.json` holds"
    )
    lines.append(f"Made with uptrain {__version__} (`{DISTRIBUTION}`): {done}; {record} the full record.")
    if source_card is not None and Path(source_card).is_file():  # kept, not replaced: terms, intended use
        try:
            text = ModelCard.load(source_card).text.strip()
        except Exception:  # a README without metadata, or not UTF-8: kept with undecodable bytes replaced
            text = Path(source_card).read_text(errors="replace").strip()
        if text:
            lines += ["", "## The source's model card", "", text]
    data = ModelCardData(
        base_model=base_model,
        license=licence,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["uptrain", "gqa" if (conversion or {}).get("num_kv_heads", 2) > 1 else "mqa"],
    )
    card = ModelCard.from_template(data, template_str=TEMPLATE, title=title, body="\n".join(lines))
    (Path(out) / CARD).write_text(str(card))


EVAL_TASK = "text-generation"
EVAL_METRICS = {  # quality field -> (model-index metric type, its name on the card)
    "perplexity": ("perplexity", "Perplexity"),
    "kl": ("kl_divergence", "KL to the source (nats per token)"),
    "top1_agreement": ("top1_agreement", "Top-1 agreement with the source"),
}
_HUB_SOURCE = re.compile(r"^Hub dataset (?P<type>\S+)(?: \((?P<config>[^)]*)\))?: (?P<split>.+)$")


def _held_out_results(result: dict[str, Any], dataset_name: str | None) -> list[Any]:
    """One huggingface_hub EvalResult per metric of each held-out text (each of `domains`, else the whole)."""
    from huggingface_hub import EvalResult

    domains = result.get("domains") or []
    texts = [(d.get("label"), d.get("data") or {}, d.get("quality") or {}) for d in domains]
    if not texts:
        texts = [(None, result.get("data") or {}, result.get("quality") or {})]
    if any(q.get("perplexity") is None for _, _, q in texts):
        raise UptrainError(
            "the eval result holds no held-out scores (no perplexity); run `uptrain eval MODEL --data ... --json "
            "FILE` (with --reference SOURCE for KL and top-1 agreement)"
        )
    out = []
    for label, data, quality in texts:
        source = str(data.get("source") or "")
        hub = _HUB_SOURCE.match(source)
        if label is None:
            name = dataset_name or source or "held-out text"
        else:
            name = f"{dataset_name} ({label})" if dataset_name else label
        where: dict[str, Any] = (
            {"dataset_type": hub["type"], "dataset_config": hub["config"], "dataset_split": hub["split"]}
            if hub
            else {"dataset_type": "custom", "dataset_config": label}  # the label keeps local texts apart
        )
        args = {k: data[k] for k in ("mode", "tokens", "window", "stride") if data.get(k) is not None} or None
        for field, (metric_type, metric_name) in EVAL_METRICS.items():
            if quality.get(field) is None:
                continue
            out.append(
                EvalResult(
                    task_type=EVAL_TASK,
                    task_name="Text Generation",
                    dataset_name=name,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=float(quality[field]),
                    metric_args=args if field == "perplexity" else None,
                    **where,
                )
            )
    return out


def _uptrain_wrote(r: Any) -> bool:
    """An earlier `add_eval_results` entry (replaced, never duplicated); other results on the card are kept."""
    return r.task_type == EVAL_TASK and (r.metric_type, r.metric_name) in EVAL_METRICS.values()


def add_eval_results(folder: Path, result: dict[str, Any], *, dataset_name: str | None = None) -> None:
    """Write an `uptrain eval --json` result into FOLDER/README.md's `model-index` metadata.

    One model-index entry (task `text-generation`) per held-out text: each of `domains` when several texts were
    scored, else the whole; each with the perplexity and, with a reference, the KL to it and the top-1
    agreement. `dataset_name` names the text (with several, it prefixes each label). Entries an earlier call
    wrote are replaced; the card's other metadata, other evaluation results and body text are kept. A missing
    README.md becomes a minimal card. README.md is replaced whole (never through a symlink, which is refused).
    """
    import stat

    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from uptrain_gqa.io.folders import write_file

    if not isinstance(result, dict) or not isinstance(result.get("model"), dict):
        raise UptrainError("not an `uptrain eval --json` result (docs/eval-schema.md)")
    folder = Path(folder)
    readme = folder / CARD
    new = _held_out_results(result, dataset_name)
    try:
        mode = readme.lstat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise UptrainError(f"model card {readme} is {kind}; uptrain replaces only regular files")
    if mode is None:
        data = ModelCardData(library_name="transformers", pipeline_tag=EVAL_TASK, tags=["uptrain"])
        title = folder.resolve().name or "model"
        card = ModelCard.from_template(data, template_str=TEMPLATE, title=title, body="")
    else:
        try:
            card = ModelCard(readme.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
            raise UptrainError(
                f"{readme}'s metadata does not parse ({type(e).__name__}: {e}); fix or remove its model-index"
            ) from None
    kept = [r for r in card.data.eval_results or [] if not _uptrain_wrote(r)]
    card.data.model_name = card.data.model_name or folder.resolve().name or "model"
    card.data.eval_results = kept + new
    write_file(readme, str(card).encode("utf-8"), "model card")
