"""Every method × grouping × dtype converts (and loads) or refuses with one clear line; calibration sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from uptrain_gqa import convert
from uptrain_gqa.conversion.methods import GROUPINGS, METHODS
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.folders import CONVERSION_RECORD

DTYPES = ("auto", "bfloat16", "float16", "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_grouping_and_dtype_converts(llama: Path, method: str, grouping: str, dtype: str) -> None:
    out = llama.parent / "out"
    report = convert(src=str(llama), out=str(out), num_kv_heads=2, method=method, grouping=grouping, dtype=dtype,
                     calibration_tokens=64)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2
    expected = torch.float32 if dtype == "auto" else getattr(torch, dtype)  # the tiny source is float32
    assert model.dtype == expected and report.record["dtype"] == str(expected).removeprefix("torch.")
    joint = method == "svd" or grouping == "similarity"
    calib = json.loads((out / CONVERSION_RECORD).read_text())["calibration"]
    # joint merges weigh by the inputs: random tokens unless told otherwise; the rest read none
    assert (calib["kind"], calib["tokens_used"]) == ("random", 64) if joint else calib is None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_calibration_without_a_joint_merge_is_refused(llama: Path, method: str) -> None:
    with pytest.raises(UptrainError, match="drop --calibration"):
        convert(src=str(llama), out=str(llama.parent / "out"), num_kv_heads=2, method=method, calibration="random")
    assert not (llama.parent / "out").exists()


def test_weights_only_svd_is_explicit(llama: Path) -> None:
    report = convert(src=str(llama), out=str(llama.parent / "out"), num_kv_heads=2, method="svd", calibration="none")
    assert report.record["calibration"] == "none"


def test_hub_calibration_offline_fails_clearly(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uptrain_gqa.synthetic import save_word_tokenizer

    save_word_tokenizer(llama)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UptrainError, match=r"--calibration someorg/somedata: .*network access"):
        convert(src=str(llama), out=str(llama.parent / "out"), num_kv_heads=2, method="svd",
                calibration="someorg/somedata", calibration_subset="en", calibration_split="validation")  # fmt: skip
    assert not (llama.parent / "out").exists()


def test_calibration_kinds() -> None:
    from uptrain_gqa.conversion.calibrate import Calibration

    assert Calibration("random").kind == "random" and Calibration("random").num_tokens == 8192
    assert Calibration().kind == "text" and Calibration().num_tokens == 65536  # uptrain:broad
    hub = Calibration("org/data", subset="en", mix=0).sources
    assert [(s.kind, s.label, s.weight) for s in hub] == [("hub", "data", 1.0)] and hub[0].data().streaming
    for spec in ("data/*.jsonl", "text.txt", "dir/more/deep", "./x"):
        assert [s.kind for s in Calibration(spec, mix=0).sources] == ["files"], spec
    with pytest.raises(UptrainError, match=r"^--calibration: no file matches"):  # named as the flag, not data.files
        Calibration("missing/*.txt").check()
    with pytest.raises(UptrainError, match="must be positive"):
        Calibration("random", 0).check()
    with pytest.raises(UptrainError, match="give it alone"):
        _ = Calibration(("random", "a.txt")).kind
    with pytest.raises(UptrainError, match=r"0 <= mix < 1"):
        Calibration("a.txt", mix=1)
    with pytest.raises(UptrainError, match="evaluation suite uptrain:heldout"):
        Calibration("uptrain:heldout").check()


def test_calibration_texts_are_labelled_weighted_and_mixed_with_broad_text() -> None:
    """`[LABEL[:WEIGHT]=]DATA` texts share the tokens by weight; uptrain:broad takes --calibration-mix of them
    unless the texts include built-in text; every token asked for is given out."""
    from uptrain_gqa.conversion.calibrate import Calibration
    from uptrain_gqa.data import builtin

    broad = [p.label for p in builtin.SETS["broad"]]
    c = Calibration(("code:3=src/*.py", "docs=docs/*.md"), 10_000, mix=0.2)
    shares = {s.label: s.weight for s in c.sources}
    mixed_in = [f"broad.{p}" if p == "docs" else p for p in broad]  # a label of the user's stays theirs
    assert list(shares)[:2] == ["code", "docs"] and list(shares)[2:] == mixed_in
    assert shares["code"] == pytest.approx(0.6) and shares["docs"] == pytest.approx(0.2)
    assert sum(shares[p] for p in mixed_in) == pytest.approx(0.2)
    assert sum(n for _, n in c.allotment()) == 10_000
    assert [s.label for s in Calibration(("a.txt", "uptrain:broad"), mix=0.5).sources] == ["a", *broad]  # not twice
    assert [s.label for s in Calibration("a.txt", mix=0).sources] == ["a"]
    with pytest.raises(UptrainError, match="weight must be a positive number"):
        _ = Calibration("code:-1=src/*.py").sources
    with pytest.raises(UptrainError, match="is not a built-in text set"):
        _ = Calibration("uptrain:nothing").sources
