"""One model evaluated: held-out quality against its reference, KV cache, decode speed, lm-eval tasks.

The model (and its reference) are loaded on the current device; the result follows the schema in
result.py (docs/eval-schema.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uptrain.data.blocks import prepare
from uptrain.data.config import DataConfig
from uptrain.data.documents import token_stream
from uptrain.device import compute_device, device_name, inference_dtype
from uptrain.errors import UptrainError, first_line
from uptrain.evaluation.attention import register as register_attention
from uptrain.evaluation.generation import generation
from uptrain.evaluation.quality import Window, quality, score, strided
from uptrain.evaluation.result import SCHEMA_VERSION, DataInfo, EvalResult, ModelInfo
from uptrain.evaluation.tasks import run_tasks
from uptrain.io.hub import looks_like_repo_id
from uptrain.model.shape import ModelShape
from uptrain.version import __version__


@dataclass(frozen=True)
class HeldOutText:
    """The text to score: `data` as one strided stream, or, with `run_config`, that training run's own
    held-out blocks (its validation set, selected with its `seed`)."""

    data: DataConfig
    run_config: str | None = None
    seed: int = 0


FEW_TOKENS = 1000
"""Below this many scored tokens, eval warns that perplexity and KL are too noisy to compare."""


def load_model(path: str, dtype: str, device: torch.device) -> tuple[Any, Any]:
    """A model in eval mode on `device` (dtype 'auto': bfloat16 on GPUs, float32 on CPUs), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).exists()
    if not local and not looks_like_repo_id(path):
        raise UptrainError(f"{path}: no such model folder (and not a Hub repo id like org/name)")
    try:
        kwargs = {"dtype": inference_dtype(device, dtype)}
        try:  # decode that reads shared K/V heads once (see uptrain.evaluation.attention)
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register_attention(), **kwargs)
        except ValueError as e:  # a family without transformers' attention interface: its default attention
            if "attn_implementation" not in str(e) and "attention" not in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model = model.to(device).eval()
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


def text_windows(
    text: HeldOutText, tokenizer: Any, model: Any, max_tokens: int, window: int | None, stride: int | None
) -> tuple[list[Window], DataInfo]:
    """The windows to score, and what they are."""
    cfg = text.data
    if text.run_config is not None:  # the run's held-out blocks, as its validation loss saw them
        blocks = prepare(cfg, tokenizer, seed=text.seed, micro_batch_size=1).validation_batches(1)
        windows = [(b[0], 1) for b in blocks]
        tokens = sum(len(w) - 1 for w, _ in windows)
        source = f"held-out blocks of {text.run_config}"
        return windows, DataInfo(source, "blocks", tokens, len(windows), cfg.seq_len, cfg.seq_len)
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.seq_len
    window = window if window is not None else min(cfg.seq_len, limit)
    if window > limit:
        raise UptrainError(f"--window {window} is above the model's max_position_embeddings {limit}")
    stride = stride if stride is not None else max(1, window // 2)
    if not 0 < stride <= window:
        raise UptrainError(f"--stride must be between 1 and the window ({window}), got {stride}")
    stream, source = token_stream(cfg, tokenizer, max_tokens)
    if len(stream) < 2:
        raise UptrainError("the evaluation text holds fewer than 2 tokens")
    windows = strided(stream, window, stride)
    tokens = sum(len(w) - first for w, first in windows)
    if tokens < FEW_TOKENS:
        print(
            f"uptrain eval: warning: only {tokens:,} held-out tokens are scored; a perplexity over so few "
            f"is noise (give at least {FEW_TOKENS:,})",
            file=sys.stderr,
        )
    return windows, DataInfo(source, "strided", tokens, len(windows), window, stride)


def evaluate_model(
    model: str,
    *,
    reference: str | None = None,
    text: HeldOutText | None = None,
    max_tokens: int = 100_000,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 2,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    decode_batch: int = 1,
    dtype: str = "auto",
    speed: bool = True,
    tasks: str | None = None,
    tasks_limit: int | None = None,
    tasks_include: str | None = None,
    num_fewshot: int | None = None,
    tasks_batch_size: int | None = None,
    chat_template: bool = False,
    log_samples: str | None = None,
) -> EvalResult:
    """Everything `uptrain eval` measures (see its --help), as an EvalResult."""
    device = compute_device()
    net, tokenizer = load_model(model, dtype, device)
    ref = ref_tok = None
    if reference:
        ref, ref_tok = load_model(reference, dtype, device)
        if ref_tok.get_vocab() != tokenizer.get_vocab() or ref.config.vocab_size != net.config.vocab_size:
            raise UptrainError(
                f"{model} and {reference} use different tokenizers; KL and agreement need the same vocabulary"
            )
    result = EvalResult(SCHEMA_VERSION, __version__, device_name(device), model_info(model, net))
    if ref is not None:
        result.reference = model_info(reference or "", ref)
    if text is not None:
        windows, result.data = text_windows(text, tokenizer, net, max_tokens, window, stride)
        result.quality = quality(score(net, windows, batch_size, ref), ref is not None)
    if speed:
        for name, m in (("model", net), ("reference", ref)):
            if m is not None:
                result.kv_cache[name], result.decode[name] = generation(m, prompt_tokens, new_tokens, decode_batch)
    if tasks:
        result.tasks, result.task_settings = run_tasks(
            net,
            tokenizer,
            tasks,
            tasks_limit,
            tasks_include,
            tasks_batch_size or batch_size,
            num_fewshot=num_fewshot,
            chat_template=chat_template,
            log_samples=Path(log_samples) if log_samples else None,
        )
    return result
