"""`plan --quality`'s estimate: each G's KL to the source computed layer by layer in memory equals what
`uptrain eval --reference SOURCE` reports on the checkpoint `convert` writes with the same merge, text by text;
and `eval` of several texts at once reports each as a separate `eval` of that text does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from uptrain_gqa.conversion.calibrate import Calibration
from uptrain_gqa.conversion.estimate import merge_quality
from uptrain_gqa.conversion.refine import DEFAULT_LR, DEFAULT_STEPS, Refinement
from uptrain_gqa.data.config import DataConfig
from uptrain_gqa.data.documents import token_stream
from uptrain_gqa.evaluation.quality import add_scores, strided
from uptrain_gqa.io.folders import read_config
from uptrain_gqa.io.reader import CheckpointReader
from uptrain_gqa.model.families import lookup
from uptrain_gqa.model.shape import shape_of_config_json
from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus

WINDOW, STRIDE, CALIBRATION_TOKENS = 32, 16, 1024


@pytest.fixture
def source(tmp_path: Path) -> dict:
    src = save_tiny_llama(tmp_path / "src", shard=None)
    save_word_tokenizer(src)
    return {
        "src": src,
        "calibration": f"{write_corpus(tmp_path / 'cal', docs=120, seed=1)}/*.txt",
        "held": {
            "prose": f"{write_corpus(tmp_path / 'held', docs=20, seed=2)}/*.txt",
            "other": f"{write_corpus(tmp_path / 'other', docs=12, seed=3)}/*.txt",
        },
    }


def estimate(source: dict, groups: list[int], refinement=None) -> dict[int, dict[str, float]]:
    reader = CheckpointReader(source["src"])
    config = read_config(source["src"])
    arch = lookup(config)
    shape = shape_of_config_json(config, arch.kv_heads_field)
    tokenizer = AutoTokenizer.from_pretrained(source["src"])
    windows = {
        label: strided(token_stream(DataConfig(files=[files]), tokenizer, 100_000)[0], WINDOW, STRIDE)
        for label, files in source["held"].items()
    }
    calibration = Calibration(source["calibration"], CALIBRATION_TOKENS)  # uptrain:broad mixed in, as convert does
    return merge_quality(reader, arch, shape, groups, calibration, windows, add_scores, refinement, quiet=True)


@pytest.mark.parametrize(
    "refine",
    [0, pytest.param(None, marks=pytest.mark.slow)],  # refined: the same comparison, kept out of the 5-minute run
    ids=["closed-form", "refined-as-convert-does"],
)
def test_the_estimate_equals_eval_of_the_converted_checkpoint(
    run_cli, source: dict, tmp_path: Path, refine: int | None
) -> None:
    refinement = Refinement(DEFAULT_STEPS, DEFAULT_LR, 0) if refine is None else None
    totals = estimate(source, [4, 2, 1], refinement)
    steps = ["--refine-steps", "0"] if refine == 0 else []  # convert's default with text: refined
    for g in (4, 2, 1):
        out = tmp_path / f"g{g}"
        code, _, err = run_cli("convert", source["src"], out, "--num-kv-heads", g, "--method", "svd", "--calibration",
                               source["calibration"], "--calibration-tokens", CALIBRATION_TOKENS, *steps,
                               "--quiet")  # fmt: skip
        assert code == 0, err
        both = tmp_path / f"{g}.json"
        texts = [f"{label}={files}" for label, files in source["held"].items()]
        code, _, err = run_cli("eval", out, "--reference", source["src"], "--data", *texts, "--window", WINDOW,
                               "--stride", STRIDE, "--no-speed", "--json", both)  # fmt: skip
        assert code == 0, err
        together = json.loads(both.read_text())
        assert [d["label"] for d in together["domains"]] == list(source["held"])
        for d in together["domains"]:
            if g == 1:  # each text as its own eval scores it
                alone = tmp_path / f"{g}-{d['label']}.json"
                code, _, err = run_cli("eval", out, "--reference", source["src"], "--window", WINDOW, "--stride",
                                       STRIDE, f"--data.files=[{source['held'][d['label']]}]", "--no-speed", "--json",
                                       alone)  # fmt: skip
                assert code == 0, err
                assert d["quality"] == pytest.approx(json.loads(alone.read_text())["quality"], rel=1e-6)
                assert d["data"]["tokens"] == json.loads(alone.read_text())["data"]["tokens"]
            evaluated = d["quality"]
            t = totals[g][d["label"]]
            assert t["count"] > 200 and t["count"] == d["data"]["tokens"]
            assert abs(t["kl"] / t["count"] - evaluated["kl"]) <= 1e-3, (g, t["kl"] / t["count"], evaluated["kl"])
            assert abs(t["agree"] / t["count"] - evaluated["top1_agreement"]) <= 1e-3
        mean = together["quality"]
        labels = list(source["held"])
        kls = [totals[g][label]["kl"] / totals[g][label]["count"] for label in labels]
        assert abs(mean["kl"] - sum(kls) / len(kls)) <= 1e-3  # the mean weighs each text the same
    kl = {g: sum(totals[g][x]["kl"] for x in totals[g]) / sum(totals[g][x]["count"] for x in totals[g]) for g in totals}
    assert 0 < kl[4] < kl[1], kl  # a random model's heads are unlike: every merge costs, MQA most


# --- what a `plan --quality` run holds: memory, estimated before anything is allocated -----------------------


def test_the_memory_estimate_covers_the_held_out_states_merge_quality_holds(tmp_path: Path, monkeypatch) -> None:
    import torch

    from uptrain_gqa.conversion import estimate as estimate_module
    from uptrain_gqa.device import compute_device, inference_dtype

    src = save_tiny_llama(tmp_path / "src", shard=None, num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    reader = CheckpointReader(src)
    config = read_config(src)
    arch = lookup(config)
    shape = shape_of_config_json(config, arch.kv_heads_field)
    held = {"random": strided(torch.randint(0, 96, (256,), generator=torch.Generator().manual_seed(0)), 64, 64)}
    held_bytes = {}
    totals = estimate_module._HeldOut.totals

    def measured(self, add_scores):  # every tensor the held-out pass keeps until the scoring, counted once
        kept = [*self.source.hidden[self.first :], *self.reference, *(x for path in self.paths.values() for x in path)]
        held_bytes["kept"] = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}.values())
        return totals(self, add_scores)

    monkeypatch.setattr(estimate_module._HeldOut, "totals", measured)
    merge_quality(reader, arch, shape, [2, 1], Calibration("random", 256), held, add_scores)
    per_token = estimate_module.held_out_bytes_per_token(shape, 2, inference_dtype(compute_device()).itemsize)
    assert 0 < held_bytes["kept"] <= 256 * per_token < 1.5 * held_bytes["kept"]


def test_held_out_tokens_beyond_memory_are_refused_naming_the_most_that_fit(monkeypatch) -> None:
    from uptrain_gqa.conversion import estimate as estimate_module
    from uptrain_gqa.device import compute_device, inference_dtype
    from uptrain_gqa.errors import UptrainError
    from uptrain_gqa.model.shape import ModelShape

    shape = ModelShape(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128)  # Llama-2-70B: G = 4, 2, 1
    monkeypatch.setattr(estimate_module, "available_memory", lambda device: 10 * 2**30)
    per_token = estimate_module.held_out_bytes_per_token(shape, 3, inference_dtype(compute_device()).itemsize)
    most = 10 * 2**30 // per_token
    estimate_module.check_held_out_tokens(shape, 3, most)
    with pytest.raises(UptrainError, match=rf"--quality-tokens {most + 1:,} needs about .* at most {most:,} fit"):
        estimate_module.check_held_out_tokens(shape, 3, most + 1)
    with pytest.raises(UptrainError, match=rf"of each text .* at most {most // 2:,} fit"):  # per text: two texts
        estimate_module.check_held_out_tokens(shape, 3, most // 2 + 1, texts=2)
