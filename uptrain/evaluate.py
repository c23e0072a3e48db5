"""`uptrain eval`: quality against the source, KV cache (formula and measured), decode speed, tasks.

Perplexity: the held-out text is one token stream (documents with EOS between them, as in
training) scored in windows of `window` tokens that start every `stride` tokens; each token is
scored once, in the window where it has the most context (the standard strided evaluation). With
`--config RUN.yaml` the run's own held-out blocks are scored instead, each on its own, which
reproduces the run's validation loss. With `--reference`, both models see the same windows and
the per-token KL(reference ‖ model) and top-1 agreement are averaged over the same tokens.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from uptrain import __version__
from uptrain import config as configlib
from uptrain.errors import UptrainError
from uptrain.plan import model_from_config
from uptrain.report import SCHEMA_VERSION, DataInfo, Decode, EvalResult, KVCache, ModelInfo, Quality
from uptrain.train_config import DataConfig, TrainConfig

Window = tuple[torch.Tensor, int]  # (token ids (L,), first position scored in it)


def load_model(path: str, dtype: str, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uptrain.hub import looks_like_repo_id

    if not Path(path).exists() and not looks_like_repo_id(path):
        raise UptrainError(f"{path}: no such model folder (and not a Hub repo id like org/name)")
    torch_dtype = (
        (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UptrainError(f"cannot load {path}: {str(e).splitlines()[0]}") from e
    return model, tokenizer


def model_info(path: str, model: Any) -> ModelInfo:
    cfg = model.config
    heads = cfg.num_attention_heads
    return ModelInfo(
        path=path,
        model_type=cfg.model_type,
        layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        parameters=model.num_parameters(),
        dtype=str(model.dtype).removeprefix("torch."),
    )


# --- the text ----------------------------------------------------------------------------------


def token_stream(cfg: DataConfig, tokenizer: Any, max_tokens: int) -> tuple[torch.Tensor, str]:
    """Documents -> one stream of at most max_tokens tokens (EOS after each document)."""
    from uptrain.data import load_documents

    docs = load_documents(cfg, validation=bool(cfg.validation_split or cfg.validation_files))
    if docs is None:
        raise UptrainError("no evaluation text: give --data.files=..., --data.dataset=... or --config RUN.yaml")
    eos, stream, batch = tokenizer.eos_token_id, [], []
    for doc in docs:
        batch.append(doc[cfg.text_column])
        if len(batch) == 256:
            stream += [t for ids in tokenizer(batch)["input_ids"] for t in (*ids, eos)]
            batch = []
            if len(stream) >= max_tokens:
                break
    if batch and len(stream) < max_tokens:
        stream += [t for ids in tokenizer(batch)["input_ids"] for t in (*ids, eos)]
    source = f"Hub dataset {cfg.dataset}" + (f" ({cfg.name})" if cfg.name else "") if cfg.dataset else "files"
    split = cfg.validation_split or cfg.split if cfg.dataset else ", ".join(cfg.validation_files or cfg.files)
    return torch.tensor(stream[:max_tokens], dtype=torch.long), f"{source}: {split}"


def strided(tokens: torch.Tensor, window: int, stride: int) -> list[Window]:
    """Windows over a stream; every token but the first is scored exactly once (if stride < window)."""
    n, out, prev_end = len(tokens), [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((tokens[begin:end], first - begin))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def score(model: Any, windows: list[Window], batch_size: int, reference: Any = None) -> dict[str, float]:
    """Sum of NLL (and of the reference's NLL, KL and agreement) over the scored positions."""
    device = next(model.parameters()).device
    totals = dict.fromkeys(("nll", "ref_nll", "kl", "agree", "count"), 0.0)
    by_length: dict[int, list[Window]] = {}
    for w in windows:
        by_length.setdefault(len(w[0]), []).append(w)
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            ids = torch.stack([w[0] for w in chunk]).to(device)  # (B, L)
            mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
            for i, (_, first) in enumerate(chunk):
                mask[i, first - 1 :] = True  # logits at p-1 predict token p, for p >= first
            target = ids[:, 1:]
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)  # (B, L-1, V)
            totals["nll"] -= logp.gather(-1, target[..., None]).squeeze(-1)[mask].sum().item()
            totals["count"] += mask.sum().item()
            if reference is not None:
                ref = torch.log_softmax(reference(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
                totals["ref_nll"] -= ref.gather(-1, target[..., None]).squeeze(-1)[mask].sum().item()
                totals["kl"] += (ref.exp() * (ref - logp)).sum(-1)[mask].sum().item()
                totals["agree"] += (ref.argmax(-1) == logp.argmax(-1))[mask].sum().item()
    return totals


def quality(totals: dict[str, float], with_reference: bool) -> Quality:
    import math

    n = totals["count"]
    nll = totals["nll"] / n
    q = Quality(perplexity=math.exp(nll), nll=nll)
    if with_reference:
        q.reference_nll = totals["ref_nll"] / n
        q.reference_perplexity = math.exp(q.reference_nll)
        q.kl = totals["kl"] / n
        q.top1_agreement = totals["agree"] / n
    return q


# --- cache and speed ---------------------------------------------------------------------------


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")


def _peak(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "process_rss"
    except OSError:
        pass
    return None, "process_rss"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy(model: Any, ids: torch.Tensor, new_tokens: int, cache: Any, step: Any) -> tuple[Any, float, float]:
    """Prefill, then new_tokens - 1 greedy decode steps; returns the cache and both times (seconds).
    A plain loop, not `generate`: no per-step host syncs, so the time is the model's."""
    device, prompt = ids.device, ids.shape[1]
    if cache is not None:
        cache.reset()  # a static cache is reused (its tensors are the CUDA graphs' inputs)
    _sync(device)
    start = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt, device=device),
                logits_to_keep=1)  # fmt: skip
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (B, 1)
    _sync(device)
    prefill = time.perf_counter() - start
    for i in range(new_tokens - 1):
        pos = torch.tensor([prompt + i], device=device)
        nxt = step(nxt, past_key_values=cache, use_cache=True, cache_position=pos).logits[:, -1:].argmax(-1)
    _sync(device)
    return cache, prefill, time.perf_counter() - start - prefill


@torch.no_grad()
def generation(
    model: Any, prompt_tokens: int, new_tokens: int, batch: int, static: bool = False
) -> tuple[KVCache, Decode]:
    """Decode greedily after a random prompt: measure the cache it holds, and the decode speed.

    static: a preallocated StaticCache and the decode step compiled with CUDA graphs, as a serving
    stack runs it (on a GPU; the first, warm-up pass compiles)."""
    device = next(model.parameters()).device
    cfg = model.config
    ids = torch.randint(4, cfg.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    if static:
        from transformers import StaticCache

        cache = StaticCache(config=cfg, max_cache_len=prompt_tokens + new_tokens)
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        _greedy(model, ids, new_tokens, cache, step)  # warm-up: compile, record the graphs
    else:
        cache, step = None, model.forward
        _greedy(model, ids, 2, None, step)  # warm-up
    _reset_peak(device)
    cache, prefill, decode_time = _greedy(model, ids, new_tokens, cache, step)
    peak, kind = _peak(device)
    measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    spec = model_from_config(cfg, "eval", params=1)
    cached = prompt_tokens + new_tokens - (0 if static else 1)  # the last generated token is not fed back
    itemsize = model.dtype.itemsize
    formula = spec.kv_bytes(spec.kv_heads, cached, batch, itemsize)
    kv = KVCache(spec.kv_bytes_per_token(itemsize=itemsize), batch, cached, formula, measured, formula == measured)
    speed = batch * (new_tokens - 1) / max(decode_time, 1e-9)
    return kv, Decode(prompt_tokens, new_tokens, batch, prefill, speed, peak, kind)


# --- lm-evaluation-harness -----------------------------------------------------------------------


def run_tasks(
    model: Any, tokenizer: Any, tasks: str, limit: int | None, include: str | None, batch_size: int
) -> dict[str, dict[str, float]]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UptrainError("--tasks needs lm-evaluation-harness: pip install 'uptrain[eval]'") from e
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # indexing every built-in task takes a while
        manager = TaskManager(include_path=include)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UptrainError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager)
    except ConnectionError as e:
        raise UptrainError(
            f"the data of the lm-eval tasks cannot be reached ({str(e).splitlines()[0]}); run where the Hugging "
            "Face Hub is reachable, or with HF_DATASETS_CACHE pointing at a cache that holds it"
        ) from e

    def is_metric(key: str, value: Any) -> bool:
        return isinstance(value, (int, float)) and "stderr" not in key and not key.startswith("sample_len")

    return {
        task: {k.split(",")[0]: float(v) for k, v in metrics.items() if is_metric(k, v)}
        for task, metrics in results["results"].items()
    }


# --- the command -------------------------------------------------------------------------------


def _data_config(config: str | None, overrides: list[str]) -> tuple[DataConfig | None, TrainConfig | None]:
    parsed = configlib.parse_overrides(overrides)
    bad = [k for k in parsed if not k.startswith("data.")]
    if bad:
        raise UptrainError(f"unknown option(s) {', '.join('--' + k for k in bad)}; eval takes --data.* settings")
    if config is not None:
        run = configlib.load(TrainConfig, config, parsed)
        return run.data, run
    if not parsed:
        return None, None
    data = {k.removeprefix("data."): v for k, v in parsed.items()}
    return configlib.from_dict(DataConfig, data, "data"), None


def evaluate(
    model: str | None = None,
    *,
    reference: str | None = None,
    config: str | None = None,
    compare: list[str] | None = None,
    json: str | None = None,
    max_tokens: int = 100_000,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 2,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    decode_batch: int = 1,
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    no_speed: bool = False,
    tasks: str | None = None,
    tasks_limit: int | None = None,
    tasks_include: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a (converted) model: perplexity, KL and agreement with its source, KV cache, decode speed.

    Held-out text comes as in `uptrain train` (--data.files=..., --data.dataset=... --data.split=...),
    or --config RUN.yaml scores a training run's held-out blocks. The KV cache is computed from the
    config and measured from the cache transformers holds after generation; decode speed is measured
    on the current device (a GPU if present, synchronised, after a warm-up). A table goes to stdout;
    --json FILE writes the result (schema in uptrain/report.py); --compare A.json B.json ... prints
    saved results side by side.

    Args:
        model: Model folder or Hub id to evaluate.
        reference: The source model (e.g. the MHA checkpoint) to compare with on the same tokens.
        config: A `uptrain train` config: score its run's held-out validation blocks.
        compare: Saved --json results to print side by side (no evaluation).
        json: Write the result as JSON to this file.
        max_tokens: Tokens of held-out text to score at most.
        window: Context per scoring window (default: data.seq_len, capped at the model's maximum).
        stride: Tokens between windows (default: window / 2).
        batch_size: Windows per forward pass.
        prompt_tokens: Prompt length for the cache and speed measurement.
        new_tokens: Tokens to generate for the cache and speed measurement.
        decode_batch: Sequences generated at once for the cache and speed measurement.
        dtype: dtype to evaluate in (auto: bfloat16 on GPU, float32 on CPU).
        no_speed: Skip the generation (cache and decode speed) measurement.
        tasks: lm-evaluation-harness tasks, e.g. hellaswag,arc_easy (pip install 'uptrain[eval]').
        tasks_limit: Examples per task at most (quick checks).
        tasks_include: A folder of extra lm-eval task definitions.
        overrides: --data.key=value settings for the held-out text.
    """
    from uptrain.report import print_compare, print_result

    if compare:
        print_compare(compare)
        return {"compare": compare}
    if model is None:
        raise UptrainError("give MODEL to evaluate (or --compare A.json B.json ...)")
    if not no_speed and (new_tokens < 2 or prompt_tokens < 1):
        raise UptrainError("decode speed needs --prompt-tokens >= 1 and --new-tokens >= 2 (or pass --no-speed)")
    data_cfg, run = _data_config(config, overrides or [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    if data_cfg is not None:
        windows, result.data = _windows(data_cfg, run, config, tokenizer, net, max_tokens, window, stride)
        result.quality = quality(score(net, windows, batch_size, ref), ref is not None)
    if not no_speed:
        for name, m in (("model", net), ("reference", ref)):
            if m is not None:
                result.kv_cache[name], result.decode[name] = generation(m, prompt_tokens, new_tokens, decode_batch)
    if tasks:
        result.tasks = run_tasks(net, tokenizer, tasks, tasks_limit, tasks_include, batch_size)
    out = asdict(result)
    print_result(out)
    if json:
        Path(json).parent.mkdir(parents=True, exist_ok=True)
        Path(json).write_text(jsonlib.dumps(out, indent=2) + "\n")
    return out


def _windows(
    cfg: DataConfig, run: TrainConfig | None, config: str | None, tokenizer: Any, model: Any, max_tokens: int,
    window: int | None, stride: int | None,
) -> tuple[list[Window], DataInfo]:  # fmt: skip
    if run is not None:  # the run's held-out blocks, as its validation loss saw them
        from uptrain.data import prepare

        blocks = prepare(cfg, tokenizer, seed=run.seed, micro_batch_size=1).validation_batches(1)
        windows = [(b[0], 1) for b in blocks]
        tokens = sum(len(w) - 1 for w, _ in windows)
        info = DataInfo(f"held-out blocks of {config}", "blocks", tokens, len(windows), cfg.seq_len, cfg.seq_len)
        return windows, info
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.seq_len
    window = window or min(cfg.seq_len, limit)
    if window > limit:
        raise UptrainError(f"--window {window} is above the model's max_position_embeddings {limit}")
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise UptrainError(f"--stride must be between 1 and the window ({window}), got {stride}")
    stream, source = token_stream(cfg, tokenizer, max_tokens)
    if len(stream) < 2:
        raise UptrainError("the evaluation text holds fewer than 2 tokens")
    windows = strided(stream, window, stride)
    tokens = sum(len(w) - first for w, first in windows)
    return windows, DataInfo(source, "strided", tokens, len(windows), window, stride)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import os

    return f"cpu ({os.cpu_count()} cores)"
