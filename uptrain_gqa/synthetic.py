"""Random-weight models of a chosen shape, saved as Hugging Face folders, and text a small model can learn.

One factory for the tests and the benchmarks:
- `tiny_config` / `random_model`: the tiny models of every supported family that the tests compare
  against transformers (8 heads of 8 dims, 2 layers);
- `save_tiny_llama`: the tiny MHA Llama most tests convert and train;
- `llama_config` / `save_random_checkpoint`: the Llama shapes the benchmarks time (1B, 7B, ...), written
  shard by shard without ever holding the model;
- `write_corpus` / `save_word_tokenizer`: short grammatical documents over a 40-word vocabulary, and a
  word-level tokenizer for them.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from uptrain_gqa.io.tensors import TensorSpec
from uptrain_gqa.io.writer import ShardedWriter

TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=96,
    max_position_embeddings=128,
    # large init: attention is peaked, so a wrong K head changes the logits visibly
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""The tiny shape every test model starts from; families add their own settings on top."""


def tiny_config(model_type: str = "llama", **overrides: Any) -> Any:
    """A transformers config of `model_type` with the TINY shape (and `overrides`)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**{**TINY, **overrides})


def random_model(config: Any, seed: int = 0, perturb_norms: bool = True) -> Any:
    """A randomly initialised model of `config` (float32, eval mode). With `perturb_norms`, norm weights and
    biases are randomised too (they initialise to 1 and 0), so pooling them is not checked on constants."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if perturb_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
                elif "norm" in name:
                    p.normal_(1.0, 0.3)
    return model


def save_tiny_llama(path: Path, shard: str | None = "30KB", seed: int = 0, **overrides: Any) -> Path:
    """A tiny random MHA Llama (8 heads, head_dim 8, 2 layers) saved as a HF folder, sharded by `shard`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


# --- benchmark shapes ----------------------------------------------------------------------------


def llama_config(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    vocab: int = 32000,
    max_positions: int = 4096,
    dtype: str = "bfloat16",
) -> Any:
    """A Llama config of the given shape (MHA unless kv_heads; FFN 8/3 · hidden unless given)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype=dtype,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_random_checkpoint(
    config: Any, folder: Path, dtype: torch.dtype = torch.bfloat16, shards: int = 1, seed: int = 0, std: float = 0.02
) -> int:
    """A checkpoint of `config` with N(0, std²) weights in `shards` safetensors files; returns its bytes.
    Tensor names and shapes come from a weightless (meta) model; each tensor is drawn as it is written,
    so memory stays at one tensor whatever the size."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {n: p for n, p in model.state_dict().items() if not n.endswith("inv_freq")}
    specs = [TensorSpec(n, dtype, tuple(p.shape)) for n, p in tensors.items()]
    total = sum(s.nbytes for s in specs)
    folder.mkdir(parents=True)
    writer = ShardedWriter(folder, specs, max_shard_size=math.ceil(total / shards))
    gen = torch.Generator().manual_seed(seed)
    for spec in writer.order:
        writer.write(spec.name, (torch.randn(spec.shape, generator=gen) * std).to(dtype))
    writer.finish()
    (folder / "config.json").write_text(config.to_json_string())
    return total


# --- text -----------------------------------------------------------------------------------------

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the king", "a bird", "the farmer", "our teacher"]
VERBS = ["sees", "likes", "finds", "follows", "paints", "feeds", "meets", "calls"]
OBJECTS = ["the river", "a small house", "the red apple", "a green field", "the moon", "a quiet town"]
ENDINGS = ["today .", "at night .", "in the morning .", "again .", "."]
SPECIALS = ["<pad>", "<s>", "</s>", "[UNK]"]  # ids 0, 1, 2, 3 match the tiny configs


def corpus_words() -> list[str]:
    """The tokenizer's vocabulary: the special tokens, then every word of the corpus."""
    words = {w for group in (SUBJECTS, VERBS, OBJECTS, ENDINGS) for phrase in group for w in phrase.split()}
    return SPECIALS + sorted(words)


def write_corpus(path: Path, docs: int, seed: int = 0, fmt: str = "txt") -> Path:
    """`docs` short documents of grammatical sentences, as one .txt per document in a folder, .jsonl or .parquet."""
    rng = random.Random(seed)
    texts = [
        " ".join(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(rng.randint(3, 8))
        )
        for _ in range(docs)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    else:
        path.mkdir(exist_ok=True)
        for i, t in enumerate(texts):
            (path / f"doc{i:04d}.txt").write_text(t + "\n")
    return path


def save_word_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the corpus words that adds <s> and knows </s> as EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(corpus_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="[UNK]"
    ).save_pretrained(folder)
