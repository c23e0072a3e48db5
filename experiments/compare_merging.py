"""Mean pooling against least-squares merging (`--method svd`) on the built-in source model.

For GQA (H/4 KV heads) and MQA, converts the demo's MHA source with mean pooling and with svd
(weights only; calibrated on training text; calibrated with similarity grouping), evaluates each
on the held-out plays right after conversion, then uptrains each for alpha = 5 % and evaluates
again (similarity grouping is skipped for MQA: one group leaves nothing to choose). Writes
results.json and results.md into --out.

    python -m experiments.compare_merging --out merging-out        # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from uptrain_gqa.demo.pipeline import Pipeline, run_in_process
from uptrain_gqa.io.folders import read_config
from uptrain_gqa.model.shape import shape_of_config_json

EVAL = ["--max-tokens", "20000", "--window", "256", "--stride", "192"]  # as experiments/reproduce_gqa_paper.py
CALIBRATION = ["--calibration", "{train}", "--calibration-tokens", "65536"]
VARIANTS = {  # name -> (--method, further `uptrain convert` arguments)
    "mean": ("mean", []),
    "svd, weights only": ("svd", ["--calibration", "none"]),
    "svd, random tokens (the default)": ("svd", []),
    "svd + calibration": ("svd", CALIBRATION),
    "svd + calibration + similarity": ("svd", ["--grouping", "similarity", *CALIBRATION]),
}


def layer_mean(errs: list[dict], side: str, key: str) -> float | None:
    """Mean over layers of one `merge_errors` entry; None for merges that report none (mean)."""
    return sum(e[side][key] for e in errs) / len(errs) if errs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("merging-out"))
    args = ap.parse_args()
    start = time.perf_counter()
    p = Pipeline(out=args.out / "models", eval_args=EVAL, run=run_in_process)
    run = p.source_run()
    source, tokens = run / "model", p.source_tokens(run)
    heads = shape_of_config_json(read_config(source)).heads
    train = f"{p.text() / 'train'}/*.txt"
    rows = []
    for g in (heads // 4, 1):
        for name, (method, extra) in VARIANTS.items():
            if g == 1 and "similarity" in name:  # one group: nothing to choose
                continue
            tag = f"g{g}-{name.replace(' + ', '-')}"
            converted = p.convert(source, tag, g, method, extra=[a.format(train=train) for a in extra])
            before = p.evaluate(converted, f"{tag}-a0", reference=source, speed=False)["quality"]
            model = p.uptrain_model(converted, tag, tokens)
            after = p.evaluate(model, f"{tag}-a0.05", reference=source, speed=False)["quality"]
            report = json.loads((converted / "uptrain_conversion.json").read_text())
            errs = report.get("merge_errors") or []
            rows.append(
                {
                    "g": g,
                    "variant": name,
                    "ppl_0": before["perplexity"],
                    "kl_0": before["kl"],
                    "ppl_005": after["perplexity"],
                    "kl_005": after["kl"],
                    "k_error": layer_mean(errs, "k", "error"),
                    "v_error": layer_mean(errs, "v", "error"),
                    "k_mean_error": layer_mean(errs, "k", "mean_pooling_error"),
                    "v_mean_error": layer_mean(errs, "v", "mean_pooling_error"),
                }
            )
            (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    src = p.evaluate(source, "source", speed=False)["quality"]["perplexity"]

    def f(v: float | None, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"MHA source: held-out perplexity {src:.2f}. Merge errors: relative Σ-weighted error of the K / V heads "
             "(mean over layers; mean pooling's in brackets, Σ = identity without calibration).", "",
             "| KV heads | merge | perplexity at alpha = 0 | KL at 0 | perplexity after alpha = 0.05 | KL after 0.05 "
             "| K error | V error |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        kind = "MQA" if r["g"] == 1 else f"GQA-{r['g']}"
        lines.append(
            f"| {kind} | {r['variant']} | {r['ppl_0']:.2f} | {r['kl_0']:.3f} | {f(r['ppl_005'])} "
            f"| {f(r['kl_005'], '.3f')} "
            f"| {f(r['k_error'], '.3f')} ({f(r['k_mean_error'], '.3f')}) "
            f"| {f(r['v_error'], '.3f')} ({f(r['v_mean_error'], '.3f')}) |"
        )
    text = "\n".join(lines)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\ntook {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
