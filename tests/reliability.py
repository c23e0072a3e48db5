"""Every command against damaged and wrong inputs, as a new user would type them (tests/test_reliability.py).

Each case runs `python -m uptrain_gqa ...` in a fresh process (what a user sees), on a tiny Llama built here.
Expected: exit 1 with a last line `uptrain CMD: error: ...` (2 with `usage:` for a malformed command
line, 141 and nothing on stderr for a closed stdout), never a traceback, and no file of the user's replaced
nor an output of a failed run left behind. The inputs live at fixed places under one folder (`inputs`), so the
cases can be listed before anything is built, one test each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    status: int = 1
    close_stdout: bool = False
    untouched: tuple[Path, ...] = ()
    """Files the case must leave byte for byte (the targets of links planted where uptrain writes)."""
    absent: tuple[Path, ...] = ()
    """Paths the case must not leave behind (an output of a run that failed)."""


COPIES = (
    "truncated_shard", "no_config", "config_not_json", "readme_not_utf8", "index_names_missing", "unsupported_family",
    "pickle_only", "ckpt_config_not_yaml", "ckpt_truncated_optimizer", "ckpt_bad_state", "ckpt_truncated_weights",
    "ckpt_sharded_without_launcher", "run_bad_record", "nan_q_proj", "head_dim_mismatch", "no_tokenizer",
    "side_file_link", "nan_teacher",
)  # fmt: skip
"""Copies of a base input, each broken in one way (WORK/damaged/NAME)."""
TEXTS = ("null.jsonl", "number.jsonl", "no_text.jsonl", "empty.txt", "binary.txt", "few.jsonl")
"""Broken text files (WORK/damaged/texts/NAME)."""


def inputs(work: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Where the base inputs and the damaged ones live under WORK (made by `make_inputs`)."""
    base = {"mha": work / "mha", "gqa": work / "gqa", "corpus": work / "corpus", "config": work / "run.yaml",
            "run": work / "run"}  # fmt: skip
    damaged = work / "damaged"
    bad = {name: damaged / name for name in COPIES} | {name: damaged / "texts" / name for name in TEXTS}
    bad |= {"victim": damaged / "victim.txt", "text_dir": base["corpus"], "held": damaged / "held"}
    return base, bad


def make_inputs(work: Path) -> None:
    """Build every input the cases read: the base ones, then their damaged copies."""
    base, bad = inputs(work)
    build(base)
    damage(work, base, bad)


def build(base: dict[str, Path]) -> None:
    """The inputs the cases damage: a tiny MHA source, its GQA conversion, text, a trained run."""
    from uptrain_gqa import convert
    from uptrain_gqa.synthetic import save_tiny_llama, save_word_tokenizer, write_corpus

    mha = save_tiny_llama(base["mha"])
    save_word_tokenizer(mha)
    gqa = base["gqa"]
    convert(src=str(mha), out=str(gqa), num_kv_heads=2)
    corpus = write_corpus(base["corpus"], docs=300)
    cfg = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    cfg["model"]["path"] = str(gqa)
    cfg["data"]["files"] = [str(corpus / "*.txt")]
    cfg["budget"]["steps"] = 10
    cfg["checkpoint"]["every"] = 10
    cfg["out"] = str(base["run"])
    base["config"].write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "uptrain_gqa", "train", str(base["config"])], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, f"the reference run failed:\n{done.stderr[-2000:]}"


def damage(work: Path, base: dict[str, Path], d: dict[str, Path]) -> None:
    """Copies of the inputs, each broken in one way, at the places `inputs` names."""

    def copy(name: str, src: Path) -> Path:
        shutil.copytree(src, d[name])
        return d[name]

    shard = sorted(base["mha"].glob("model-*.safetensors"))[0]
    os.truncate(copy("truncated_shard", base["mha"]) / shard.name, 100)
    (copy("no_config", base["mha"]) / "config.json").unlink()
    (copy("config_not_json", base["mha"]) / "config.json").write_text("{not json")
    (copy("readme_not_utf8", base["mha"]) / "README.md").write_bytes(b"\xff\xfe caf\xe9")
    index = copy("index_names_missing", base["mha"]) / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.extra.weight"] = shard.name
    index.write_text(json.dumps(data))
    gpt2 = copy("unsupported_family", base["mha"]) / "config.json"
    gpt2.write_text(json.dumps({**json.loads(gpt2.read_text()), "model_type": "gpt2"}))
    pickled = copy("pickle_only", base["gqa"])
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not a torch pickle at all")
    step = base["run"] / "checkpoints" / "step-00000010"
    (copy("ckpt_config_not_yaml", step) / "uptrain_train.yaml").write_text("- just\n- a list\n")
    os.truncate(copy("ckpt_truncated_optimizer", step) / "optimizer.bin", 50)
    (copy("ckpt_bad_state", step) / "train_state.json").write_text("{")
    os.truncate(copy("ckpt_truncated_weights", step) / "model.safetensors", 200)
    sharded = copy("ckpt_sharded_without_launcher", step)
    (sharded / "model.safetensors").unlink()
    (sharded / "sharded").mkdir()
    (sharded / "sharded" / ".metadata").write_bytes(b"\0" * 16)
    (copy("run_bad_record", base["run"]) / "uptrain_run.json").write_text("{broken")
    d["empty.txt"].parent.mkdir(parents=True)
    for name, rows in {
        "null.jsonl": [{"text": "a b c"}, {"text": None}],
        "number.jsonl": [{"text": 42}],
        "no_text.jsonl": [{"body": "a b c"}],
    }.items():
        d[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    d["empty.txt"].write_text("   \n")
    round_three(work, base, d, copy)


def round_three(work: Path, base: dict[str, Path], d: dict[str, Path], copy: Any) -> None:
    """Inputs of the third round: planted links, a NaN weight, a config that disagrees with the weights, a
    source without tokenizer, binary and folder calibration text, a training glob that names its validation."""
    import gzip

    from safetensors.torch import load_file, save_file

    d["victim"].write_text("a file of the user's that no command may write\n")
    nan = copy("nan_q_proj", base["mha"])
    for shard in nan.glob("model-*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if "layers.0.self_attn.q_proj" in name:
                t.view(-1)[0] = float("nan")
        save_file(tensors, shard, metadata={"format": "pt"})
    config = copy("head_dim_mismatch", base["mha"]) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "head_dim": 4}))
    bare = copy("no_tokenizer", base["mha"])
    for f in bare.glob("tokenizer*"):
        f.unlink()
    link = copy("side_file_link", base["mha"]) / "tokenizer_config.json"
    link.unlink()
    link.symlink_to(d["victim"])
    d["binary.txt"].write_bytes(gzip.compress(b"the river runs past a small house\n" * 200))
    held = d["held"]
    held.mkdir()
    for i, f in enumerate(sorted(base["corpus"].glob("*.txt"))[:40]):
        shutil.copy(f, held / ("val.txt" if i == 0 else f.name))
    d["few.jsonl"].write_text("".join(json.dumps({"text": f"the moon {i}"}) + "\n" for i in range(3)))
    teacher = copy("nan_teacher", base["mha"])
    for shard in teacher.glob("model-*.safetensors"):
        tensors = {n: t.fill_(float("nan")) if "layers.0.mlp" in n else t for n, t in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    # links planted where uptrain writes (round three's cases), and the old fixed temporary name of eval --json
    out = work / "outs"
    out.mkdir(parents=True, exist_ok=True)
    (out / ".c30.uptrain.lock").symlink_to(d["victim"])
    (out / "linked.json").symlink_to(d["victim"])
    (out / ".r31.json.uptrain-tmp").symlink_to(d["victim"])


def cases(work: Path) -> list[Case]:
    """Every case, with the paths `inputs` gives under WORK (nothing is read or made here)."""
    base, bad = inputs(work)
    out = work / "outs"
    mha, gqa, cfg, step = base["mha"], base["gqa"], base["config"], base["run"] / "checkpoints" / "step-00000010"
    conv = ["--num-kv-heads", "2", "--quiet"]
    train = ["train", str(cfg)]

    def o(name: str) -> str:  # a fresh output path per case
        return str(out / name)

    c = [
        # convert
        Case("convert: missing source", ["convert", str(work / "nope"), o("c1"), *conv]),
        Case("convert: no config.json", ["convert", str(bad["no_config"]), o("c2"), *conv]),
        Case("convert: config.json not JSON", ["convert", str(bad["config_not_json"]), o("c3"), *conv]),
        Case("convert: G does not divide the heads", ["convert", str(mha), o("c4"), "--num-kv-heads", "3"]),
        Case("convert: truncated shard", ["convert", str(bad["truncated_shard"]), o("c5"), *conv]),
        Case("convert: index names a missing tensor", ["convert", str(bad["index_names_missing"]), o("c6"), *conv]),
        Case("convert: OUT exists", ["convert", str(mha), str(gqa), *conv]),
        Case("convert: OUT is a file", ["convert", str(mha), str(bad["empty.txt"]), *conv]),
        Case("convert: pickle-only source", ["convert", str(bad["pickle_only"]), o("c9"), "--num-kv-heads", "1"]),
        Case(
            "convert: pickle weights_only rejects",
            ["convert", str(bad["pickle_only"]), o("c9b"), "--num-kv-heads", "1", "--allow-pickle"],
        ),
        Case("convert: unsupported family", ["convert", str(bad["unsupported_family"]), o("c10"), *conv]),
        Case(
            "convert: empty calibration",
            ["convert", str(mha), o("c11"), *conv, "--method", "svd", "--calibration", str(bad["empty.txt"])],
        ),
        Case(
            "convert: missing calibration file",
            ["convert", str(mha), o("c12"), *conv, "--method", "svd", "--calibration", str(work / "nope.txt")],
        ),
        Case("convert: Hub id offline", ["convert", "meta-llama/Llama-2-7b-hf", o("c13"), *conv]),
        Case("convert: bad --push-to-hub name", ["convert", str(mha), o("c14"), *conv, "--push-to-hub", "me/a--b"]),
        Case("convert: non-UTF-8 README", ["convert", str(bad["readme_not_utf8"]), o("c15"), *conv], status=0),
        Case("convert: WORLD_SIZE=abc", ["convert", str(mha), o("c16"), *conv], env={"WORLD_SIZE": "abc"}),
        # an empty variable is an unset one, as in the shell: the conversion runs
        Case("convert: WORLD_SIZE empty", ["convert", str(mha), o("c17"), *conv], env={"WORLD_SIZE": ""}, status=0),
        Case("convert: --num-kv-heads abc", ["convert", str(mha), o("c18"), "--num-kv-heads", "abc"], status=2),
        # inspect
        Case("inspect: missing folder", ["inspect", str(work / "nope")]),
        Case("inspect: config not JSON", ["inspect", str(bad["config_not_json"])]),
        Case("inspect: stdout closed early", ["inspect", str(mha)], status=141, close_stdout=True),
        # train
        Case("train: missing config", ["train", str(work / "nope.yaml")]),
        Case("train: config not a mapping", ["train", str(bad["ckpt_config_not_yaml"] / "uptrain_train.yaml")]),
        Case("train: unknown key", [*train, "--optim.lrr=1"]),
        Case("train: malformed override", [*train, "--optim.lr=[1,"]),
        Case("train: YAML tag in override", [*train, "--optim.lr=!!python/object:os.system x"]),
        Case("train: unknown tracker", [*train, "--logging.trackers=[tensorbaord]"]),
        Case("train: out is the model", [*train, f"--out={gqa}"]),
        Case("train: files match nothing", [*train, f"--data.files=[{work / 'nothing'}/*.txt]", f"--out={o('t1')}"]),
        Case("train: text null", [*train, f"--data.files=[{bad['null.jsonl']}]", f"--out={o('t2')}"]),
        Case("train: text a number", [*train, f"--data.files=[{bad['number.jsonl']}]", f"--out={o('t3')}"]),
        Case("train: no text column", [*train, f"--data.files=[{bad['no_text.jsonl']}]", f"--out={o('t4')}"]),
        Case(
            "train: mixture weights overflow",
            [
                *train,
                f"--out={o('t5')}",
                "--data.files=[]",
                f"--data.mixture=[{{label: a, weight: 1e308, files: [{base['corpus']}/*.txt]}}, "
                f"{{label: b, weight: 1e308, files: [{base['corpus']}/*.txt]}}]",
            ],
        ),
        Case(
            "train: mixture source matches nothing (dry run)",
            [
                *train,
                "--dry-run",
                "--data.files=[]",
                f"--data.mixture=[{{label: a, weight: 1, files: [{work / 'nothing'}/*.txt]}}]",
            ],
        ),
        Case("train: resume a non-checkpoint", [*train, f"--out={o('t6')}", "--resume", str(work)]),
        Case(
            "train: resume, saved config a list",
            [*train, f"--out={o('t7')}", "--resume", str(bad["ckpt_config_not_yaml"])],
        ),
        Case(
            "train: resume, truncated optimizer",
            [*train, f"--out={o('t8')}", "--resume", str(bad["ckpt_truncated_optimizer"])],
        ),
        Case(
            "train: resume, bad train_state.json", [*train, f"--out={o('t9')}", "--resume", str(bad["ckpt_bad_state"])]
        ),
        Case(
            "train: resume, sharded without launcher",
            [*train, f"--out={o('t10')}", "--resume", str(bad["ckpt_sharded_without_launcher"])],
        ),
        Case(
            "train: resume, corrupt uptrain_run.json",
            [*train, f"--out={bad['run_bad_record']}", "--resume", "auto", "--budget.steps=12"],
            status=0,
        ),
        Case("train: pickle model", [*train, f"--model.path={bad['pickle_only']}", f"--out={o('t11')}"]),
        Case("train: NNODES=two", [*train, "--dry-run"], env={"NNODES": "two"}, status=0),
        # eval
        Case("eval: missing model", ["eval", str(work / "nope"), "--no-speed"]),
        Case("eval: missing reference", ["eval", str(gqa), "--reference", str(work / "nope"), "--no-speed"]),
        Case("eval: pickle model", ["eval", str(bad["pickle_only"]), "--no-speed"]),
        Case(
            "eval: --log-samples cannot be created",
            ["eval", str(gqa), "--tasks", "arc_easy", "--log-samples", str(bad["empty.txt"] / "x")],
        ),
        Case(
            "eval: --tasks-include missing", ["eval", str(gqa), "--tasks", "x", "--tasks-include", str(work / "nope")]
        ),
        Case("eval: --json under a file", ["eval", str(gqa), "--json", str(bad["empty.txt"] / "r.json"), "--no-speed"]),
        Case("eval: malformed override", ["eval", str(gqa), "--data.seq_len=[1,"]),
        Case("eval: text null", ["eval", str(gqa), f"--data.files=[{bad['null.jsonl']}]", "--no-speed"]),
        Case("eval: no text column", ["eval", str(gqa), f"--data.files=[{bad['no_text.jsonl']}]", "--no-speed"]),
        # export
        Case("export: not a checkpoint", ["export", str(base["run"]), o("e1")]),
        Case("export: truncated weights", ["export", str(bad["ckpt_truncated_weights"]), o("e2")]),
        Case("export: bad train_state.json", ["export", str(bad["ckpt_bad_state"]), o("e3")]),
        Case("export: damaged sharded", ["export", str(bad["ckpt_sharded_without_launcher"]), o("e4")]),
        Case("export: OUT exists", ["export", str(step), str(gqa)]),
        Case("export: bad --push-to-hub name", ["export", str(step), o("e5"), "--push-to-hub", "x.git"]),
        # plan
        Case("plan: bad memory", ["plan", str(gqa), "--memory", "80XB"]),
        Case("plan: missing model", ["plan", str(work / "nope"), "--memory", "80GB"]),
        Case("plan: unknown option", ["plan", "--frobnicate"], status=2),
        *round_three_cases(work, base, bad, o),
    ]
    return c


def round_three_cases(work: Path, base: dict[str, Path], bad: dict[str, Path], o: Any) -> list[Case]:
    """Planted links and special files, validation that trains, plan --quality as careful as convert,
    refinement and calibration limits, teachers, step checkpoints, placement without a GPU."""
    mha, gqa, cfg, victim = base["mha"], base["gqa"], base["config"], bad["victim"]
    out = work / "outs"
    svd = ["--num-kv-heads", "2", "--quiet", "--method", "svd"]
    quality = ["--memory", "1GB", "--quality", "random", "--quality-tokens", "256", "--quiet"]
    json_link = out / "linked.json"  # planted by `damage`, as the lock and eval's old temporary name
    step = base["run"] / "checkpoints" / "step-00000010"
    teach = ["train", str(cfg), "--budget.steps=2"]
    return [
        Case("convert: a link planted at the lock", ["convert", str(mha), o("c30"), "--num-kv-heads", "2"],
             untouched=(victim,), absent=(out / "c30",)),
        Case("convert: a side file linking out of the source",
             ["convert", str(bad["side_file_link"]), o("c31"), "--num-kv-heads", "2"], untouched=(victim,),
             absent=(out / "c31",)),
        Case("eval: --json a symlink", ["eval", str(gqa), "--no-speed", "--json", str(json_link)], untouched=(victim,)),
        Case("eval: a link at the old temporary name", ["eval", str(gqa), "--no-speed", "--json", o("r31.json")],
             status=0, untouched=(victim,)),
        Case("convert: --refine-lr 1e308", ["convert", str(mha), o("c32"), *svd, "--calibration", "random",
                                             "--refine-steps", "2", "--refine-lr", "1e308"], absent=(out / "c32",)),
        Case("convert: --refine-lr inf", ["convert", str(mha), o("c33"), *svd, "--calibration", "random",
                                           "--refine-steps", "2", "--refine-lr", "inf"]),
        Case("convert: 10^12 random calibration tokens", ["convert", str(mha), o("c34"), *svd, "--calibration",
                                                           "random", "--calibration-tokens", str(10**12)]),
        Case("convert: one random calibration token",
             ["convert", str(mha), o("c35"), *svd, "--calibration", "random", "--calibration-tokens", "1"]),
        Case("convert: --calibration-subset with local files",
             ["convert", str(mha), o("c36"), *svd, "--calibration", str(base["corpus"] / "*.txt"),
              "--calibration-subset", "en"]),
        Case("convert: binary calibration text", ["convert", str(mha), o("c37"), *svd, "--calibration",
                                                   str(bad["binary.txt"])]),
        Case("convert: --calibration a folder", ["convert", str(mha), o("c38"), *svd, "--calibration",
                                                  str(bad["text_dir"])]),
        Case("plan: --quality on a NaN q_proj", ["plan", str(bad["nan_q_proj"]), *quality]),
        Case("plan: --quality, head_dim disagrees", ["plan", str(bad["head_dim_mismatch"]), *quality]),
        Case("plan: --quality text without a tokenizer",
             ["plan", str(bad["no_tokenizer"]), "--memory", "1GB", "--quality", str(base["corpus"] / "*.txt")]),
        Case("plan: --quality-tokens 10^12", ["plan", str(mha), "--memory", "1GB", "--quality", "random",
                                               "--quality-tokens", str(10**12)]),
        Case("plan: --plot p.txt", ["plan", str(mha), "--plot", o("p.txt")]),
        Case("eval: --max-memory naming GPU 0, none here",
             ["eval", str(gqa), "--no-speed", "--device-map", "auto", "--max-memory", "0=1GB"]),
        Case("eval: --device-map cuda:1, no GPU", ["eval", str(gqa), "--no-speed", "--device-map", "cuda:1"]),
        Case("eval: a step checkpoint", ["eval", str(step), "--no-speed"]),
        Case("export: a checkpoint rotated away", ["export", str(step.parent / "step-00000005"), o("e30")]),
        Case("train: the validation files inside the training glob",
             [*teach, f"--data.files=[{bad['held']}/*.txt]", f"--data.validation_files=[{bad['held']}/val.txt]",
              f"--out={o('t30')}"], status=0),
        Case("train: a teacher that is the student", [*teach, f"--distill.teacher={gqa}/", f"--out={o('t31')}"],
             absent=(out / "t31",)),
        Case("train: a NaN teacher", [*teach, f"--distill.teacher={bad['nan_teacher']}", f"--out={o('t32')}"],
             absent=(out / "t32",)),
        Case("train: a teacher given as its config.json",
             [*teach, f"--distill.teacher={mha / 'config.json'}", f"--out={o('t33')}"]),
        Case("train: fails before its first step", [*teach, f"--data.files=[{bad['no_text.jsonl']}]",
                                                     f"--out={o('t34')}/deep/run"], absent=(out / "t34",)),
        Case("train: a streamed mixture too small to hold out",
             [*teach, "--data.files=[]", "--data.streaming=true",
              f"--data.mixture=[{{label: web, weight: 1, files: [{bad['few.jsonl']}]}}]", f"--out={o('t35')}"]),
    ]  # fmt: skip


def run_case(case: Case) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **case.env}
    before = {p: p.read_bytes() for p in case.untouched}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uptrain_gqa", *case.args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    if case.close_stdout:
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait()
    else:
        _, err = proc.communicate()
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "step/s]" not in line]
    last = lines[-1] if lines else ""
    traceback = "Traceback (most recent call last)" in err
    command = case.args[0]
    if case.status == 0:
        said = True
    elif case.status == 2:
        said = last.startswith(f"uptrain {command}: error:") or last.startswith("uptrain: error:")
    elif case.status == 141:
        said = not err.strip()
    else:
        said = last.startswith(f"uptrain {command}: error: ")
    replaced = [str(p) for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
    replaced += [str(p) for p in case.absent if p.exists() or p.is_symlink()]
    return {
        "case": case.name,
        "status": proc.returncode,
        "replaced_or_left": replaced,
        "expected": case.status,
        "traceback": traceback,
        "one_line": said,
        "ok": proc.returncode == case.status and not traceback and said and not replaced,
        "seconds": round(time.monotonic() - start, 1),
        "last_line": last[:300],
    }
