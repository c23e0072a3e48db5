"""`uptrain eval`: perplexity, KL and agreement, KV cache formula vs measurement, JSON and --compare."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import ROOT
from tests.families import CASES, build
from uptrain_gqa import convert
from uptrain_gqa.evaluation import quality as evallib
from uptrain_gqa.evaluation.evaluate import load_model
from uptrain_gqa.evaluation.generation import generation
from uptrain_gqa.evaluation.result import SCHEMA_VERSION, EvalResult
from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A tiny MHA Llama with a tokenizer, its GQA-2 and MQA conversions, and a corpus."""
    src = save_tiny_llama(tmp_path / "mha", shard=None)
    save_word_tokenizer(src)
    for name, g in (("gqa", 2), ("mqa", 1)):
        convert(src=str(src), out=str(tmp_path / name), num_kv_heads=g)
    return {"mha": src, "gqa": tmp_path / "gqa", "mqa": tmp_path / "mqa", "corpus": write_corpus(tmp_path / "c", 60)}


def run_eval(run_cli, *args) -> tuple[int, str, str]:
    return run_cli("eval", *args)


def hf_strided_nll(model_dir: Path, tokens: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """The same windows scored through transformers' own loss (labels -100 outside the scored part)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        first = max(prev_end, begin + 1) - begin
        labels = tokens[begin:end].clone()
        labels[:first] = -100
        with torch.no_grad():
            loss = model(input_ids=tokens[begin:end][None], labels=labels[None]).loss
        total += loss.item() * (end - begin - first)
        count += end - begin - first
        prev_end = end
        if end == len(tokens):
            break
    return total, count


def test_perplexity_equals_transformers_on_the_same_tokens(run_cli, models, tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    code, stdout, err = run_eval(
        run_cli, models["gqa"], f"--data.files=[{models['corpus']}/*.txt]", "--data.seq_len=24",
        "--max-tokens", "700", "--stride", "10", "--no-speed", "--json", out,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(models["gqa"])
    texts = [p.read_text() for p in sorted(models["corpus"].glob("*.txt"))]
    stream = [t for ids in tok(texts)["input_ids"] for t in (*ids, tok.eos_token_id)][:700]
    total, count = hf_strided_nll(models["gqa"], torch.tensor(stream), window=24, stride=10)
    assert result["data"]["tokens"] == count == 699  # every token but the first, once
    assert (result["data"]["mode"], result["data"]["window"], result["data"]["stride"]) == ("strided", 24, 10)
    assert result["data"]["windows"] == len(evallib.strided(torch.tensor(stream), 24, 10))
    assert math.isclose(result["quality"]["nll"], total / count, rel_tol=1e-5)
    assert math.isclose(result["quality"]["perplexity"], math.exp(total / count), rel_tol=1e-5)
    assert f"{result['quality']['perplexity']:.3f}" in stdout
    # progress over the scored tokens, as whole lines (stderr is no terminal here), ending at all 699
    bars = [line for line in err.splitlines() if line.startswith("scoring: ")]
    assert "\r" not in err and bars and bars[-1].startswith("scoring: 100% 699/699"), err


def test_no_held_out_text_says_how_to_give_some(run_cli, models) -> None:
    code, _, err = run_eval(run_cli, models["gqa"], "--no-speed")
    assert code == 0 and "no held-out text, so no perplexity or KL; give some with --data" in err, err


def test_a_model_against_itself_has_zero_kl_and_full_agreement(models) -> None:
    model, _ = load_model(str(models["gqa"]), "float32", torch.device("cpu"))
    stream = torch.randint(4, 40, (300,), generator=torch.Generator().manual_seed(0))
    windows = evallib.strided(stream, 32, 16)
    q = evallib.quality(evallib.score(model, windows, 4, reference=model), with_reference=True)
    assert abs(q.kl) < 1e-6 and q.top1_agreement == 1.0 and math.isclose(q.perplexity, q.reference_perplexity)


def test_kl_and_agreement_against_the_mha_source(run_cli, models, tmp_path: Path) -> None:
    code, stdout, err = run_eval(
        run_cli, models["mqa"], "--reference", models["mha"], f"--data.files=[{models['corpus']}/*.txt]",
        "--data.seq_len=32", "--max-tokens", "400", "--json", tmp_path / "e.json", "--new-tokens", "8",
    )  # fmt: skip
    assert code == 0, err
    q = json.loads((tmp_path / "e.json").read_text())["quality"]
    assert q["kl"] > 0.01 and 0 <= q["top1_agreement"] < 1  # pooled heads do change the predictions
    assert "KL(reference ‖ model)" in stdout and "reference" in stdout


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa"])
def test_kv_cache_formula_equals_the_measured_cache(models, variant: str) -> None:
    model, _ = load_model(str(models[variant]), "float32", torch.device("cpu"))
    kv, decode = generation(model, prompt_tokens=12, new_tokens=5, batch=2)
    g = {"mha": 8, "gqa": 2, "mqa": 1}[variant]
    assert kv.bytes_per_token == 2 * 2 * g * 8 * 4  # 2 · layers · G · head_dim · fp32
    assert kv.cached_tokens == 16 and kv.batch == 2
    assert kv.measured_bytes == kv.formula_bytes == kv.bytes_per_token * 16 * 2 and kv.match
    assert decode.decode_tokens_per_s > 0 and decode.new_tokens == 5


def test_decoding_uses_the_cache_api_this_transformers_has_not_deprecated(models, capfd) -> None:
    """Every `uptrain eval` printed "past_key_values is deprecated and will be removed in version 5.40.0":
    the decode loop passes and reads the cache under the name this transformers' forward takes. The suite
    ignores FutureWarning and DeprecationWarning (pyproject), so they are recorded here explicitly, and
    transformers' own logged deprecation note (printed once per process) is reset first."""
    import logging
    import warnings

    model, _ = load_model(str(models["gqa"]), "float32", torch.device("cpu"))
    logging.Logger.warning_once.cache_clear()  # transformers' "print once" memory, as a fresh process has it
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kv, _ = generation(model, prompt_tokens=8, new_tokens=3, batch=1)
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, deprecations
    assert "deprecated" not in capfd.readouterr().err
    assert kv.match  # and the cache it read back is the one the model filled


@pytest.mark.parametrize("case_id", ["mistral", "gemma2", "gemma3_text"])
def test_kv_cache_formula_accounts_for_sliding_windows(case_id: str) -> None:
    case = next(c for c in CASES if c.id == case_id)  # sliding_window 16; gemma alternates layer types
    model = build(case)
    kv, _ = generation(model, prompt_tokens=20, new_tokens=8, batch=1)  # 27 cached > window 16
    per_layer = kv.bytes_per_token // model.config.num_hidden_layers
    full_attention_bytes = kv.bytes_per_token * kv.cached_tokens
    assert kv.measured_bytes == kv.formula_bytes < full_attention_bytes
    types = getattr(model.config, "layer_types", None) or ["sliding_attention"] * 2  # mistral: every layer slides
    windows = [15 if t == "sliding_attention" else 27 for t in types]  # window - 1 tokens kept on sliding layers
    assert kv.formula_bytes == per_layer * sum(windows)


def test_json_schema_and_compare(run_cli, models, tmp_path: Path) -> None:
    files = []
    for name in ("gqa", "mqa"):
        out = tmp_path / f"{name}.json"
        code, _, err = run_eval(
            run_cli, models[name], f"--data.files=[{models['corpus']}/*.txt]", "--data.seq_len=32",
            "--max-tokens", "300", "--new-tokens", "4", "--json", out,
        )  # fmt: skip
        assert code == 0, err
        files.append(out)
    result = json.loads(files[0].read_text())
    assert result["schema_version"] == SCHEMA_VERSION
    assert set(result) == {f.name for f in dataclasses.fields(EvalResult)}
    assert set(result["quality"]) >= {"perplexity", "nll", "kl", "top1_agreement"}
    assert set(result["kv_cache"]["model"]) == {
        "bytes_per_token", "batch", "cached_tokens", "formula_bytes", "measured_bytes", "match"
    }  # fmt: skip
    assert result["model"]["num_kv_heads"] == 2 and result["reference"] is None
    code, stdout, err = run_eval(run_cli, "--compare", *files)
    assert code == 0, err
    header, _, *rows = stdout.strip().splitlines()
    assert header == "| | gqa | mqa |"
    kv_row = next(r for r in rows if r.startswith("| KV bytes/token"))
    assert kv_row == "| KV bytes/token | 256 | 128 |"
    png = tmp_path / "compare.png"
    code, _, err = run_eval(run_cli, "--compare", *files, "--plot", png)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err
    code, _, err = run_eval(run_cli, "--compare", *files, "--plot", tmp_path)
    assert code == 1 and "--plot" in err and "is a folder" in err
    code, _, err = run_eval(run_cli, "--compare", tmp_path / "nope.json")
    assert code == 1 and "nope.json not found" in err


def test_run_config_scores_the_held_out_blocks_like_training(run_cli, tiny_run: dict, tmp_path: Path) -> None:
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run["config"]))
    assert run_cli("train", cfg)[0] == 0
    run = Path(tiny_run["config"]["out"])
    code, _, err = run_eval(run_cli, run / "model", "--config", cfg, "--no-speed", "--json", tmp_path / "e.json")
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    last_val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
    assert result["data"]["mode"] == "blocks" and result["data"]["windows"] == 16
    assert result["data"]["tokens"] == 16 * 31
    assert math.isclose(result["quality"]["nll"], last_val["val_loss"], rel_tol=1e-5)


def test_bad_inputs(run_cli, models, tmp_path: Path) -> None:
    code, _, err = run_eval(run_cli, models["gqa"], f"--data.files=[{tmp_path}/missing/*.txt]")
    assert code == 1 and "data.files: no file matches" in err
    other = save_tiny_llama(tmp_path / "other", shard=None, vocab_size=200)
    save_word_tokenizer(other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"the"', '"The"'))
    code, _, err = run_eval(run_cli, models["gqa"], "--reference", other, "--no-speed")
    assert code == 1 and "use different tokenizers" in err
    code, _, err = run_eval(run_cli, tmp_path / "no-model")
    assert code == 1 and "no such model folder" in err
    code, _, err = run_eval(run_cli, models["gqa"], "--lr=3")
    assert code == 1 and "eval takes --data.* settings" in err
    code, _, err = run_eval(run_cli)
    assert code == 1 and "give MODEL" in err
    code, _, err = run_eval(run_cli, models["gqa"], f"--data.files=[{models['corpus']}/*.txt]", "--window=4096")
    assert code == 1 and "above the model's max_position_embeddings 128" in err
    for line in (err,):
        assert len(line.strip().splitlines()) == 1


TASK = """task: uptrain_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_tasks_run_on_the_loaded_model(run_cli, models, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")  # a dev dependency: present in `make test`
    rows = [
        {"question": "the cat sees", "choices": ["the moon .", "a a a"], "answer": 0},
        {"question": "a dog finds", "choices": ["a quiet town .", "finds finds"], "answer": 0},
    ]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK.format(data=tmp_path / "tasks" / "tiny.jsonl"))
    out = tmp_path / "e.json"
    code, stdout, err = run_eval(
        run_cli, models["gqa"], "--no-speed", "--tasks", "uptrain_tiny_choice", "--tasks-include", tmp_path / "tasks",
        "--json", out,
    )  # fmt: skip
    assert code == 0, err
    assert set(json.loads(out.read_text())["tasks"]["uptrain_tiny_choice"]) == {"acc"}
    assert "uptrain_tiny_choice acc" in stdout
    # the usual lm-eval knobs: few-shot count, batch size, sample log; n-shot and version kept
    code, _, err = run_eval(
        run_cli, models["gqa"], "--no-speed", "--tasks", "uptrain_tiny_choice", "--tasks-include", tmp_path / "tasks",
        "--num-fewshot", "1", "--tasks-batch-size", "1", "--log-samples", tmp_path / "samples", "--json", out,
    )  # fmt: skip
    assert code == 0, err
    settings = json.loads(out.read_text())["task_settings"]["uptrain_tiny_choice"]
    assert settings["n_shot"] == 1 and settings["version"] is not None and settings["chat_template"] is False
    samples = (tmp_path / "samples" / "uptrain_tiny_choice.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "the cat sees" in samples[0]
    code, _, err = run_eval(run_cli, models["gqa"], "--no-speed", "--num-fewshot", "1")
    assert code == 1 and "need --tasks" in err


@pytest.mark.slow  # lm-eval indexes all its built-in tasks (~15 s per run)
def test_lm_eval_task_data_out_of_reach(run_cli, models) -> None:
    pytest.importorskip("lm_eval")
    code, _, err = run_eval(run_cli, models["gqa"], "--no-speed", "--tasks", "arc_easy", "--tasks-limit", "2")
    assert code == 1 and "the data of the lm-eval tasks cannot be reached" in err.strip().splitlines()[-1]
    code, _, err = run_eval(run_cli, models["gqa"], "--no-speed", "--tasks", "no_such_task")
    assert code == 1 and "unknown lm-eval task(s): no_such_task" in err


def test_tasks_without_lm_eval_installed(run_cli, models, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, _, err = run_eval(run_cli, models["gqa"], "--no-speed", "--tasks", "hellaswag")
    assert code == 1 and "pip install 'lm_eval[hf]" in err


def test_the_schema_document_is_current() -> None:
    from uptrain_gqa.evaluation.result import schema_markdown

    doc = ROOT / "docs" / "eval-schema.md"
    assert doc.read_text() == schema_markdown(), (
        'docs/eval-schema.md is stale: python -c "from uptrain_gqa.evaluation.result import schema_markdown; '
        "open('docs/eval-schema.md', 'w').write(schema_markdown())\""
    )
    assert "|  |" not in doc.read_text(), "every field needs a docstring"


def test_inputs_refused_before_any_work(run_cli, models, tmp_path: Path) -> None:
    data = f"--data.files=[{models['corpus']}/*.txt]"
    cases = [
        (["--stride", "0"], "--stride must be at least 1, got 0"),
        (["--window", "0"], "--window must be at least 1, got 0"),
        (["--tasks", ","], "names no task"),
        (["--json", str(tmp_path)], "is a folder"),
        (["--json", "/proc/nowhere/e.json"], "cannot write there"),
        (["--json", str(models["corpus"] / "doc0000.txt" / "e.json")], "doc0000.txt is a file, not a folder"),
        (["--tasks", "x", "--log-samples", "/proc/nowhere/s"], "--log-samples /proc/nowhere/s: cannot create it"),
        (["--tasks", "x", "--log-samples", str(models["corpus"] / "doc0000.txt")], "is a file; give a folder"),
        (["--tasks", "x", "--tasks-include", str(tmp_path / "missing")], "is not a folder"),
    ]
    for extra, message in cases:
        code, _, err = run_eval(run_cli, models["gqa"], data, "--no-speed", *extra)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_json_on_a_full_disk_names_the_file_and_leaves_nothing(run_cli, models, tmp_path: Path, monkeypatch) -> None:
    import contextlib
    import os

    from uptrain_gqa.io import folders

    real_fdopen = os.fdopen

    @contextlib.contextmanager
    def full(fd, *args, **kwargs):  # the temporary file takes 10 bytes, then the disk is full
        with real_fdopen(fd, *args, **kwargs) as f:

            class Disk:
                def write(self, data: bytes) -> None:
                    f.write(data[:10])
                    raise OSError(28, "No space left on device")

            yield Disk()

    monkeypatch.setattr(folders.os, "fdopen", full)
    out = tmp_path / "results" / "result.json"
    code, printed, err = run_eval(run_cli, models["gqa"], f"--data.files=[{models['corpus']}/*.txt]", "--no-speed",
                                  "--json", out)  # fmt: skip
    assert code == 1 and f"--json {out}: cannot write it (No space left on device)" in err, err
    assert "perplexity" in printed and list(out.parent.iterdir()) == []


def test_a_missing_local_folder_is_not_reported_as_a_network_problem(run_cli, tmp_path: Path) -> None:
    code, _, err = run_eval(run_cli, tmp_path / "runs" / "model", "--no-speed")
    assert code == 1 and "no such model folder" in err and "huggingface.co" not in err.split("(")[0]
    code, _, err = run_eval(run_cli, "runs/model", "--no-speed")  # also reads as a Hub id: both are named
    assert code == 1 and err.startswith("uptrain eval: error: runs/model: no such model folder here, and no Hub repo")


def test_compare_with_a_damaged_result_says_which_file(run_cli, models, tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    data = f"--data.files=[{models['corpus']}/*.txt]"
    assert run_eval(run_cli, models["gqa"], data, "--data.seq_len=24", "--no-speed", "--json", good)[0] == 0
    whole = json.loads(good.read_text())
    for name, damage in (("nomodel", lambda r: r.pop("model")), ("badtype", lambda r: r["quality"].update(kl="x"))):
        r = json.loads(good.read_text())
        damage(r)
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        code, _, err = run_eval(run_cli, "--compare", good, tmp_path / f"{name}.json")
        assert code == 1 and f"{tmp_path / name}.json lacks or garbles a field" in err, err
    assert whole["schema_version"] == SCHEMA_VERSION


def test_a_tiny_held_out_text_is_scored_with_a_warning(run_cli, models, tmp_path: Path) -> None:
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "a.txt").write_text("the cat sat on the mat")
    code, _, err = run_eval(run_cli, models["gqa"], f"--data.files=[{tmp_path}/few/*.txt]", "--no-speed")
    assert code == 0 and "warning: only" in err and "is noise" in err


def test_device_map_on_a_forced_split_gives_the_plain_figures(run_cli, models, tmp_path: Path) -> None:
    """--device-map auto with too little CPU memory for the weights: some layers are offloaded to disk, the model
    and its reference are loaded one after the other, and every figure equals the plain path's."""
    common = [
        "--reference", models["mha"], f"--data.files=[{models['corpus']}/*.txt]", "--data.seq_len=32",
        "--max-tokens", "400", "--batch-size", "3", "--new-tokens", "4", "--prompt-tokens", "8",
    ]  # fmt: skip
    code, _, err = run_eval(run_cli, models["mqa"], *common, "--json", tmp_path / "plain.json")
    assert code == 0, err
    scratch = tmp_path / "scratch"
    code, _, err = run_eval(
        run_cli, models["mqa"], *common, "--json", tmp_path / "split.json",
        "--device-map", "auto", "--max-memory", "cpu=250kB", "--offload-folder", scratch,
    )  # fmt: skip
    assert code == 0, err
    plain, split = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "split"))
    for key in ("nll", "reference_nll", "kl", "top1_agreement"):
        assert math.isclose(split["quality"][key], plain["quality"][key], rel_tol=1e-5, abs_tol=1e-7), key
    assert split["data"] == plain["data"] and split["model"] == plain["model"]
    assert split["reference"] == plain["reference"]
    for who in ("model", "reference"):  # the cache is measured on the placed model too
        assert split["kv_cache"][who]["measured_bytes"] == plain["kv_cache"][who]["measured_bytes"]
    assert list(scratch.iterdir()) == []  # offloaded weights and stored log-probabilities are gone


def test_device_map_really_splits_the_model(models, tmp_path: Path) -> None:
    """The placement the test above relies on: with 250 kB of CPU memory, the embedding and the first layer
    stay in memory and the rest sits on disk."""
    from uptrain_gqa.evaluation.evaluate import Placement

    model, _ = load_model(
        str(models["mqa"]), "float32", torch.device("cpu"), Placement("auto", {"cpu": 250_000}, tmp_path)
    )
    assert model.hf_device_map["model.layers.0"] == "cpu" and model.hf_device_map["model.layers.1"] == "disk"


def test_device_map_options_refused_in_one_line(run_cli, models, tmp_path: Path) -> None:
    for args, expected in (
        (["--max-memory", "cpu=1GB"], "add --device-map auto"),
        (["--device-map", "auto", "--max-memory", "lots"], "DEVICE=SIZE pairs"),
        (["--device-map", "auto", "--max-memory", "cpu=many"], "cannot read size"),
        (["--device-map", "auto", "--offload-folder", next(models["corpus"].glob("*.txt"))], "is a file"),
    ):
        code, _, err = run_eval(run_cli, models["mqa"], "--no-speed", *args)
        assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, (args, err)


def test_several_texts_are_reported_each_and_as_their_mean(run_cli, models, tmp_path: Path) -> None:
    """--data NAME=DATA ...: one table row per text (what `eval` of that text alone gives), the mean weighing each
    text the same, the --data.* settings applied to each, and --compare showing each text's figures."""
    other = write_corpus(tmp_path / "other", 20, seed=9)
    both, alone = tmp_path / "both.json", tmp_path / "alone.json"
    common = ["--reference", models["mha"], "--data.seq_len=32", "--max-tokens", "300", "--no-speed"]
    code, stdout, err = run_eval(run_cli, models["mqa"], "--data", f"plays={models['corpus']}/*.txt",
                                 f"more={other}/*.txt", *common, "--json", both)  # fmt: skip
    assert code == 0, err
    result = json.loads(both.read_text())
    assert [d["label"] for d in result["domains"]] == ["plays", "more"]
    code, _, err = run_eval(run_cli, models["mqa"], f"--data.files=[{other}/*.txt]", *common, "--json", alone)
    assert code == 0, err
    assert result["domains"][1]["quality"] == pytest.approx(json.loads(alone.read_text())["quality"], rel=1e-6)
    assert result["domains"][1]["data"]["window"] == 32  # --data.seq_len applied to each text
    kls = [d["quality"]["kl"] for d in result["domains"]]
    assert result["quality"]["kl"] == pytest.approx(sum(kls) / 2)
    nll = sum(d["quality"]["nll"] for d in result["domains"]) / 2
    assert result["quality"]["perplexity"] == pytest.approx(math.exp(nll))
    assert result["data"]["tokens"] == sum(d["data"]["tokens"] for d in result["domains"])
    assert "| text | tokens | perplexity | reference perplexity | KL(reference ‖ model) | top-1 |" in stdout
    assert f"| more | {result['domains'][1]['data']['tokens']:,} |" in stdout and "| mean of 2 |" in stdout
    assert "| KL(reference ‖ model) (mean of 2 texts) |" in stdout
    code, stdout, err = run_cli("eval", "--compare", str(both), str(alone))
    assert code == 0 and "| more: KL |" in stdout, err
    code, _, err = run_eval(run_cli, models["mqa"], "--data", f"x={other}/*.txt", f"--data.files=[{other}/*.txt]")
    assert code == 1 and "--data NAME=DATA names the held-out texts; --data.files would name them again" in err, err


def step_checkpoint(root: Path, model: Path) -> Path:
    """A step checkpoint of `uptrain train`, as accelerate and uptrain lay it out (no config.json)."""
    step = root / "run" / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (step / "optimizer.bin").write_bytes(b"optimizer state")
    (step / "train_state.json").write_text(json.dumps({"step": 10, "tokens": 2560}))
    (step / "uptrain_train.yaml").write_text(f"model:\n  path: {model}\n")
    return step


@pytest.mark.parametrize("role", ["model", "reference"])
def test_a_step_checkpoint_is_pointed_to_export(run_cli, models, tmp_path: Path, role: str) -> None:
    step = step_checkpoint(tmp_path, models["gqa"])
    args = [step, "--reference", models["mha"]] if role == "model" else [models["gqa"], "--reference", step]
    code, _, err = run_eval(run_cli, *args, "--no-speed", f"--data.files=[{models['corpus']}/*.txt]")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "model_type" not in err, err
    assert f"{step} is a training step checkpoint" in err and f"`uptrain export {step} OUT`" in err, err


def test_a_run_folder_is_pointed_to_its_model(run_cli, models, tmp_path: Path) -> None:
    import shutil

    run = step_checkpoint(tmp_path, models["gqa"]).parent.parent
    (run / "uptrain_train.yaml").write_text("out: run\n")
    shutil.copytree(models["gqa"], run / "model")
    code, _, err = run_eval(run_cli, run, "--no-speed")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"{run} is a training run folder" in err and f"give its model folder, {run / 'model'}" in err, err


@pytest.mark.parametrize(
    ("gpus", "args", "expected"),
    [
        (0, ["--device-map", "auto", "--max-memory", "0=1GB"], "--max-memory 0=1GB names GPU 0, but there is no GPU"),
        (0, ["--device-map", "cuda:1"], "--device-map cuda:1 names GPU 1, but there is no GPU"),
        (0, ["--device-map", "cuda"], "--device-map cuda names GPU 0, but there is no GPU"),
        (1, ["--device-map", "cuda:1"], "--device-map cuda:1 names GPU 1, but there is only 1 GPU (0)"),
        (2, ["--device-map", "auto", "--max-memory", "0=1GB,2=1GB,cpu=1GB"], "names GPU 2, but there are only 2"),
    ],
)
def test_device_map_naming_a_gpu_that_is_not_here_is_refused_in_one_line(
    run_cli, models, monkeypatch, gpus: int, args: list, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    code, _, err = run_eval(run_cli, models["mqa"], "--no-speed", *args)
    assert code == 1 and expected in err and len(err.strip().splitlines()) == 1, err
    assert "run on a machine with" in err, err
