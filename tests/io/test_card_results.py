"""`add_eval_results` writes an `uptrain eval --json` result into a model card's `model-index`, as huggingface_hub
reads it: one entry per held-out text, replaced (never duplicated) on a second call, the rest of the card kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.cards import add_eval_results, write_card

MODEL = {"path": "out/model", "model_type": "llama", "layers": 2, "num_attention_heads": 8, "num_kv_heads": 2,
         "head_dim": 16, "parameters": 1_000_000, "dtype": "float32", "attention": "uptrain_sdpa"}  # fmt: skip


def data(source: str, tokens: int) -> dict:
    return {"source": source, "mode": "strided", "tokens": tokens, "windows": 4, "window": 256, "stride": 128}


def quality(ppl: float, kl: float | None = None, agree: float | None = None) -> dict:
    ref = {"reference_perplexity": ppl * 0.9, "reference_nll": 1.0} if kl is not None else {}
    return {"perplexity": ppl, "nll": 2.0, "kl": kl, "top1_agreement": agree, **ref}


RESULT = {
    "schema_version": 1,
    "uptrain_version": "0.2.0",
    "device": "cpu (16 cores)",
    "model": MODEL,
    "reference": {**MODEL, "path": "src", "num_kv_heads": 8, "attention": "default"},
    "data": data("wiki (Hub dataset wikitext (wikitext-2-raw-v1): test), code (files: code.txt)", 2048),
    "quality": quality(14.5, 0.11, 0.8),
    "domains": [
        {
            "label": "wiki",
            "data": data("Hub dataset wikitext (wikitext-2-raw-v1): test", 1024),
            "quality": quality(12.25, 0.0875, 0.8125),
        },
        {"label": "code", "data": data("files: code.txt", 1024), "quality": quality(17.5, 0.125, 0.75)},
    ],
    "kv_cache": {},
    "decode": {},
    "tasks": {},
    "task_settings": {},
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "tiny-gqa2"
    out.mkdir()
    conversion = {"num_kv_heads": 2, "source_num_kv_heads": 8, "num_attention_heads": 8, "model_type": "llama",
                  "method": "mean", "grouping": "contiguous", "dtype": "float32"}  # fmt: skip
    write_card(out, title="tiny-gqa2", conversion=conversion, base_model="someorg/tiny-mha", licence="apache-2.0")
    return out


def metrics(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}


def test_each_held_out_text_is_a_model_index_entry_the_hub_reads(folder: Path) -> None:
    readme = folder / "README.md"
    before = ModelCard.load(readme)
    add_eval_results(folder, copy.deepcopy(RESULT))
    card = ModelCard.load(readme)
    assert metrics(card) == {
        ("wiki", "perplexity"): 12.25, ("wiki", "kl_divergence"): 0.0875, ("wiki", "top1_agreement"): 0.8125,
        ("code", "perplexity"): 17.5, ("code", "kl_divergence"): 0.125, ("code", "top1_agreement"): 0.75,
    }  # fmt: skip
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    kl = next(r for r in card.data.eval_results if r.metric_type == "kl_divergence")
    assert "KL to the source" in kl.metric_name
    wiki = next(r for r in card.data.eval_results if r.dataset_name == "wiki")
    assert (wiki.dataset_type, wiki.dataset_config, wiki.dataset_split) == ("wikitext", "wikitext-2-raw-v1", "test")
    meta = metadata_load(readme)
    ModelCardData(**meta)  # validates the model-index as huggingface_hub does
    assert meta["model-index"][0]["name"] == "tiny-gqa2" and len(meta["model-index"][0]["results"]) == 2
    for key in ("base_model", "license", "tags", "pipeline_tag", "library_name"):
        assert meta[key] == before.data.to_dict()[key], key
    assert card.text == before.text

    add_eval_results(folder, copy.deepcopy(RESULT))  # again: replaced, not appended
    assert ModelCard.load(readme).content == card.content


def test_a_single_text_is_one_entry_and_other_results_on_the_card_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    add_eval_results(folder, {**RESULT, "domains": [], "quality": quality(9.5)}, dataset_name="my text")
    card = ModelCard.load(folder / "README.md")  # a missing README becomes a minimal card
    assert metrics(card) == {("my text", "perplexity"): 9.5} and card.data.model_name == "m"
    readme = folder / "README.md"
    other = ModelCard.load(readme)  # a result uptrain did not write: kept
    other.data.eval_results.append(
        EvalResult(
            task_type="text-classification",
            dataset_type="sst2",
            dataset_name="SST-2",
            metric_type="accuracy",
            metric_value=0.9,
        )
    )
    other.save(readme)
    assert len(ModelCard.load(readme).data.eval_results) == 2
    add_eval_results(folder, copy.deepcopy(RESULT))
    card = ModelCard.load(readme)
    assert ("SST-2", "accuracy") in metrics(card) and ("my text", "perplexity") not in metrics(card)
    assert len(card.data.eval_results) == 7


def test_a_symlinked_card_is_refused_and_its_target_untouched(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.md"
    target.write_text((folder / "README.md").read_text())
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(target)
    before = target.read_bytes()
    with pytest.raises(UptrainError, match="symlink"):
        add_eval_results(folder, copy.deepcopy(RESULT))
    assert target.read_bytes() == before and (folder / "README.md").is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]  # no temporary left behind


def test_a_result_without_held_out_scores_is_refused(folder: Path) -> None:
    before = (folder / "README.md").read_bytes()
    no_text = {**RESULT, "data": None, "quality": None, "domains": [], "tasks": {"hellaswag": {"acc": 0.3}}}
    with pytest.raises(UptrainError, match="no held-out scores") as e:
        add_eval_results(folder, no_text)
    assert "\n" not in str(e.value) and "uptrain eval MODEL --data" in str(e.value)
    assert (folder / "README.md").read_bytes() == before


def test_eval_update_card_puts_the_measured_scores_on_the_converted_models_card(tmp_path: Path, run_cli) -> None:
    from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus

    src = save_tiny_llama(tmp_path / "src")
    save_word_tokenizer(src)
    out, held = tmp_path / "gqa", write_corpus(tmp_path / "held", docs=30)
    assert run_cli("convert", src, out, "--num-kv-heads", "2", "--quiet")[0] == 0
    code, _, err = run_cli("eval", out, "--reference", src, "--data", f"held={held}/*.txt", "--no-speed",
                           "--json", tmp_path / "eval.json", "--update-card", "--quiet")  # fmt: skip
    assert code == 0, err
    measured = json.loads((tmp_path / "eval.json").read_text())["quality"]
    card = ModelCard.load(out / "README.md")
    got = metrics(card)
    name = f"files: {held}/*.txt"
    assert got[(name, "perplexity")] == pytest.approx(measured["perplexity"])
    assert got[(name, "kl_divergence")] == pytest.approx(measured["kl"])
    assert card.data.base_model is None or isinstance(card.data.base_model, str)
    code, _, err = run_cli("eval", out, "--no-speed", "--update-card")
    assert code == 1 and "--update-card records held-out scores" in err
