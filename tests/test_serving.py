"""`uptrain plan`: serving-budget figures against hand computation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import Gemma2Config, LlamaConfig

from uptrain_gqa.errors import UptrainError
from uptrain_gqa.model.shape import ModelShape
from uptrain_gqa.serving import ServedModel, serving_rows, why_none_fits
from uptrain_gqa.synthetic import save_tiny_llama

LLAMA2_70B = dict(layers=80, heads=64, kv_heads=8, head_dim=128, hidden=8192, params=68_976_648_192)
LLAMA2_13B = dict(layers=40, heads=40, kv_heads=40, head_dim=128, hidden=5120, params=13_015_864_320)


def rows_by_g(rows) -> dict:
    return {r.num_kv_heads: r for r in rows}


def test_llama2_70b_per_request_cache_at_4096_tokens_fp16() -> None:
    m = ServedModel("llama-2-70b", ModelShape(**LLAMA2_70B), dtype="fp16")
    rows, _ = serving_rows(m, memory=640 * 10**9, context=4096, batch=1, kv_itemsize=2, tp=8)
    r = rows_by_g(rows)
    # 2 (K, V) x 80 layers x G heads x 128 dims x 4096 tokens x 2 bytes
    assert r[64].kv_per_request == 2 * 80 * 64 * 128 * 4096 * 2 == 10_737_418_240  # "10.7 GB"
    assert r[8].kv_per_request == 2 * 80 * 8 * 128 * 4096 * 2 == 1_342_177_280  # "1.34 GB"
    assert r[1].kv_per_request == 2 * 80 * 1 * 128 * 4096 * 2 == 167_772_160  # "0.17 GB"
    assert [r[g].ratio for g in (64, 8, 1)] == [1, 8, 64]
    assert r[8].current and r[8].reachable and not r[16].reachable


def test_llama2_13b_64k_context_batch_32_on_one_80gb_gpu() -> None:
    m = ServedModel("llama-2-13b", ModelShape(**LLAMA2_13B), dtype="fp16")
    rows, best = serving_rows(m, memory=80 * 10**9, context=65536, batch=32, kv_itemsize=2)
    r = rows_by_g(rows)
    assert list(r) == [40, 20, 10, 8, 5, 4, 2, 1]  # every divisor of 40, MHA to MQA
    per_head = 2 * 40 * 128 * 65536 * 2  # one KV head, one request: 1.34 GB
    assert r[40].kv_per_request == 40 * per_head == 53_687_091_200
    assert r[40].kv_batch == 32 * 40 * per_head
    # weights: 13,015,864,320 params, less 2 x 40 layers x (40 - G) heads x 128 x 5120 per merged head
    assert r[1].weights_per_gpu == (13_015_864_320 - 2 * 40 * 39 * 128 * 5120) * 2 == 21_942_282_240
    assert r[1].total_per_gpu == 21_942_282_240 + 32 * per_head == 64_891_955_200  # 64.9 of 80 GB
    assert r[1].fits and not r[2].fits
    assert r[1].max_requests == (80 * 10**9 - 21_942_282_240) // per_head == 43
    assert r[40].max_requests == 1  # 80 - 26.0 GB of weights leave room for one 53.7 GB MHA request
    assert best == 1
    _, best_fp8 = serving_rows(m, memory=80 * 10**9, context=65536, batch=32, kv_itemsize=1)
    assert best_fp8 == 2  # fp8 halves the cache: GQA-2 fits (22.0 + 42.9 GB)


def test_tensor_parallelism_shards_weights_and_kv_heads() -> None:
    m = ServedModel("llama-2-13b", ModelShape(**LLAMA2_13B), dtype="fp16")
    rows, best = serving_rows(m, memory=80 * 10**9, context=65536, batch=32, kv_itemsize=2, tp=4)
    r = rows_by_g(rows)
    per_head = 2 * 40 * 128 * 65536 * 2
    assert r[8].weights_per_gpu == -(-(13_015_864_320 - 2 * 40 * 32 * 128 * 5120) * 2 // 4)
    assert r[8].kv_batch_per_gpu == 32 * 2 * per_head  # 8 heads over 4 GPUs: 2 each
    assert r[2].kv_batch_per_gpu == 32 * 1 * per_head  # fewer heads than GPUs: one head per GPU
    assert not r[5].tp_divisible and not r[2].tp_divisible and r[4].tp_divisible
    assert best == 4  # 8 does not fit; 5 is fine in memory but not divisible by tp 4


def test_sliding_window_layers_cap_the_cache() -> None:
    cfg = Gemma2Config(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                       hidden_size=512, sliding_window=1024)  # fmt: skip
    m = ModelShape.from_config(cfg, params=10**9)
    assert m.windows == (1024, None, 1024, None)
    # two full layers hold 8192 tokens, two sliding layers 1023
    assert m.kv_bytes(8192, batch=1, itemsize=2, kv_heads=8) == 2 * 8 * 64 * 2 * (8192 * 2 + 1023 * 2)


def test_impossible_budgets_and_bad_options(run_cli) -> None:
    m = ServedModel("llama-2-13b", ModelShape(**LLAMA2_13B), dtype="fp16")
    rows, best = serving_rows(m, memory=16 * 10**9, context=4096, batch=1, kv_itemsize=2)
    assert best is None and not any(r.fits for r in rows) and len(rows) == 8  # the table is still there
    reason = why_none_fits(rows, 16 * 10**9, 4096, 1)
    assert re.search(r"the weights alone need 2[12].* GB per GPU, more than the 16\.00 GB", reason)
    rows, best = serving_rows(m, memory=40 * 10**9, context=2_000_000, batch=1, kv_itemsize=2)
    assert best is None and "not even one request of 2,000,000 tokens fits" in why_none_fits(
        rows, 40 * 10**9, 2_000_000, 1
    )
    with pytest.raises(UptrainError, match="--tp 3 does not divide the 40 query heads"):
        serving_rows(m, memory=80 * 10**9, context=4096, batch=1, kv_itemsize=2, tp=3)
    numbers = ["--layers", "40", "--heads", "40", "--head-dim", "128", "--params", "13e9"]
    code, _, err = run_cli("plan", *numbers, "--num-kv-heads", "3")
    assert code == 1 and "--num-kv-heads 3 does not divide the 40 heads (valid: 40, 20, 10, 8, 5, 4, 2, 1)" in err
    code, _, err = run_cli("plan", "--layers", "40", "--heads", "40")
    assert code == 1 and "give MODEL (a folder, config.json or Hub id) or all of --head-dim, --params" in err
    code, _, err = run_cli("plan", *numbers, "--kv-heads", "7")
    assert code == 1 and "7 KV heads do not divide 40 attention heads" in err
    code, _, err = run_cli("plan", *numbers, "--memory", "lots")
    assert code == 1 and "cannot read size 'lots'" in err


def test_cli_table_units_and_json(run_cli) -> None:
    args = ["--layers", "80", "--heads", "64", "--kv-heads", "8", "--head-dim", "128", "--hidden", "8192",
            "--params", "68976648192", "--context", "4096", "--kv-dtype", "fp16", "--weights-dtype", "fp16",
            "--memory", "80GB", "--tp", "2", "--batch", "8"]  # fmt: skip
    code, out, err = run_cli("plan", *args)
    assert code == 0, err
    assert "(GB = 10^9 bytes)" in out
    mha = next(line for line in out.splitlines() if line.startswith("| 64 |"))
    assert "| 10.74 |" in mha and "not reachable from 8 KV heads" in mha
    assert "recommended: G = 8" in out
    code, out, _ = run_cli("plan", *args, "--units", "GiB")
    assert "(GiB = 2^30 bytes)" in out and "| 10.00 |" in next(x for x in out.splitlines() if x.startswith("| 64 |"))
    code, out, _ = run_cli("plan", *args, "--json")
    result = json.loads(out)
    assert result["recommended_num_kv_heads"] == 8
    assert [r["kv_per_request"] for r in result["rows"] if r["num_kv_heads"] in (64, 8, 1)] == [
        10_737_418_240, 1_342_177_280, 167_772_160
    ]  # fmt: skip


def test_plan_from_a_checkpoint_and_from_a_config_json(run_cli, tmp_path: Path) -> None:
    src = save_tiny_llama(tmp_path / "llama")  # fp32 weights, 2 layers, 8 heads x 8
    code, out, err = run_cli("plan", src, "--memory", "1GB", "--context", "100", "--batch", "4", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"]["dtype"] == "fp32" and result["model"]["params"] > 0
    first = result["rows"][0]
    assert first["kv_per_request"] == 2 * 2 * 8 * 8 * 100 * 2  # bf16 cache by default
    cfg = tmp_path / "13b.json"
    LlamaConfig(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000).to_json_file(cfg)  # fmt: skip
    code, out, err = run_cli("plan", cfg, "--memory", "80GB", "--context", "65536", "--batch", "32", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"]["params"] == 13_015_864_320  # Llama-2-13B, counted on a weightless model
    assert result["recommended_num_kv_heads"] == 1


def test_plot(run_cli, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")  # a dev dependency: present in `make test`
    numbers = ["--layers", "40", "--heads", "40", "--head-dim", "128", "--params", "13e9", "--context", "65536"]
    code, _, err = run_cli("plan", *numbers, "--batch", "4", "--plot", tmp_path / "kv.png")
    assert code == 0, err
    assert (tmp_path / "kv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli("plan", *numbers, "--plot", tmp_path / "again.png")
    assert code == 1 and "pip install 'matplotlib" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "0"], "--layers must be at least 1, got 0"),
        (["--head-dim", "0"], "--head-dim must be at least 1, got 0"),
        (["--kv-heads", "0"], "--kv-heads must be at least 1, got 0"),
        (["--hidden", "0"], "--hidden must be at least 1, got 0"),
        (["--context", "0"], "--context must be at least 1, got 0"),
        (["--params", "inf"], "--params must be a parameter count like 7e9, got inf"),
        (["--params", "nan"], "--params must be a parameter count like 7e9, got nan"),
        (["--params", "0"], "--params must be a parameter count"),
        (["--layers", "1000000000"], "--layers 1,000,000,000 is not a real model's"),
        (["--memory", "80"], "--memory 80: give a unit, e.g. 80GB"),
    ],
)
def test_impossible_numbers_get_one_line_before_any_work(run_cli, extra: list[str], message: str) -> None:
    numbers = {"--layers": "40", "--heads": "40", "--head-dim": "128", "--params": "13e9"}
    numbers |= dict(zip(extra[::2], extra[1::2], strict=True))
    code, _, err = run_cli("plan", *[x for kv in numbers.items() for x in kv])
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_model_numbers_beside_a_model_are_refused_not_ignored(run_cli, llama) -> None:
    code, _, err = run_cli("plan", llama, "--kv-heads", "0")
    assert code == 1 and "--kv-heads must be at least 1" in err
    code, _, err = run_cli("plan", llama, "--hidden", "512")
    assert code == 1 and "--hidden describe a model not on disk; with MODEL they would be ignored" in err


def test_the_table_prints_even_when_nothing_fits_and_today_needs_no_conversion(run_cli) -> None:
    numbers = ["--layers", "80", "--heads", "64", "--kv-heads", "8", "--head-dim", "128", "--params", "69e9"]
    code, out, err = run_cli("plan", *numbers, "--weights-dtype", "fp16", "--memory", "80GB")
    assert code == 0, err
    assert out.count("\n| ") == 1 + 7 and "the weights alone need" in out  # header, G = 64 ... 1, then why
    code, out, _ = run_cli("plan", *numbers, "--memory", "80GB", "--tp", "8", "--batch", "1")
    assert code == 0 and "what the model has today (GQA-8): it fits as it is, nothing to convert" in out
    assert "uptrain convert MODEL OUT --num-kv-heads 8" not in out


def _repeated_heads(src: Path, out: Path) -> Path:
    """An MHA exactly equivalent to the GQA-2 `src`: each KV head repeated for the query heads that read it."""
    import shutil

    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    heads, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    weights = load_file(src / "model.safetensors")
    for name, t in weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            weights[name] = t.reshape(kv, d, -1).repeat_interleave(heads // kv, 0).reshape(heads * d, -1).contiguous()
    out.mkdir()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": heads}))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, out / f.name)
    return out


def test_quality_finds_where_repeated_heads_merge_exactly_and_recommends_within_max_kl(run_cli, tmp_path) -> None:
    from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

    gqa = save_tiny_llama(tmp_path / "gqa", shard=None, num_key_value_heads=2, head_dim=8)
    save_word_tokenizer(gqa)
    mha = _repeated_heads(gqa, tmp_path / "mha")
    text = f"{write_corpus(tmp_path / 'text', docs=300)}/*.txt"
    common = ["--memory", "1GB", "--quality", text, "--calibration-tokens", "2048", "--quality-tokens", "1024",
              "--quiet", "--json"]  # fmt: skip
    code, out, err = run_cli("plan", mha, *common, "--max-kl", "0.005")
    assert code == 0, err
    plan = json.loads(out)
    kl = {r["num_kv_heads"]: r["kl"] for r in plan["rows"]}
    assert kl[8] == 0.0 and kl[4] <= 1e-3 and kl[2] <= 1e-3, kl  # the repeated heads merge exactly
    assert kl[1] > 0.01, kl  # the two distinct heads do not
    assert plan["recommended_num_kv_heads"] == 2 and plan["quality"]["note"] is None  # smallest cache within 0.005
    # the conversion that makes it, runnable as printed: the user's model, the merge as measured (svd, the
    # default calibration text, as many calibration tokens)
    assert plan["command"] == f"uptrain convert {mha} mha-gqa2 --num-kv-heads 2 --method svd --calibration-tokens 2048"
    code, out, err = run_cli("plan", mha, *[c for c in common if c != "--json"], "--max-kl", "0", "--plot",
                             tmp_path / "plan.png")  # fmt: skip
    assert code == 0, err
    assert "KL to source | top-1 |" in out and "recommended: G = " in out, out
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # with the KV-vs-KL panel


def test_quality_on_several_texts_reports_each_and_recommends_by_their_mean(run_cli, tmp_path) -> None:
    """--quality NAME=DATA ...: a KL per text and G, and the mean the recommendation reads; the table prints each."""
    from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

    gqa = save_tiny_llama(tmp_path / "gqa", shard=None, num_key_value_heads=2, head_dim=8)
    save_word_tokenizer(gqa)
    texts = [f"prose={write_corpus(tmp_path / 'a', docs=80, seed=5)}/*.txt", "builtin=uptrain:heldout.legal"]
    common = ["--memory", "1GB", "--quality", *texts, "--calibration-tokens", "1024", "--quality-tokens", "512",
              "--refine-steps", "0", "--quiet"]  # fmt: skip
    code, out, err = run_cli("plan", gqa, *common, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["quality"]["texts"] == ["prose", "builtin"]
    assert plan["quality"]["calibration"]["sources"][0]["data"] == "uptrain:broad.docs"  # the default
    mqa = next(r for r in plan["rows"] if r["num_kv_heads"] == 1)
    per_text = [mqa["by_text"][t]["kl"] for t in ("prose", "builtin")]
    assert all(k > 0 for k in per_text) and mqa["kl"] == pytest.approx(sum(per_text) / 2)
    assert [mqa["by_text"][t]["tokens"] for t in ("prose", "builtin")] == [508, 508]  # 4 windows of 128, less 1 each
    code, out, err = run_cli("plan", gqa, *common)
    assert code == 0, err
    assert "KL to source (mean) | top-1 (mean) |" in out and "| G | prose | builtin | mean |" in out, out
    assert f"| 1 | {per_text[0]:.4f} / " in out, out
    code, _, err = run_cli("plan", gqa, "--quality", "random", texts[0])
    assert code == 1 and "--quality random measures on random tokens: give it alone" in err, err
    code, _, err = run_cli("plan", gqa, "--calibration", texts[0])
    assert code == 1 and "--calibration shape the merges --quality measures; add --quality TEXT" in err, err


def test_quality_needs_weights_and_a_sane_max_kl(run_cli, llama, tmp_path) -> None:
    code, _, err = run_cli("plan", llama, "--quality", "random", "--max-kl", "-1")
    assert code == 1 and "--max-kl must be a KL per token, at least 0" in err, err
    code, _, err = run_cli("plan", "--layers", "2", "--heads", "8", "--head-dim", "8", "--params", "1e6",
                           "--quality", "random")  # fmt: skip
    assert code == 1 and "--quality reads the weights" in err, err


# --- plan --quality reads the source through convert's pre-flight (issue 35) ----------------------------------

QUICK = ["--memory", "1GB", "--quality", "random", "--quality-tokens", "128", "--calibration-tokens", "256", "--quiet"]
"""A data-free --quality on the tiny models: a fraction of a second."""


def _edited(src: Path, out: Path, weights=None, config=None) -> Path:
    """A copy of the single-file checkpoint `src` with `weights(tensors)` and `config(dict)` applied."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    if weights is not None:
        tensors = load_file(out / "model.safetensors")
        weights(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(autouse=True)
def own_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$TMPDIR of the test's own: --quality's scratch folders, and what the next run finds there, stay in it."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def single(tmp_path: Path) -> Path:
    """A tiny MHA Llama (2 heads of 32: one merge to measure, MQA) in one safetensors file, with a tokenizer."""
    from uptrain_gqa.synthetic import save_word_tokenizer

    src = save_tiny_llama(tmp_path / "single", shard=None, num_attention_heads=2, num_key_value_heads=2, head_dim=32)
    save_word_tokenizer(src)
    return src


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_quality_refuses_nan_in_an_attention_weight_as_convert_does(run_cli, single, tmp_path) -> None:
    # the last layer's q_proj: its inputs (the Σ) stay finite, so without the check every merge "measures"
    def poison(t):
        t["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")

    damaged = _edited(single, tmp_path / "nan", weights=poison)
    code, out, err = run_cli("plan", damaged, *QUICK)
    assert code == 1 and "recommended" not in out, out
    message = _one_line(err)
    assert "model.layers.1.self_attn.q_proj.weight holds 1 NaN/inf values; the source checkpoint is damaged" in message
    code, _, convert_err = run_cli("convert", damaged, tmp_path / "out", "--num-kv-heads", "1", "--quiet")
    assert code == 1 and _one_line(convert_err).split("error: ")[1] == message.split("error: ")[1]


def test_quality_refuses_a_source_whose_outputs_are_not_finite(run_cli, single, tmp_path) -> None:
    """NaN outside attention (convert copies it with a warning) makes every KL NaN: no G is recommended on it."""

    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")

    code, out, err = run_cli("plan", _edited(single, tmp_path / "nan", weights=poison), *QUICK)
    assert code == 1 and "recommended" not in out, out
    assert "the KL to the source is not finite" in err and "mlp.down_proj.weight" in err, err


def test_quality_refuses_weights_that_disagree_with_the_config_in_one_line(run_cli, single, tmp_path) -> None:
    wrong = _edited(single, tmp_path / "hd", config=lambda c: c.update(head_dim=4))
    code, _, err = run_cli("plan", wrong, *QUICK)
    assert code == 1
    assert "q_proj.weight has shape [64, 64] but config.json implies 8 rows" in _one_line(err), err


def test_quality_on_text_needs_the_source_tokenizer_in_one_line(run_cli, tmp_path) -> None:
    from uptrain_gqa.synthetic import write_corpus

    bare = save_tiny_llama(tmp_path / "bare", shard=None)  # no tokenizer
    text = f"{write_corpus(tmp_path / 'text', docs=20)}/*.txt"
    code, _, err = run_cli("plan", bare, "--memory", "1GB", "--quality", text, "--quality-tokens", "128", "--quiet")
    assert code == 1
    assert "--quality text needs the source's tokenizer" in _one_line(err) and "--quality random" in err, err


def test_plot_path_is_checked_before_any_work(run_cli, single, tmp_path, monkeypatch) -> None:
    import uptrain_gqa.commands.plan as plan_command

    def measured(*args, **kwargs):
        raise AssertionError("measured before the --plot path was checked")

    monkeypatch.setattr(plan_command, "measure_quality", measured)
    code, _, err = run_cli("plan", single, *QUICK, "--plot", tmp_path / "p.txt")
    assert code == 1 and "--plot" in err and ".png, .svg or .pdf" in _one_line(err), err
    (tmp_path / "file").write_text("")
    code, _, err = run_cli("plan", single, *QUICK, "--plot", tmp_path / "file" / "p.png")
    assert code == 1 and "--plot" in _one_line(err) and "is a file, not a folder" in err, err
    (tmp_path / "folder.png").mkdir()
    code, _, err = run_cli("plan", single, *QUICK, "--plot", tmp_path / "folder.png")
    assert code == 1 and "--plot" in _one_line(err) and "is a folder" in err, err


def test_plot_format_follows_the_suffix(run_cli, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    numbers = ["--layers", "4", "--heads", "8", "--head-dim", "64", "--params", "1e8"]
    code, _, err = run_cli("plan", *numbers, "--plot", tmp_path / "kv.svg")
    assert code == 0, err
    assert b"<svg" in (tmp_path / "kv.svg").read_bytes()[:1000]


def test_quality_tokens_beyond_memory_are_refused_before_any_allocation(run_cli, single, monkeypatch) -> None:
    from uptrain_gqa.conversion import estimate

    code, _, err = run_cli("plan", single, *QUICK, "--quality-tokens", "1000000000000")  # 8 TB of token ids alone
    assert code == 1
    assert "--quality-tokens 1,000,000,000,000 needs" in _one_line(err) and "at most" in err, err
    monkeypatch.setattr(estimate, "available_memory", lambda device: 10**6)  # allocatable, but would fill memory
    code, _, err = run_cli("plan", single, *QUICK, "--quality-tokens", "100000")
    assert code == 1 and "--quality-tokens 100,000 needs" in _one_line(err), err
    allowed = int(re.search(r"at most ([\d,]+)", err).group(1).replace(",", ""))
    assert 0 < allowed < 100_000


def test_a_quality_run_writes_nothing_to_disk(run_cli, single, own_temporary_folder) -> None:
    """Each layer's Σ and merges live while the layer does: a `plan --quality` killed outright (the OOM killer, no
    clean-up) can leave nothing behind, since it writes nothing."""
    code, _, err = run_cli("plan", single, *QUICK)
    assert code == 0, err
    assert list(own_temporary_folder.iterdir()) == []
