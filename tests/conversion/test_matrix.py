"""Every method × grouping × dtype converts (and loads) or refuses with one clear line; calibration sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from uptrain import convert
from uptrain.conversion.pooling import GROUPINGS, METHODS
from uptrain.errors import UptrainError
from uptrain.io.folders import CONVERSION_RECORD

DTYPES = ("auto", "bfloat16", "float16", "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_grouping_and_dtype_converts(llama: Path, method: str, grouping: str, dtype: str) -> None:
    out = llama.parent / "out"
    report = convert(str(llama), str(out), num_kv_heads=2, method=method, grouping=grouping, dtype=dtype,
                     calibration_tokens=64, quiet=True)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2
    expected = torch.float32 if dtype == "auto" else getattr(torch, dtype)  # the tiny source is float32
    assert model.dtype == expected and report["dtype"] == str(expected).removeprefix("torch.")
    joint = method == "svd" or grouping == "similarity"
    calib = json.loads((out / CONVERSION_RECORD).read_text())["calibration"]
    # joint merges weigh by the inputs: random tokens unless told otherwise; the rest read none
    assert (calib["kind"], calib["tokens_used"]) == ("random", 64) if joint else calib is None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_calibration_without_a_joint_merge_is_refused(llama: Path, method: str) -> None:
    with pytest.raises(UptrainError, match="drop --calibration"):
        convert(str(llama), str(llama.parent / "out"), num_kv_heads=2, method=method, calibration="random")
    assert not (llama.parent / "out").exists()


def test_weights_only_svd_is_explicit(llama: Path) -> None:
    report = convert(str(llama), str(llama.parent / "out"), num_kv_heads=2, method="svd", calibration="none",
                     quiet=True)  # fmt: skip
    assert report["calibration"] == "none"


def test_hub_calibration_offline_fails_clearly(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uptrain.synthetic import save_word_tokenizer

    save_word_tokenizer(llama)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UptrainError, match=r"--calibration someorg/somedata: .*network access"):
        convert(str(llama), str(llama.parent / "out"), num_kv_heads=2, method="svd", calibration="someorg/somedata",
                calibration_subset="en", calibration_split="validation", quiet=True)  # fmt: skip
    assert not (llama.parent / "out").exists()


def test_calibration_kinds() -> None:
    from uptrain.conversion.calibrate import Calibration

    assert Calibration("random").kind == "random" and Calibration("random").num_tokens == 8192
    assert Calibration("org/data").kind == "hub" and Calibration("org/data").num_tokens == 65536
    assert Calibration("org/data", subset="en").data().streaming
    for spec in ("data/*.jsonl", "text.txt", "dir/more/deep", "./x"):
        assert Calibration(spec).kind == "files", spec
    with pytest.raises(UptrainError, match=r"^--calibration: no file matches"):  # named as the flag, not data.files
        Calibration("missing/*.txt").check()
    with pytest.raises(UptrainError, match="must be positive"):
        Calibration("random", 0).check()
