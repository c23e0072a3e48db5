"""The Python API: docs/api.md's examples run as written, print nothing, and return what the commands' --json
prints; options objects refuse wrong types in one line, as the command line refuses bad flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import uptrain_gqa as ug
from tests import ROOT
from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def test_the_api_page_runs_as_written_and_prints_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    save_word_tokenizer(save_tiny_llama(Path("models/llama")))
    write_corpus(Path("text"), docs=1000)
    write_corpus(Path("heldout"), docs=60, seed=7)
    blocks = PYTHON_BLOCK.findall((ROOT / "docs" / "api.md").read_text())
    assert len(blocks) >= 4
    scope: dict = {}
    ug.set_verbosity("quiet")
    try:
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), scope)  # the page's own examples
    finally:
        ug.set_verbosity("normal")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # quiet: not even a progress bar
    made, run, scores = scope["made"], scope["run"], scope["scores"]
    assert len(scope["summary"]) == 3 and made.kv_cache_bytes_per_token[0] == 4 * made.kv_cache_bytes_per_token[1]
    # the result objects are what the commands write and print
    assert made.to_json() == json.loads((made.out / "uptrain_conversion.json").read_text())
    assert run.step == 20 and (run.model / "config.json").is_file()
    assert scores.quality is not None and scores.to_json()["quality"]["kl"] == scores.quality.kl > 0
    assert scope["serving"].recommended_num_kv_heads == scope["best"] and scope["table"]
    assert "ConvertOptions.num_kv_heads must be an int, got '2'" in scope["message"]


def test_options_are_one_object_for_python_and_the_command_line(
    llama: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uptrain_gqa.commands import convert as command

    seen: list[ug.ConvertOptions] = []

    def stage(options: ug.ConvertOptions) -> None:
        seen.append(options)
        raise ug.UptrainError("seen")

    monkeypatch.setattr(command, "convert_stage", stage)
    code, _, err = run_cli("convert", llama, llama.parent / "out", "--num-kv-heads", "2", "--method", "svd",
                           "--refine-steps", "3")  # fmt: skip
    assert code == 1 and err == "uptrain convert: error: seen\n"
    assert seen == [ug.ConvertOptions(str(llama), str(llama.parent / "out"), 2, method="svd", refine_steps=3)]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ug.ConvertOptions("a", "b", num_kv_heads=2.0), "ConvertOptions.num_kv_heads must be an int"),
        (lambda: ug.ConvertOptions("a", "b", 2, method="avg"), "ConvertOptions.method must be one of 'mean'"),
        (lambda: ug.ConvertOptions("a", "b", 2, max_shard_size="lots"), "lots"),
        (lambda: ug.EvalOptions("m", data_settings={"shuffle_buffer": 3}), "--data.shuffle_buffer"),
        (lambda: ug.EvalOptions("m", max_tokens=True), "EvalOptions.max_tokens must be an int"),
        (lambda: ug.PlanOptions(layers=0), "--layers must be at least 1"),
        (lambda: ug.convert(["a", "b"]), "convert takes ConvertOptions or a mapping"),
        (lambda: ug.train(3), "train takes a TrainConfig, a mapping or a YAML path"),
        (lambda: ug.train({"model": {"path": ["m"]}}), "model.path must be text"),
        (lambda: ug.train({"optim": {"lr": "fast"}}), "optim.lr must be a number"),
        (lambda: ug.train({}, optim={"lrr": 1}), "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        (lambda: ug.set_verbosity("loud"), "verbosity must be one of quiet, normal, verbose"),
    ],
)
def test_wrong_types_and_values_raise_one_uptrain_error(build, message: str) -> None:
    with pytest.raises(ug.UptrainError, match=re.escape(message)):
        build()
