"""Attention layouts of the supported model families, as data.

Each family is one `Architecture` record: where a layer's attention tensors live
(key templates), how Q/K/V rows are laid out when fused, how the key-side norm
depends on the number of key/value heads, and how RoPE pairs a head's dims. The
converter, the calibration and the inspector read these records; no code path
branches on a model name. How big a model is lives in `uptrain_gqa.model.shape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from uptrain_gqa.errors import UptrainError

QKVLayout = Literal["separate", "stacked"]
RotaryPairs = Literal["half", "interleaved"]
NormLayout = Literal["shared", "flat", "rows", "modules"]


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its attention tensors."""

    attention: str = "model.layers.{layer}.self_attn"
    """Prefix of one layer's attention module; `{layer}` is the layer index."""
    q_proj: str = "q_proj"
    """Query projection, relative to `attention`."""
    k_proj: str = "k_proj"
    """Key projection: rows are KV heads × head_dim."""
    v_proj: str = "v_proj"
    """Value projection: rows are KV heads × head_dim."""
    o_proj: str = "o_proj"
    """Output projection: columns are query heads × head_dim."""
    qkv_proj: str | None = None
    """Fused projection that replaces q/k/v_proj when set."""
    qkv_layout: QKVLayout = "separate"
    """'separate': q/k/v_proj. 'stacked': fused rows [Q; K; V]."""
    k_norm: str | None = None
    """Norm applied to keys (relative to `attention`); `{head}` marks one module per KV head."""
    k_norm_layout: NormLayout = "shared"
    """'shared': (head_dim,) used by every head, unchanged. 'flat': (KV·head_dim,) over the whole
    projection. 'rows': (KV, head_dim). 'modules': one (head_dim,) module per KV head."""
    kv_heads_field: str = "num_key_value_heads"
    """config.json field holding the KV-head count (aliases come from the config class)."""
    rotary_pairs: RotaryPairs = "half"
    """Dims the rotary embedding turns together: 'half' (j, j + rotary_dim/2), transformers'
    rotate_half; 'interleaved' (2j, 2j+1)."""

    def module(self, name: str, layer: int, head: int | None = None) -> str:
        """Full tensor-name prefix of an attention sub-module, e.g. `model.layers.3.self_attn.k_proj`."""
        prefix = self.attention.format(layer=layer)
        return f"{prefix}.{name.format(head=head) if head is not None else name}"


_LLAMA = Architecture()
_SHARED_QK_NORM = Architecture(k_norm="k_norm", k_norm_layout="shared")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": _LLAMA,
    "starcoder2": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "olmo": _LLAMA,
    "qwen3": _SHARED_QK_NORM,
    "gemma3_text": _SHARED_QK_NORM,
    "olmo2": Architecture(k_norm="k_norm", k_norm_layout="flat"),
    "cohere": Architecture(k_norm="k_norm", k_norm_layout="rows", rotary_pairs="interleaved"),
    "stablelm": Architecture(k_norm="k_layernorm.norms.{head}", k_norm_layout="modules"),
    "phi": Architecture(o_proj="dense", k_norm="k_layernorm", k_norm_layout="shared"),
    "phi3": Architecture(qkv_proj="qkv_proj", qkv_layout="stacked"),
}

# Families whose transformers implementation cannot run with fewer KV heads (no KV-head
# setting), or would not cache fewer: converting them would give an unusable or useless folder.
UNSUPPORTED: dict[str, str] = {
    "gpt2": "GPT-2 attention has one head count (n_head) and no key/value-head setting",
    "gpt_neox": "GPT-NeoX attention has no key/value-head setting (fused query_key_value, MHA only)",
    "gptj": "GPT-J attention has no key/value-head setting (MHA only)",
    "opt": "OPT attention has no key/value-head setting (MHA only)",
    "gpt_bigcode": "GPTBigCode supports MHA or MQA (multi_query) only, no key/value-head count",
    "falcon": (
        "Falcon's original decoder has MHA or MQA only (multi_query), and its new decoder broadcasts "
        "K/V to every query head before caching, so fewer KV heads would not shrink its cache"
    ),
}


def supported_families() -> list[str]:
    return sorted(ARCHITECTURES)


def lookup(config: dict[str, Any]) -> Architecture:
    """The record for a config.json's `model_type`, or a clear refusal."""
    model_type = config.get("model_type")
    if not model_type:
        raise UptrainError("config.json has no `model_type`; is this a Hugging Face transformers checkpoint?")
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "unknown")
        raise UptrainError(
            f"this checkpoint is quantized ({method}); heads cannot be pooled in quantized form — "
            "convert the unquantized model and quantize afterwards"
        )
    if model_type in UNSUPPORTED:
        raise UptrainError(
            f"model_type '{model_type}' cannot be converted: {UNSUPPORTED[model_type]}, so transformers "
            f"could not load a grouped-query version (supported: {', '.join(supported_families())})"
        )
    if model_type not in ARCHITECTURES:
        raise UptrainError(f"model_type '{model_type}' is not supported (supported: {', '.join(supported_families())})")
    return ARCHITECTURES[model_type]


def kv_heads_keys(config: dict[str, Any], arch: Architecture) -> list[str]:
    """The config.json keys that hold the KV-head count: the canonical field and any alias
    the config class maps to it (e.g. Falcon's `n_head_kv`) that the file actually uses."""
    from transformers import CONFIG_MAPPING

    aliases = getattr(CONFIG_MAPPING[config["model_type"]], "attribute_map", {})
    names = [arch.kv_heads_field] + [k for k, v in aliases.items() if v == arch.kv_heads_field]
    present = [k for k in names if k in config]
    return present or [arch.kv_heads_field]
