"""Tiny models of every supported family, and this test suite's own view of their K/V layouts.

The layouts here are written from the transformers modelling code, independently of
uptrain's registry (uptrain_gqa.model.families), so the tests check the registry instead of
repeating it. The models themselves come from uptrain_gqa.synthetic, the factory the benchmarks share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel

from uptrain_gqa.synthetic import random_model, tiny_config


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    groups: int
    """G, the KV heads to convert to."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    layout: str = "separate"
    """separate: k_proj/v_proj · stacked: fused rows [Q; K; V]."""
    k_norm: str | None = None
    """None/shared (no change) · flat (KV·d,) · rows (KV, d) · modules (one module per head)."""
    rewritten: str = r"\.(k_proj|v_proj)\."
    """Tensor names the conversion may rewrite; every other tensor must come out byte-identical."""

    def config(self):
        return tiny_config(self.model_type, **self.kwargs)


CASES = [
    Case("llama", "llama", 2),
    Case("llama-gqa4-to-mqa", "llama", 1, {"num_key_value_heads": 4}),
    Case("mistral", "mistral", 4, {"sliding_window": 16}),
    Case("mixtral", "mixtral", 2, {"num_local_experts": 2, "num_experts_per_tok": 2}),
    Case("qwen2", "qwen2", 2),
    Case("qwen3-mqa", "qwen3", 1, {"head_dim": 16}),
    Case("gemma-headdim", "gemma", 2, {"head_dim": 16}),
    Case("gemma2", "gemma2", 2, {"head_dim": 16, "sliding_window": 16}),
    Case("gemma3_text", "gemma3_text", 2, {"head_dim": 16, "sliding_window": 16}),
    Case("olmo", "olmo", 2),
    Case("olmo2", "olmo2", 2, k_norm="flat", rewritten=r"\.(k_proj|v_proj|k_norm)\."),
    Case("cohere", "cohere", 2, {"use_qk_norm": True}, k_norm="rows", rewritten=r"\.(k_proj|v_proj|k_norm)\."),
    Case(
        "stablelm",
        "stablelm",
        2,
        {"qk_layernorm": True, "use_qkv_bias": True},
        k_norm="modules",
        rewritten=r"\.(k_proj|v_proj|k_layernorm\.norms\.\d+)\.",
    ),
    Case("phi", "phi", 2, {"qk_layernorm": True}),
    Case("phi3", "phi3", 2, layout="stacked", rewritten=r"\.qkv_proj\."),
    Case("starcoder2-gqa4", "starcoder2", 2, {"num_key_value_heads": 4}),
]


def build(case: Case, seed: int = 0) -> PreTrainedModel:
    """A random tiny model of the case, norm weights and biases randomised too."""
    return random_model(case.config(), seed)


def load(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def attention(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].self_attn


def kv_views(model: PreTrainedModel, case: Case, layer: int) -> dict[str, torch.Tensor]:
    """In-place views (KV, d, ...) of one layer's per-KV-head tensors, keyed by role."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn = attention(model, layer)
    views: dict[str, torch.Tensor] = {}
    if case.layout == "separate":
        for role, proj in (("k", attn.k_proj), ("v", attn.v_proj)):
            views[f"{role}.weight"] = proj.weight.data.unflatten(0, (kv, d))
            if proj.bias is not None:
                views[f"{role}.bias"] = proj.bias.data.unflatten(0, (kv, d))
    else:
        w = attn.qkv_proj.weight.data
        views["k.weight"] = w[heads * d : (heads + kv) * d].unflatten(0, (kv, d))
        views["v.weight"] = w[(heads + kv) * d :].unflatten(0, (kv, d))
    if case.k_norm == "flat":
        views["k_norm"] = attn.k_norm.weight.data.unflatten(0, (kv, d))
    elif case.k_norm == "rows":
        views["k_norm"] = attn.k_norm.weight.data
    elif case.k_norm == "modules":
        views["k_norm"] = torch.stack([m.weight.data for m in attn.k_layernorm.norms])  # a copy, see below
    return views


def make_heads_identical(model: PreTrainedModel, case: Case) -> None:
    """Within each group of KV heads, copy the group's first head into the others."""
    for layer in range(model.config.num_hidden_layers):
        for role, view in kv_views(model, case, layer).items():
            grouped = view.unflatten(0, (case.groups, -1))
            grouped[:, 1:] = grouped[:, :1]
            if role == "k_norm" and case.k_norm == "modules":  # stacked copy: write back
                for h, m in enumerate(attention(model, layer).k_layernorm.norms):
                    m.weight.data.copy_(view[h])


def mean_pool(view: torch.Tensor, groups: int) -> torch.Tensor:
    """The paper's initialisation: average the heads of each consecutive group."""
    return view.float().unflatten(0, (groups, -1)).mean(dim=1)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint, as stored (sharded or not)."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                out[name] = f.get_tensor(name)
    return out
