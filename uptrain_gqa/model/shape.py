"""How big a decoder is, and what its KV cache costs: one type, built once from a config.

KV cache of one request at T tokens = Σ over layers 2 (K and V) · G · head_dim · bytes · cached(T),
where cached(T) = T on full-attention layers and min(T, window − 1) on sliding-window layers (what
transformers' cache keeps). Query head h reads KV head h // (H/G), as transformers' `repeat_kv`
expands them, so each merged KV head serves a contiguous run of H/G query heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uptrain_gqa.errors import UptrainError, first_line


def attention_kind(heads: int, kv_heads: int) -> str:
    """'MHA', 'GQA-G' or 'MQA'."""
    if kv_heads == heads:
        return "MHA"
    return "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


@dataclass(frozen=True)
class ModelShape:
    """The facts that decide a decoder's memory and its K/V head layout."""

    layers: int
    """Decoder layers."""
    hidden: int
    """Hidden size (the width of each layer's input)."""
    heads: int
    """H, query heads per layer."""
    kv_heads: int
    """Key/value heads per layer (H for MHA, 1 for MQA)."""
    head_dim: int
    """Dimension of each head."""
    rotary_dim: int = 0
    """Leading dims of each head turned by the rotary embedding (0 = head_dim, unless partial)."""
    windows: tuple[int | None, ...] = ()
    """Per layer: the sliding window, or None for full attention (empty: every layer is full)."""
    params: int | None = None
    """Parameters at today's KV-head count (None where nobody counted them)."""
    model_type: str = ""
    """transformers model_type, when the shape comes from a config."""

    def __post_init__(self) -> None:
        if not self.rotary_dim:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        for name in ("layers", "heads", "kv_heads", "head_dim", "hidden", "params"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UptrainError(f"{name} must be positive, got {value}")
        if self.heads % self.kv_heads:
            raise UptrainError(f"{self.kv_heads} KV heads do not divide {self.heads} attention heads")

    @classmethod
    def from_config(
        cls, config: Any, params: int | None = None, kv_heads_field: str = "num_key_value_heads"
    ) -> ModelShape:
        """The shape of a transformers config (the family's own defaults and aliases applied)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        try:
            return cls(
                layers=config.num_hidden_layers,
                hidden=config.hidden_size,
                heads=heads,
                kv_heads=getattr(config, kv_heads_field, None) or heads,
                head_dim=head_dim,
                rotary_dim=int(head_dim * factor) // 2 * 2,
                windows=layer_windows(config),
                params=params,
                model_type=config.model_type,
            )
        except UptrainError as e:
            raise UptrainError(f"the model config is inconsistent: {e}") from None

    # --- the KV cache --------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return attention_kind(self.heads, self.kv_heads)

    def kv_bytes_per_token(self, itemsize: float, *, kv_heads: int | None = None) -> int:
        """KV-cache bytes one token occupies on full-attention layers: 2 · layers · G · head_dim · bytes."""
        g = self.kv_heads if kv_heads is None else kv_heads
        return int(2 * self.layers * g * self.head_dim * itemsize)

    def cached_tokens(self, tokens: int) -> list[int]:
        """Per layer, the tokens the cache holds after `tokens` tokens (window − 1 on sliding layers)."""
        windows = self.windows or (None,) * self.layers
        return [tokens if w is None else min(tokens, w - 1) for w in windows]

    def kv_bytes(self, tokens: int, *, batch: int = 1, itemsize: float = 2, kv_heads: int | None = None) -> int:
        """Bytes of K and V cached for `batch` requests of `tokens` tokens with G KV heads."""
        g = self.kv_heads if kv_heads is None else kv_heads
        per_token_layer = 2 * g * self.head_dim * itemsize
        return int(sum(per_token_layer * t for t in self.cached_tokens(tokens)) * batch)

    def params_at(self, kv_heads: int) -> int:
        """Parameters after converting to G KV heads: each merged head removes 2 · head_dim · hidden per layer."""
        if self.params is None:
            raise UptrainError("the parameter count of this model is unknown")
        return self.params - 2 * self.layers * (self.kv_heads - kv_heads) * self.head_dim * self.hidden

    # --- merging heads -------------------------------------------------------------------------

    @property
    def queries_per_kv_head(self) -> int:
        """t = H / KV: the query heads that read each KV head today."""
        return self.heads // self.kv_heads

    def group_size(self, kv_heads: int) -> int:
        """r = KV / G: the source KV heads that become one when converting to G."""
        return self.kv_heads // kv_heads

    def valid_num_kv_heads(self) -> list[int]:
        """Every G the converter accepts: proper divisors of the current KV-head count."""
        return [g for g in range(1, self.kv_heads) if self.kv_heads % g == 0]

    def check_target(self, num_kv_heads: int) -> None:
        valid = self.valid_num_kv_heads()
        choices = ", ".join(map(str, valid)) if valid else "none: the source is already MQA"
        if num_kv_heads < 1:
            raise UptrainError(f"--num-kv-heads must be at least 1, got {num_kv_heads} (valid: {choices})")
        if num_kv_heads >= self.kv_heads:
            raise UptrainError(
                f"--num-kv-heads {num_kv_heads} is not below the source's {self.kv_heads} KV heads, "
                f"so there is nothing to merge (valid: {choices})"
            )
        if self.kv_heads % num_kv_heads:
            raise UptrainError(
                f"--num-kv-heads {num_kv_heads} does not divide the source's {self.kv_heads} KV heads "
                f"(valid: {choices})"
            )

    def group_map(self, num_kv_heads: int) -> list[dict[str, Any]]:
        """Which source KV heads and query heads each new KV head serves (repeat_kv)."""
        src_per_group = self.group_size(num_kv_heads)
        q_per_group = self.heads // num_kv_heads
        return [
            {
                "kv_head": g,
                "source_kv_heads": list(range(g * src_per_group, (g + 1) * src_per_group)),
                "query_heads": list(range(g * q_per_group, (g + 1) * q_per_group)),
            }
            for g in range(num_kv_heads)
        ]


def layer_windows(config: Any) -> tuple[int | None, ...]:
    """Per layer, the sliding window transformers' cache applies (None: full attention)."""
    layers = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * layers
    return tuple(window if t == "sliding_attention" and window else None for t in types)


def shape_of_config_json(config: dict[str, Any], kv_heads_field: str = "num_key_value_heads") -> ModelShape:
    """The shape of a config.json, resolved through the family's own config class (defaults, aliases)."""
    from transformers import CONFIG_MAPPING

    try:
        cfg = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except Exception as e:  # transformers raises several types for a malformed config
        raise UptrainError(f"config.json could not be read by transformers: {first_line(e)}") from e
    return ModelShape.from_config(cfg, kv_heads_field=kv_heads_field)


def count_parameters(config: Any, matmul_only: bool = False) -> int:
    """Parameters of the model a config describes, counted on a weightless (meta) model; tied weights once.
    matmul_only: leave out the input embedding table (a lookup) unless it is tied to the output head —
    the N of the 6·N·D training FLOPs."""
    total, tied, embedding = _parameter_facts(config)
    return total if tied or not matmul_only else total - embedding


def matmul_parameters(config: Any) -> tuple[int, bool]:
    """(N of the 6·N·D training FLOPs, whether the output head is the input embedding table): a tied
    table counts once, as the head's matmul; an untied one is a lookup and is left out."""
    total, tied, embedding = _parameter_facts(config)
    return (total if tied else total - embedding), tied


def _parameter_facts(config: Any) -> tuple[int, bool, int]:
    """(parameters, head tied to the input embeddings, elements of the input embedding table), on a meta model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    return sum(p.numel() for p in model.parameters()), tied, embed.numel()
