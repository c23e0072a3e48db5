"""Decode that reads each shared K/V head once: an sdpa attention for GQA models, registered with
transformers' attention interface as `uptrain_sdpa`.

Decoding one token reads the whole KV cache; GQA's point is that the cache, and so the bytes read
per step, shrink H/G times. transformers' sdpa path repeats K/V to H heads (`repeat_kv`) whenever
it cannot pass `enable_gqa` — with a mask, and always under torch.compile (the static-cache,
CUDA-graph decode a serving stack runs) — so the measured decode speed would not show the gain.
Here a single query token's H heads are folded into G groups of H/G query rows, (B, H, 1, d) ->
(B, G, H/G, d): one SDPA call per layer against the G cached heads as they are, with the same mask
(it is shared by all heads). Prefill and training go through transformers' own sdpa unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "uptrain_sdpa"
"""The attn_implementation that eval and benchmarks/decode.py load models with."""


def gqa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, q, d), key/value (B, G, k, d) -> (B, q, H, d)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    groups = key.shape[1]
    plain = q_len != 1 or groups == heads or kwargs.get("position_bias") is not None or kwargs.get("softcap")
    if plain or (attention_mask is not None and attention_mask.shape[1] != 1):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    folded = query.reshape(batch, groups, heads // groups, dim)  # (B, G, H/G, d): a group's heads as query rows
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )  # (B, G, H/G, d_v); the (B, 1, 1, k) mask broadcasts over the rows
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `attn_implementation="uptrain_sdpa"` available to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as sdpa
    return NAME
