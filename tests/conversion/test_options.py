"""Conversion options: methods, dtype casting, tied embeddings, side files, chained conversions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.families import CASES, build, tensors
from uptrain_gqa import convert
from uptrain_gqa.io.folders import CONVERSION_RECORD
from uptrain_gqa.synthetic import save_tiny_llama

K = "model.layers.{}.self_attn.k_proj.{}"
V = "model.layers.{}.self_attn.v_proj.{}"


def heads(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.float().unflatten(0, (n, -1))  # (heads, d, *rest)


def test_first_keeps_each_groups_first_head(llama: Path) -> None:
    out = llama.parent / "out"
    convert(src=str(llama), out=str(out), num_kv_heads=2, method="first")
    before, after = tensors(llama), tensors(out)
    for layer in range(2):
        for name in (K.format(layer, "weight"), V.format(layer, "weight")):
            assert torch.equal(heads(after[name], 2), heads(before[name], 8)[[0, 4]]), name


def qwen2(tmp_path: Path) -> Path:
    case = next(c for c in CASES if c.id == "qwen2")  # k/v biases, randomised
    build(case).save_pretrained(tmp_path / "qwen2")
    return tmp_path / "qwen2"


def test_random_is_seeded_with_the_source_std_and_zero_bias(tmp_path: Path) -> None:
    src = qwen2(tmp_path)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        convert(src=str(src), out=str(tmp_path / name), num_kv_heads=2, method="random", seed=seed)
    before, a, b, c = (tensors(p) for p in (src, tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    for layer in range(2):
        for tmpl in (K, V):
            w = tmpl.format(layer, "weight")
            assert torch.equal(a[w], b[w]), "same seed, same weights"
            assert not torch.equal(a[w], c[w]), "another seed, other weights"
            assert a[w].std().item() == pytest.approx(before[w].std().item(), rel=0.15)
            assert torch.count_nonzero(a[tmpl.format(layer, "bias")]) == 0
    assert not torch.equal(a[K.format(0, "weight")], a[K.format(1, "weight")])
    assert not torch.equal(a[K.format(0, "weight")], a[V.format(0, "weight")])


def test_dtype_casts_floating_tensors_and_the_config(llama: Path) -> None:
    out = llama.parent / "out"
    report = convert(src=str(llama), out=str(out), num_kv_heads=4, dtype="bfloat16")
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}
    before = json.loads((llama / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    assert {k for k in before if before[k] != after.get(k)} == {"num_key_value_heads", "dtype"}
    assert after["dtype"] == "bfloat16"
    assert report.record["dtype"] == "bfloat16"
    assert report.kv_cache_bytes_per_token == (2 * 2 * 8 * 8 * 4, 2 * 2 * 4 * 8 * 2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    expected = heads(tensors(llama)[K.format(0, "weight")], 8).unflatten(0, (4, 2)).mean(1).flatten(0, 1)
    torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.weight, expected.to(torch.bfloat16))


def test_chunked_copies_write_the_same_bytes(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copied tensors pass through in row chunks; the result does not depend on the chunk size."""
    from uptrain_gqa.io import reader

    convert(src=str(llama), out=str(llama.parent / "whole"), num_kv_heads=2, dtype="float16")
    monkeypatch.setattr(reader, "CHUNK_BYTES", 300)  # embeddings (96 x 64 fp32) -> 24 pieces
    convert(src=str(llama), out=str(llama.parent / "chunked"), num_kv_heads=2, dtype="float16")
    whole, chunked = tensors(llama.parent / "whole"), tensors(llama.parent / "chunked")
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name].view(torch.uint8), chunked[name].view(torch.uint8)), name


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    src = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    convert(src=str(src), out=str(tmp_path / "out"), num_kv_heads=2)
    assert "lm_head.weight" not in tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_grouping_follows_repeat_kv(tmp_path: Path) -> None:
    """Query head h reads KV head h // (H/G): heads equal within *contiguous* groups convert
    losslessly; heads equal within interleaved groups (h % G) do not."""
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    deltas = {}
    for name, group_of in (("contiguous", lambda h: h // 4), ("interleaved", lambda h: h % 2)):
        model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / name, shard=None))
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.data.unflatten(0, (8, 8))
                leader = {}
                for h in range(8):
                    w[h] = w[leader.setdefault(group_of(h), h)]
        model.save_pretrained(tmp_path / f"{name}-src")
        convert(src=str(tmp_path / f"{name}-src"), out=str(tmp_path / f"{name}-out"), num_kv_heads=2)
        with torch.no_grad():
            a = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-src")(ids).logits
            b = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-out")(ids).logits
        deltas[name] = (a - b).abs().max().item()
    assert deltas["contiguous"] <= 1e-5
    assert deltas["interleaved"] > 1e-3


def test_chained_conversions_equal_a_direct_one(llama: Path) -> None:
    """Means of equal-sized means are means: 8 -> 4 -> 2 equals 8 -> 2, and the report keeps history."""
    root = llama.parent
    convert(src=str(llama), out=str(root / "g4"), num_kv_heads=4)
    convert(src=str(root / "g4"), out=str(root / "g2"), num_kv_heads=2)
    convert(src=str(llama), out=str(root / "direct"), num_kv_heads=2)
    chained, direct = tensors(root / "g2"), tensors(root / "direct")
    for name in direct:
        torch.testing.assert_close(chained[name], direct[name], rtol=0, atol=1e-6)
    report = json.loads((root / "g2" / CONVERSION_RECORD).read_text())
    assert report["source_num_kv_heads"] == 4
    assert report["previous"]["source_num_kv_heads"] == 8


def test_side_files_are_copied_and_weights_of_other_formats_are_not(llama: Path) -> None:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)} | {"[UNK]": 95}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(llama)
    (llama / "README.md").write_text("# model card\n")
    (llama / "consolidated.pth").write_bytes(b"\0" * 64)  # duplicate weights in another format
    (llama / "original").mkdir()
    (llama / "original" / "params.json").write_text("{}")
    out = llama.parent / "out"
    convert(src=str(llama), out=str(out), num_kv_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (llama / name).read_bytes(), name
    card = (out / "README.md").read_text()  # uptrain's card, with the source's kept below it
    assert card.startswith("---\nlibrary_name: transformers") and "## The source's model card\n\n# model card" in card
    assert not (out / "consolidated.pth").exists() and not (out / "original").exists()
    assert AutoTokenizer.from_pretrained(out)("w3 w5")["input_ids"] == [3, 5]


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [("refine_lr", float("inf"), "--refine-lr"), ("refine_steps", -1, "--refine-steps"),
     ("calibration_tokens", 0, "--calibration-tokens"), ("calibration_mix", 1.0, "--calibration-mix")],
)  # fmt: skip
def test_numbers_that_cannot_work_are_refused_when_the_options_are_made(tmp_path, field, value, flag) -> None:
    """Before the source is looked at (a Hub source is not downloaded to be refused)."""
    from uptrain_gqa.conversion.options import ConvertOptions
    from uptrain_gqa.errors import UptrainError

    with pytest.raises(UptrainError, match=f"^{flag} "):
        ConvertOptions(src="org/not-downloaded", out=str(tmp_path / "out"), num_kv_heads=2, **{field: value})
