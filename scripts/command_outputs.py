"""What every command prints on the family matrix, normalised, so that two versions of uptrain can be diffed.

    python -m scripts.command_outputs --out outputs-new
    PYTHONPATH=OLD_TREE python -m scripts.command_outputs --module uptrain --out outputs-old   # an older tree
    diff -r outputs-old outputs-new

For each family of the suite's matrix (tests/families.py): `inspect` of the source, `convert` to its G (the
default, mean pooling), `inspect` and `plan` of the result; for the Llama case also `eval` against the source
and a two-step `train`. Paths, times, speeds and versions are replaced by placeholders; each command's exit
status, stdout and stderr go to OUT/FAMILY/COMMAND.txt.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.families import CASES, build

PLACEHOLDERS = [
    (re.compile(r"\d+(\.\d+)? ?(s|ms)\b(?!tep)"), "<time>"),
    (re.compile(r"[\d.,]+ ?[kMG]?(B|token|step|it|examples|files)/s"), "<speed>"),
    (re.compile(r"\d{2}:\d{2}(:\d{2})?(<\d{2}:\d{2})?"), "<clock>"),
    (re.compile(r"uptrain \d+\.\d+\.\d+"), "uptrain <version>"),
]


def normalise(text: str, work: Path) -> str:
    text = text.replace(str(work), "<work>").replace(str(work.resolve()), "<work>")
    for pattern, placeholder in PLACEHOLDERS:
        text = pattern.sub(placeholder, text)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the outputs (one file per command)")
    ap.add_argument("--module", default="uptrain_gqa", help="the package to run as `python -m MODULE`")
    args = ap.parse_args()
    from uptrain_gqa.synthetic import save_word_tokenizer, write_corpus

    with tempfile.TemporaryDirectory(prefix="uptrain-outputs-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus", docs=120)

        def run(family: str, name: str, *argv: object) -> None:
            cmd = [sys.executable, "-m", args.module, *(str(a) for a in argv)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=900)
            text = f"$ uptrain {' '.join(str(a) for a in argv)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}"
            text += f"--- stderr\n{proc.stderr}"
            target = args.out / family / f"{name}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(normalise(text, work))

        for case in CASES:
            src, out = work / case.id / "src", work / case.id / "out"
            build(case).save_pretrained(src)
            run(case.id, "1-inspect-source", "inspect", src)
            run(case.id, "2-convert", "convert", src, out, "--num-kv-heads", case.groups)
            run(case.id, "3-inspect-converted", "inspect", out)
            run(case.id, "4-plan", "plan", src, "--memory", "1GB", "--context", "64", "--batch", "2")
            if case.model_type == "llama" and case.id == CASES[0].id:
                save_word_tokenizer(src)
                run(case.id, "5-convert-with-tokenizer", "convert", src, work / "llama-gqa", "--num-kv-heads", 2)
                run(case.id, "6-eval", "eval", work / "llama-gqa", "--reference", src,
                    f"--data.files=[{corpus}/*.txt]", "--max-tokens", 300, "--no-speed")  # fmt: skip
                config = work / "run.yaml"  # a file: versions before 0.2 needed one
                config.write_text(yaml.safe_dump({
                    "model": {"path": str(work / "llama-gqa")}, "budget": {"steps": 2}, "out": str(work / "run"),
                    "data": {"files": [f"{corpus}/*.txt"], "seq_len": 32, "validation_blocks": 4},
                    "batch": {"global_batch_size": 4}, "logging": {"trackers": []},
                }))  # fmt: skip
                run(case.id, "7-train", "train", config)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
