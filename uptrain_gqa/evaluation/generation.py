"""The KV cache a model holds while generating (formula and measurement), and its decode speed.

Decoding is timed with a plain greedy loop (not `generate`, whose per-step host syncs would be
timed too): prefill, then one token per step, synchronised on GPUs, after a warm-up pass.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.device import input_device
from uptrain_gqa.evaluation.result import Decode, KVCache
from uptrain_gqa.model.shape import ModelShape


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


def cache_keyword(model: Any) -> str:
    """The name under which `model`'s forward takes a KV cache: transformers renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40), while earlier 5.x releases know only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, as `cache` or (earlier transformers) `past_key_values`; reading the
    old name where the new one exists warns."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _greedy(model: Any, ids: torch.Tensor, new_tokens: int, cache: Any, step: Any) -> tuple[Any, float, float]:
    """Prefill, then new_tokens - 1 greedy decode steps; returns the cache and both times (seconds).
    A plain loop, not `generate`: no per-step host syncs, so the time is the model's."""
    device, prompt, keyword = ids.device, ids.shape[1], cache_keyword(model)
    if cache is not None:
        cache.reset()  # a static cache is reused (its tensors are the CUDA graphs' inputs)
    _sync(device)
    start = time.perf_counter()
    out = model(ids, **{keyword: cache}, use_cache=True, cache_position=torch.arange(prompt, device=device),
                logits_to_keep=1)  # fmt: skip
    cache, nxt = returned_cache(out), out.logits[:, -1:].argmax(-1)  # (B, 1)
    _sync(device)
    prefill = time.perf_counter() - start
    for i in range(new_tokens - 1):
        pos = torch.tensor([prompt + i], device=device)
        nxt = step(nxt, **{keyword: cache}, use_cache=True, cache_position=pos).logits[:, -1:].argmax(-1)
    _sync(device)
    return cache, prefill, time.perf_counter() - start - prefill


@torch.no_grad()
def generation(
    model: Any, prompt_tokens: int, new_tokens: int, batch: int, static: bool = False
) -> tuple[KVCache, Decode]:
    """Decode greedily after a random prompt: measure the cache it holds, and the decode speed.

    static: a preallocated StaticCache and the decode step compiled with CUDA graphs, as a serving
    stack runs it (on a GPU; the first, warm-up pass compiles)."""
    device = input_device(model)  # with --device-map, where the embedding runs
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
    shape = ModelShape.from_config(cfg)
    cached = prompt_tokens + new_tokens - (0 if static else 1)  # the last generated token is not fed back
    itemsize = model.dtype.itemsize
    formula = shape.kv_bytes(cached, batch=batch, itemsize=itemsize)
    kv = KVCache(shape.kv_bytes_per_token(itemsize), batch, cached, formula, measured, formula == measured)
    speed = batch * (new_tokens - 1) / max(decode_time, 1e-9)
    return kv, Decode(prompt_tokens, new_tokens, batch, prefill, speed, peak, kind)
