"""One model evaluated: held-out quality against its reference, KV cache, decode speed, lm-eval tasks.

The model (and its reference) are loaded on the current device; the result follows the schema in
result.py (docs/eval-schema.md).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.data.blocks import prepare
from uptrain_gqa.data.config import DataConfig, fitted, mixture_parts
from uptrain_gqa.data.documents import token_stream
from uptrain_gqa.device import compute_device, device_name, inference_dtype
from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.evaluation.attention import register as register_attention
from uptrain_gqa.evaluation.generation import generation
from uptrain_gqa.evaluation.options import EvalOptions
from uptrain_gqa.evaluation.quality import Window, batches, log_probs, quality, score, strided, summary
from uptrain_gqa.evaluation.result import SCHEMA_VERSION, DataInfo, Domain, EvalResult, ModelInfo
from uptrain_gqa.evaluation.tasks import run_tasks
from uptrain_gqa.io.hub import looks_like_repo_id
from uptrain_gqa.model.loading import check_model_folder
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.progress import LOGGER, progress_bar
from uptrain_gqa.units import format_bytes
from uptrain_gqa.version import __version__


@dataclass(frozen=True)
class HeldOutText:
    """The text to score: `data` as one strided stream, or, with `run_config`, that training run's own
    held-out blocks (its validation set, selected with its `seed`). A mixture is scored source by source."""

    data: DataConfig
    run_config: str | None = None
    seed: int = 0
    label: str | None = None
    """Its name in a report of several texts."""
    doc_tokens: int | None = None
    """Tokens read from each document at most (None: whole documents)."""


FEW_TOKENS = 1000
"""Below this many scored tokens, eval warns that perplexity and KL are too noisy to compare."""


@dataclass(frozen=True)
class Placement:
    """accelerate's big-model placement, for models that do not fit one device (`eval --device-map`)."""

    device_map: str
    """'auto', 'balanced', 'balanced_low_0', 'sequential' or one device ('cpu', 'cuda:1')."""
    max_memory: dict[int | str, str] | None
    """Memory per device, e.g. {0: '70GiB', 'cpu': '200GiB'}; what does not fit goes to disk."""
    folder: Path
    """Scratch space: offloaded weights, and the reference's log-probabilities; removed at the end."""


def load_model(path: str, dtype: str, device: torch.device, placement: Placement | None = None) -> tuple[Any, Any]:
    """A model in eval mode on `device` (dtype 'auto': bfloat16 on GPUs, float32 on CPUs), or placed over
    several devices by `placement`, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).exists()
    if not local and not looks_like_repo_id(path):
        raise UptrainError(f"{path}: no such model folder (and not a Hub repo id like org/name)")
    check_model_folder(path)  # a step checkpoint or a run folder of `uptrain train`: say which folder to give
    try:
        kwargs: dict[str, Any] = {"dtype": inference_dtype(device, dtype)}
        if placement is not None:
            offload = tempfile.mkdtemp(prefix="offload-", dir=placement.folder)
            kwargs |= {"device_map": placement.device_map, "max_memory": placement.max_memory,
                       "offload_folder": offload}  # fmt: skip
        try:  # decode that reads shared K/V heads once (see uptrain_gqa.evaluation.attention)
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register_attention(), **kwargs)
        except ValueError as e:  # a family without transformers' attention interface: its default attention
            if "attn_implementation" not in str(e) and "attention" not in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model = (model if placement is not None else model.to(device)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        if not local:  # both readings failed: say the likely one first
            raise UptrainError(
                f"{path}: no such model folder here, and no Hub repo of that name could be loaded ({first_line(e)})"
            ) from e
        raise UptrainError(f"cannot load {path}: {first_line(e)}") from e
    return model, tokenizer


def model_info(path: str, model: Any) -> ModelInfo:
    shape = ModelShape.from_config(model.config)
    return ModelInfo(
        path=path,
        model_type=shape.model_type,
        layers=shape.layers,
        num_attention_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        parameters=model.num_parameters(),
        dtype=str(model.dtype).removeprefix("torch."),
        attention=str(getattr(model.config, "_attn_implementation", None) or "default"),
    )


Scored = tuple[str | None, list[Window], DataInfo]
"""One text to score: its label, its windows, and what it is."""


def text_windows(
    text: HeldOutText, tokenizer: Any, config: Any, max_tokens: int, window: int | None, stride: int | None
) -> list[Scored]:
    """The windows to score, and what they are: one text, or one per source of a mixture."""
    limit = getattr(config, "max_position_embeddings", None)
    cfg = fitted(text.data, limit)
    if text.run_config is not None:  # the run's held-out blocks, as its validation loss saw them
        data = prepare(cfg, tokenizer, seed=text.seed, micro_batch_size=1)
        rows = [(row[0], b[0]) for row, b in data.validation_rows(1)]  # type: ignore[union-attr]
        parts = getattr(data, "parts", None) or [(text.label, range(len(rows)))]
        out: list[Scored] = []
        for label, where in parts:
            windows = [(ids, 1) for r, ids in rows if r in where]
            tokens = sum(len(w) - 1 for w, _ in windows)
            source = f"held-out blocks of {text.run_config}" + (f" ({label})" if label else "")
            out.append((label, windows, DataInfo(source, "blocks", tokens, len(windows), cfg.seq_len, cfg.seq_len)))
        return out
    if cfg.mixture:
        return [
            scored
            for label, _, single in mixture_parts(cfg)
            for scored in text_windows(
                replace(text, data=single, label=label), tokenizer, config, max_tokens, window, stride
            )
        ]
    assert cfg.seq_len is not None  # fitted above
    limit = limit or cfg.seq_len
    window = window if window is not None else min(cfg.seq_len, limit)
    if window > limit:
        raise UptrainError(f"--window {window} is above the model's max_position_embeddings {limit}")
    stride = stride if stride is not None else max(1, window // 2)
    if not 0 < stride <= window:
        raise UptrainError(f"--stride must be between 1 and the window ({window}), got {stride}")
    stream, source = token_stream(cfg, tokenizer, max_tokens, text.doc_tokens)
    named = f" ({text.label})" if text.label else ""
    if len(stream) < 2:
        raise UptrainError(f"the evaluation text{named} holds fewer than 2 tokens")
    windows = strided(stream, window, stride)
    tokens = sum(len(w) - first for w, first in windows)
    if tokens < FEW_TOKENS:
        LOGGER.warning(
            f"only {tokens:,} held-out tokens{named} are scored; a perplexity over so few is noise (give at least "
            f"{FEW_TOKENS:,})"
        )
    return [(text.label, windows, DataInfo(source, "strided", tokens, len(windows), window, stride))]


def evaluate_model(
    options: EvalOptions, texts: Sequence[HeldOutText] = (), placement: Placement | None = None
) -> EvalResult:
    """Everything `uptrain eval` measures (see its --help), as an EvalResult. Each of `texts` (and each source
    of a mixture) is scored on its own; with more than one, the result holds each and their mean. With
    `placement`, each model is placed over devices by accelerate, and with a reference the two are loaded one
    after the other: the reference's log-probabilities of every batch go to the placement's folder, then the
    model is scored against them (the same figures as with both resident)."""
    o = options
    model, reference, dtype, batch_size = str(o.model), o.reference, o.dtype, o.batch_size
    max_tokens, window, stride, speed = o.max_tokens, o.window, o.stride, not o.no_speed
    prompt_tokens, new_tokens, decode_batch, tasks = o.prompt_tokens, o.new_tokens, o.decode_batch, o.tasks
    for path in (model, reference):  # both, before either is loaded
        if path is not None:
            check_model_folder(path)
    device = compute_device()
    one_at_a_time = placement is not None and reference is not None
    net = ref = None
    if one_at_a_time:
        ref, ref_tok = load_model(reference, dtype, device, placement)
        tokenizer, config = _tokenizer_and_config(model)
    else:
        net, tokenizer = load_model(model, dtype, device, placement)
        config = net.config
        if reference:
            ref, ref_tok = load_model(reference, dtype, device)
    if ref is not None:
        _check_vocabulary(model, tokenizer, config, reference or "", ref_tok, ref.config)
    reference_info = model_info(reference or "", ref) if ref is not None else None
    scored = [d for text in texts for d in text_windows(text, tokenizer, config, max_tokens, window, stride)]
    kv_cache, decode = {}, {}
    stored: list[list[Path]] = []
    if one_at_a_time:  # the reference first, then out of memory before the model comes in
        assert placement is not None
        _check_disk(ref, [w for _, windows, _ in scored for w in windows], batch_size, placement.folder)
        stored = [_store_log_probs(ref, windows, batch_size, placement.folder) for _, windows, _ in scored]
        if speed:
            kv_cache["reference"], decode["reference"] = generation(ref, prompt_tokens, new_tokens, decode_batch)
        ref = None
        _release()
        net, tokenizer = load_model(model, dtype, device, placement)
    result = EvalResult(SCHEMA_VERSION, __version__, device_name(device), model_info(model, net), reference_info)
    domains = []
    what = "scoring" + (" against the reference" if reference else "")
    with progress_bar(total=sum(data.tokens for *_, data in scored), unit="token", unit_scale=True, desc=what,
                      disable=not scored) as bar:  # fmt: skip
        for d, (label, windows, data) in enumerate(scored):
            if stored:
                paths = stored[d]
                totals = score(net, windows, batch_size, scored=bar.update,
                               reference_log_probs=lambda b, paths=paths: _load_log_probs(paths[b]))  # fmt: skip
            else:
                totals = score(net, windows, batch_size, ref, scored=bar.update)
            domains.append(Domain(label or f"text-{d + 1}", data, quality(totals, reference is not None)))
    if len(domains) == 1:
        result.data, result.quality = domains[0].data, domains[0].quality
    elif domains:
        result.domains = domains
        result.data, result.quality = summary(domains)
    if speed:
        for name, m in (("model", net), ("reference", ref)):
            if m is not None:
                kv_cache[name], decode[name] = generation(m, prompt_tokens, new_tokens, decode_batch)
        # the model's entry first, whichever ran first
        result.kv_cache = {k: kv_cache[k] for k in ("model", "reference") if k in kv_cache}
        result.decode = {k: decode[k] for k in ("model", "reference") if k in decode}
    if tasks:
        result.tasks, result.task_settings = run_tasks(
            net,
            tokenizer,
            tasks,
            o.tasks_limit,
            o.tasks_include,
            o.tasks_batch_size or batch_size,
            num_fewshot=o.num_fewshot,
            chat_template=o.chat_template,
            log_samples=Path(o.log_samples) if o.log_samples else None,
        )
    return result


def _tokenizer_and_config(path: str) -> tuple[Any, Any]:
    """A model's tokenizer and config, without its weights."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UptrainError(f"cannot load {path}: {first_line(e)}") from e


def _check_vocabulary(model: str, tok: Any, config: Any, reference: str, ref_tok: Any, ref_config: Any) -> None:
    if ref_tok.get_vocab() != tok.get_vocab() or ref_config.vocab_size != config.vocab_size:
        raise UptrainError(
            f"{model} and {reference} use different tokenizers; KL and agreement need the same vocabulary"
        )


def _check_disk(model: Any, windows: list[Window], batch_size: int, folder: Path) -> None:
    """Refuse at once when the disk under `folder` cannot hold the reference's log-probabilities of `windows`."""
    positions = sum(ids.shape[0] * (ids.shape[1] - 1) for ids, _ in batches(windows, batch_size))
    need, free = positions * model.config.vocab_size * 4, shutil.disk_usage(folder).free
    if need > free:
        raise UptrainError(
            f"--device-map with --reference keeps the reference's log-probabilities on disk: {format_bytes(need)} "
            f"for these {positions:,} positions, but {folder} has {format_bytes(free)} free; lower "
            "--max-tokens or pass --offload-folder on a larger disk"
        )


def _store_log_probs(model: Any, windows: list[Window], batch_size: int, folder: Path) -> list[Path]:
    """Each batch's log-probabilities (float32, as scored) in a file of its own under `folder`."""
    from safetensors.torch import save_file

    out = Path(tempfile.mkdtemp(prefix="reference-", dir=folder))
    paths = []
    with torch.no_grad():
        for b, (ids, _) in enumerate(batches(windows, batch_size)):
            paths.append(out / f"batch-{b:06d}.safetensors")
            save_file({"log_probs": log_probs(model, ids).cpu().contiguous()}, str(paths[-1]))
    return paths


def _load_log_probs(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["log_probs"]


def _release() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
