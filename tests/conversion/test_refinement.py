"""Layer-wise refinement: each merged attention fitted to the source's outputs, never left worse.

The reference is transformers itself: the source, the closed-form conversion and the refined one are
loaded whole, the held-out calibration windows run through the source, and every layer's converted
attention is fed the source attention's inputs; its output error is measured against the source's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import accelerate.utils
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.families import CASES, Case, build, load, tensors
from uptrain_gqa import convert
from uptrain_gqa.conversion.calibrate import Calibration
from uptrain_gqa.conversion.refine import DEFAULT_STEPS, Refinement, split_windows
from uptrain_gqa.data import builtin
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.evaluation.generation import returned_cache
from uptrain_gqa.io.folders import CONVERSION_RECORD
from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

TOKENS = 1200  # windows of 128 tokens (max_position_embeddings): 9 trained on, 1 held out


def saved(case: Case, tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "src"
    build(case).save_pretrained(src)
    save_word_tokenizer(src)
    return src, write_corpus(tmp_path / "calib.jsonl", docs=60, fmt="jsonl")


def converted(src: Path, out: Path, groups: int, text: Path, **kwargs) -> dict:
    convert(src=str(src), out=str(out), num_kv_heads=groups, method="svd", calibration=str(text),
            calibration_tokens=TOKENS, **kwargs)  # fmt: skip
    return json.loads((out / CONVERSION_RECORD).read_text())


def held_out_errors(src: Path, models: list[Path], text: Path) -> list[list[float]]:
    """Per model, per layer: Σ‖attn(x) − y‖² / Σ‖y‖² on the held-out windows, x and y the source attention's
    input and output (the source's own hidden states, as refinement fits them)."""
    source = load(src)
    seq = min(2048, source.config.max_position_embeddings)
    calibration = Calibration(str(text), TOKENS)  # the text, and uptrain:broad mixed in
    labelled = calibration.windows(AutoTokenizer.from_pretrained(src), 0, seq)
    windows = [ids for _, ids in labelled]
    _, held = split_windows(len(windows), calibration.may_hold_out([label for label, _ in labelled]))
    assert held and all(not label.startswith("calib") for label, _ in (labelled[w] for w in held))  # broad only
    calls: dict[int, list] = {}

    def hook(i):
        def record(module, args, kwargs, out):
            kw = dict(kwargs)
            x = kw.pop("hidden_states") if "hidden_states" in kw else args[0]
            calls.setdefault(i, []).append((x, args[1:] if "hidden_states" not in kwargs else args, kw, out[0]))

        return record

    layers = source.model.layers
    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for w in held:
            source(windows[w][None], use_cache=False)
    for h in handles:
        h.remove()
    out = []
    for path in models:
        model = load(path)
        errors = []
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                err = sum(float((layer.self_attn(x, *a, **kw)[0] - y).pow(2).sum()) for x, a, kw, y in calls[i])
                errors.append(err / sum(float(y.pow(2).sum()) for *_, y in calls[i]))
        out.append(errors)
    return out


# the default run covers plain attention and fused QKV; `make test-all` runs every family (key norms, MQA,
# partial rotary, soft-capping with sliding windows, biases, ...)
QUICK = {"llama", "phi3"}
FAMILIES = [c if c.id in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in CASES if c.model_type != "mixtral"]


@pytest.mark.parametrize("case", FAMILIES, ids=lambda c: c.id)
def test_refinement_never_leaves_a_layer_worse_than_its_closed_form(case: Case, tmp_path: Path) -> None:
    """Every family calibration runs (fused QKV, key norms, partial rotary, sliding windows, soft-capping):
    refined layers measured by transformers are at most the closed form's error on held-out windows, and the
    record says what transformers measures."""
    src, text = saved(case, tmp_path)
    converted(src, tmp_path / "closed", case.groups, text, refine_steps=0)
    record = converted(src, tmp_path / "refined", case.groups, text, refine_steps=24, refine_lr=3e-3)
    closed, refined = held_out_errors(src, [tmp_path / "closed", tmp_path / "refined"], text)
    layers = record["merge_errors"]
    assert [r["layer"] for r in layers] == list(range(len(closed)))
    for i, r in enumerate(layers):
        done = r["refinement"]
        assert done["error_after"] <= done["error_before"]
        assert refined[i] <= closed[i] * (1 + 1e-5) + 1e-7, (i, refined[i], closed[i])
        assert done["error_before"] == pytest.approx(closed[i], rel=1e-3, abs=1e-6)
        assert done["error_after"] == pytest.approx(refined[i], rel=1e-3, abs=1e-6)
    assert record["refinement"]["layers_improved"] >= 1  # it does something on every family
    broad = {p.label for p in builtin.SETS["broad"]}
    assert record["refinement"]["held_out"] and set(record["refinement"]["held_out"]) <= broad  # judged outside
    assert sum(refined) < sum(closed)


def test_a_refinement_that_does_not_help_is_not_kept(tmp_path: Path) -> None:
    """The largest learning rate allowed (1.0) makes every layer worse on held-out windows: the closed form is
    written, bit for bit."""
    src, text = saved(CASES[0], tmp_path)
    converted(src, tmp_path / "closed", 2, text, refine_steps=0)
    record = converted(src, tmp_path / "wild", 2, text, refine_steps=2, refine_lr=1.0)
    assert record["refinement"]["layers_improved"] == 0
    assert all(not r["refinement"]["kept"] for r in record["merge_errors"])
    closed, wild = tensors(tmp_path / "closed"), tensors(tmp_path / "wild")
    assert closed.keys() == wild.keys() and all(torch.equal(closed[n], wild[n]) for n in closed)


def test_refined_output_is_a_standard_gqa_checkpoint(tmp_path: Path) -> None:
    src, text = saved(CASES[0], tmp_path)
    converted(src, tmp_path / "closed", 2, text, refine_steps=0)
    record = converted(src, tmp_path / "refined", 2, text)  # text calibration: refined by default
    assert record["refinement"]["steps"] == DEFAULT_STEPS and record["refinement"]["layers_improved"] >= 1
    config = json.loads((tmp_path / "refined" / "config.json").read_text())
    assert config == json.loads((tmp_path / "closed" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2
    closed, refined = tensors(tmp_path / "closed"), tensors(tmp_path / "refined")
    assert {n: t.shape for n, t in closed.items()} == {n: t.shape for n, t in refined.items()}
    changed = {n for n in closed if not torch.equal(closed[n], refined[n])}
    assert changed and all(re.search(r"\.self_attn\.", n) for n in changed)  # only attention values move
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "refined")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = model(ids, use_cache=True)
    layer = returned_cache(out).layers[0]
    assert layer.keys.shape == layer.values.shape == (1, 2, 5, model.config.head_dim)
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 9)


def test_refinement_holds_one_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's layer and its converted attention are the only layer weights in memory at any time."""
    src, text = saved(CASES[0], tmp_path)
    models: list[torch.nn.Module] = []
    real_from_config = AutoModelForCausalLM.from_config
    real_set = accelerate.utils.set_module_tensor_to_device
    most = [0]

    def from_config(*args, **kwargs):
        models.append(real_from_config(*args, **kwargs))
        return models[-1]

    def loaded() -> set[int]:
        return {i for m in models for i, layer in enumerate(m.model.layers)
                if any(not p.is_meta for p in layer.parameters())}  # fmt: skip

    def tracked(*args, **kwargs):
        real_set(*args, **kwargs)
        most[0] = max(most[0], len(loaded()))

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", from_config)
    monkeypatch.setattr(accelerate.utils, "set_module_tensor_to_device", tracked)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", from_config)
    record = converted(src, tmp_path / "out", 2, text, refine_steps=4)
    assert len(models) == 2  # the source's skeleton and the converted one
    assert most[0] == 1 and not loaded()
    assert record["refinement"]["steps"] == 4


def test_a_bf16_calibration_pass_refines_in_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the source runs in bf16: the captured windows are bf16, the converted attention fits in float32."""
    from uptrain_gqa.conversion import walk

    monkeypatch.setattr(walk, "inference_dtype", lambda device: torch.bfloat16)
    src, text = saved(CASES[0], tmp_path)
    record = converted(src, tmp_path / "out", 2, text, refine_steps=8)
    layers = record["merge_errors"]
    assert all(math.isfinite(r["refinement"]["error_after"]) for r in layers)
    assert record["refinement"]["layers_improved"] >= 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.float32 and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_split_windows_holds_out_an_eighth() -> None:
    assert split_windows(1) == ([0], [0])
    assert split_windows(2) == ([0], [1])
    assert split_windows(32) == (list(range(28)), list(range(28, 32)))
    assert math.ceil(9 / 8) == len(split_windows(9)[1])


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--method", "mean", "--refine-steps", "4"], "--refine-steps fits each merged layer"),
        (["--method", "svd", "--calibration", "none", "--refine-steps", "4"], "--refine-steps fits each merged layer"),
        (["--method", "svd", "--refine-steps", "-1"], "--refine-steps must not be negative"),
        (["--method", "svd", "--refine-lr", "0"], "--refine-lr must be positive"),
        # refinement did nothing (inf), overflowed Adam in a traceback (1e308), or wrote Infinity into the record
        *[
            (
                ["--method", "svd", "--calibration", "random", "--refine-steps", "2", "--refine-lr", lr],
                "--refine-lr must be positive and at most 1 (0 < lr <= 1",
            )
            for lr in ("inf", "1e308", "nan", "2")
        ],
    ],
)
def test_refinement_refusals(run_cli, llama: Path, extra: list[str], expect: str) -> None:
    out = llama.parent / "out"
    code, stdout, stderr = run_cli("convert", llama, out, "--num-kv-heads", "2", *extra)
    assert code == 1 and stdout == "" and not out.exists()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], stderr


def test_random_tokens_refine_only_when_asked(llama: Path) -> None:
    out = llama.parent / "random"
    convert(src=str(llama), out=str(out), num_kv_heads=2, method="svd", calibration_tokens=256)
    assert "refinement" not in json.loads((out / CONVERSION_RECORD).read_text())
    convert(src=str(llama), out=str(out), num_kv_heads=2, method="svd", calibration_tokens=256, refine_steps=4,
            overwrite=True)  # fmt: skip
    assert json.loads((out / CONVERSION_RECORD).read_text())["refinement"]["steps"] == 4


def test_refinement_settings_are_checked() -> None:
    with pytest.raises(UptrainError, match="must not be negative"):
        Refinement(steps=-1)
    with pytest.raises(UptrainError, match="must be positive"):
        Refinement(lr=-1.0)
    for lr in (math.inf, math.nan, 1e308, 1.5):  # plan --quality refines through the same settings
        with pytest.raises(UptrainError, match=r"^--refine-lr must be positive and at most 1 \(0 < lr <= 1"):
            Refinement(lr=lr)
    assert Refinement(lr=1.0).lr == 1.0
