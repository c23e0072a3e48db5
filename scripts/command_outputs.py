"""What every command prints on the family matrix, normalised, so that two versions of uptrain can be diffed.

    python -m scripts.command_outputs --out outputs-new
    PYTHONPATH=OLD_TREE python -m scripts.command_outputs --module uptrain --out outputs-old   # an older tree
    diff -r outputs-old outputs-new

For each family of the suite's matrix (tests/families.py): `inspect` of the source, `convert` to its G (the
default, mean pooling), `inspect` and `plan` of the result, and a calibrated, refined `convert --method svd`;
for the Llama case also every method x grouping x dtype, `plan --quality`, `eval` against the source, a
two-step `train`, its resume, the same run sharded over two processes (FSDP2 on gloo) and `export` of both
runs' step checkpoints. Paths, times, speeds and versions are replaced by placeholders; each command's exit
status, stdout and stderr go to OUT/FAMILY/COMMAND.txt, followed by the SHA-256 of every file the command
wrote (text files normalised the same way first; logs of times and speeds left out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests import ROOT, free_port
from tests.families import CASES, build

PLACEHOLDERS = [
    (re.compile(r"\d+(\.\d+)? ?(s|ms)\b(?!tep)"), "<time>"),
    (re.compile(r"[\d.,]+ ?[kMG]?(B|token|step|it|examples|files|layer|window)s?/s"), "<speed>"),
    (re.compile(r"\d{2}:\d{2}(:\d{2})?(<\d{2}:\d{2})?"), "<clock>"),
    (re.compile(r"uptrain \d+\.\d+\.\d+"), "uptrain <version>"),
]


def normalise(text: str, work: Path) -> str:
    text = text.replace(str(work), "<work>").replace(str(work.resolve()), "<work>")
    for pattern, placeholder in PLACEHOLDERS:
        text = pattern.sub(placeholder, text)
    text = text.replace("<time>/step", "<speed>")  # tqdm shows s/step or step/s, whichever is above 1
    lines = [re.sub(r" {2,}", " ", line) if "<clock>" in line else line for line in text.splitlines()]
    return "\n".join(line.rstrip() for line in lines) + "\n"


VOLATILE = frozenset({"seconds", "time", "started", "ended", "tracker_run_id", "tokens_per_s", "elapsed"})
"""Keys of uptrain's JSON records whose values are clock readings or random ids: replaced before hashing."""


def _steady(value: object) -> object:
    if isinstance(value, dict):
        return {k: "<volatile>" if k in VOLATILE else _steady(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def steady_json(text: str) -> str:
    """A JSON document (or JSON lines) with the VOLATILE keys' values replaced."""
    try:
        return json.dumps(_steady(json.loads(text)), sort_keys=True)
    except json.JSONDecodeError:
        return "\n".join(json.dumps(_steady(json.loads(line)), sort_keys=True) for line in text.splitlines() if line)


# files whose content is times, speeds or random ids (DCP's save id): listed, not hashed
UNHASHED = re.compile(r"(events\.out\..*|loss\.png|\.lock|launch\.json|/\.metadata)$")
TEXT = re.compile(r"\.(json|jsonl|yaml|yml|md|txt|csv)$")


def digests(folder: Path, work: Path) -> str:
    """One line per file under FOLDER: its relative path and the SHA-256 of its (normalised) bytes."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if UNHASHED.search(rel):
            lines.append(f"{rel} (not hashed)")
            continue
        data = path.read_bytes()
        if TEXT.search(rel):
            text = data.decode()
            data = normalise(steady_json(text) if rel.endswith((".json", ".jsonl")) else text, work).encode()
        lines.append(f"{rel} {hashlib.sha256(data).hexdigest()}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the outputs (one file per command)")
    ap.add_argument("--module", default="uptrain_gqa", help="the package to run as `python -m MODULE`")
    ap.add_argument("--only", nargs="*", help="these families only (ids of tests/families.py); default: all")
    args = ap.parse_args()
    from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

    with tempfile.TemporaryDirectory(prefix="uptrain-outputs-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus", docs=120)

        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

        def run(family: str, name: str, *argv: object, wrote: Path | None = None, launch: tuple = ()) -> None:
            cmd = [sys.executable, *launch, "-m", args.module, *(str(a) for a in argv)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=900, env=env)
            text = f"$ uptrain {' '.join(str(a) for a in argv)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}"
            text += f"--- stderr\n{proc.stderr}"
            text = normalise(text, work)
            if wrote is not None and wrote.exists():
                text += f"--- files\n{digests(wrote, work)}"
            target = args.out / family / f"{name}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

        for case in [c for c in CASES if not args.only or c.id in args.only]:
            src, out = work / case.id / "src", work / case.id / "out"
            build(case).save_pretrained(src)
            run(case.id, "1-inspect-source", "inspect", src)
            run(case.id, "2-convert", "convert", src, out, "--num-kv-heads", case.groups, wrote=out)
            svd = work / case.id / "svd"
            run(case.id, "2b-convert-svd-refined", "convert", src, svd, "--num-kv-heads", case.groups,
                "--method", "svd", "--calibration", "random", "--calibration-tokens", 256,
                "--refine-steps", 3, wrote=svd)  # fmt: skip
            run(case.id, "3-inspect-converted", "inspect", out)
            run(case.id, "4-plan", "plan", src, "--memory", "1GB", "--context", "64", "--batch", "2")
            if case.model_type == "llama" and case.id == CASES[0].id:
                for method in ("mean", "first", "random", "svd"):
                    for grouping in ("contiguous", "similarity"):
                        for dtype in ("float32", "bfloat16"):
                            name = f"{method}-{grouping}-{dtype}"
                            folder = work / case.id / name
                            reads = method == "svd" or grouping == "similarity"  # others refuse --calibration
                            calibration = ["--calibration", "random", "--calibration-tokens", 256] if reads else []
                            run(case.id, f"4b-convert-{name}", "convert", src, folder, "--num-kv-heads", 2,
                                "--method", method, "--grouping", grouping, "--dtype", dtype, *calibration,
                                wrote=folder)  # fmt: skip
                run(case.id, "4c-plan-quality", "plan", src, "--memory", "1GB", "--context", "64", "--batch", "2",
                    "--quality", "random", "--quality-tokens", 256, "--calibration", "random",
                    "--calibration-tokens", 256)  # fmt: skip
                save_word_tokenizer(src)
                run(case.id, "5-convert-with-tokenizer", "convert", src, work / "llama-gqa", "--num-kv-heads", 2,
                    wrote=work / "llama-gqa")  # fmt: skip
                run(case.id, "6-eval", "eval", work / "llama-gqa", "--reference", src,
                    f"--data.files=[{corpus}/*.txt]", "--max-tokens", 300, "--no-speed")  # fmt: skip
                config = work / "run.yaml"  # a file: versions before 0.2 needed one
                config.write_text(yaml.safe_dump({
                    "model": {"path": str(work / "llama-gqa")}, "budget": {"steps": 2}, "out": str(work / "run"),
                    "data": {"files": [f"{corpus}/*.txt"], "seq_len": 32, "validation_blocks": 4},
                    "batch": {"global_batch_size": 4}, "logging": {"trackers": []},
                }))  # fmt: skip
                run(case.id, "7-train", "train", config, "--checkpoint.every=1", wrote=work / "run")
                run(case.id, "8-train-resume", "train", config, "--checkpoint.every=1", "--budget.steps=3",
                    "--resume", wrote=work / "run")  # fmt: skip
                step = work / "run" / "checkpoints" / "step-00000002"
                run(case.id, "9-export", "export", step, work / "exported", wrote=work / "exported")
                fsdp = ("-m", "accelerate.commands.launch", "--config_file",
                        str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
                        "--main_process_port", str(free_port()))  # fmt: skip
                run(case.id, "10-train-fsdp2", "train", config, "--checkpoint.every=1", "--batch.micro_batch_size=2",
                    "--out", work / "fsdp2",
                    wrote=work / "fsdp2", launch=fsdp)  # fmt: skip
                step = work / "fsdp2" / "checkpoints" / "step-00000002"
                run(case.id, "11-export-fsdp2", "export", step, work / "exported-fsdp2",
                    wrote=work / "exported-fsdp2")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
