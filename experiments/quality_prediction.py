"""Does `uptrain plan --quality` (the KL of each G's merge at alpha = 0) predict quality after uptraining?

On the built-in demo source (8 heads, MHA; pretrained once by `make demo`, then reused): `uptrain plan
--quality` on the training plays gives every G's KL to the source at alpha = 0. Then, per G, the real
pipeline: `uptrain convert` as plan models it (svd + calibration on the same text, refinement as
convert's default), `uptrain train` for alpha = 5 % of the source's pretraining tokens (the demo's
recipe), and `uptrain eval --reference SOURCE` on the held-out plays before and after. The MHA source
is continued on the same tokens as the baseline (in-domain training lowers its perplexity too).
Prints, per G: KV bytes per token, plan's KL, the converted model's KL by `eval` (other tokens: the
held-out plays), perplexity before and after uptraining, the ratio to the continued source, and
the rank correlation between plan's KL and perplexity after uptraining.

    python -m experiments.quality_prediction --out quality-prediction      # ~15 min on 2 CPU cores

Resumable: finished conversions, runs and evaluations in --out are kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from uptrain_gqa.demo.pipeline import Pipeline


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n (ties share their mean rank)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks)."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def plan_quality(p: Pipeline, source: Path, data: str) -> dict[str, Any]:
    out = p.out / "plan.json"
    if not out.is_file():
        # calibrated on the plays alone (the demo's tokenizer knows no other text), as the conversions below
        cmd = [sys.executable, "-m", "uptrain_gqa", "plan", str(source), "--quality", data, "--calibration", data,
               "--calibration-mix", "0", "--json"]  # fmt: skip
        p.log(f"\n$ uptrain plan {source} --quality {data} --calibration {data} --calibration-mix 0 --json")
        started = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"failed: {' '.join(cmd)}")
        result = json.loads(proc.stdout) | {"seconds": round(time.perf_counter() - started, 1)}
        out.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("quality-prediction"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    p = Pipeline(args.out, eval_args=["--max-tokens", "20000", "--window", "256", "--stride", "256"])
    source_run = p.source_run()
    source, tokens = source_run / "model", p.source_tokens(source_run)
    train = f"{p.text() / 'train'}/*.txt"
    plan = plan_quality(p, source, train)

    def evaluate(model: Path, name: str) -> dict[str, Any]:
        path = args.out / f"eval-{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        return p.evaluate(model, name, reference=source, speed=False)

    def uptrained(model: Path, name: str) -> Path:
        done = args.out / f"{name}-uptrained" / "model"
        return done if (done / "config.json").is_file() else p.uptrain_model(model, name, tokens)

    continued = evaluate(uptrained(source, "source"), "source-uptrained")["quality"]
    rows = []
    for row in plan["rows"]:
        g = row["num_kv_heads"]
        if row["current"] or not row["reachable"]:
            continue
        name = f"g{g}"
        converted = args.out / f"{name}-converted"
        if not (converted / "config.json").is_file():
            converted = p.convert(source, name, g, "svd", extra=["--calibration", train, "--calibration-mix", "0"])
        before = evaluate(converted, f"{name}-converted")["quality"]
        after = evaluate(uptrained(converted, name), f"{name}-uptrained")["quality"]
        rows.append({"g": g, "kv_bytes_per_token": row["kv_per_request"] / plan["context"],
                     "plan_kl": row["kl"], "plan_top1": row["top1_agreement"], "kl_converted": before["kl"],
                     "ppl_converted": before["perplexity"], "ppl_uptrained": after["perplexity"],
                     "kl_uptrained": after["kl"], "ratio": after["perplexity"] / continued["perplexity"]})  # fmt: skip
    rho = spearman([r["plan_kl"] for r in rows], [r["ppl_uptrained"] for r in rows])
    results = {"plan_seconds": plan.get("seconds"), "continued_source": continued, "rows": rows, "spearman": rho}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"Continued MHA source (same {0.05 * tokens:,.0f} tokens): perplexity {continued['perplexity']:.2f}, "
        f"KL to the original {continued['kl']:.3f}. plan --quality took {plan.get('seconds')} s.",
        "",
        "| G | KV bytes/token | plan KL (α = 0) | eval KL (α = 0) | perplexity α = 0 | perplexity after "
        "| ratio to continued source | KL after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["g"]):
        lines.append(f"| {r['g']} | {r['kv_bytes_per_token']:,.0f} | {r['plan_kl']:.3f} | {r['kl_converted']:.3f} | "
                     f"{r['ppl_converted']:.2f} | {r['ppl_uptrained']:.2f} | {r['ratio']:.3f} | "
                     f"{r['kl_uptrained']:.3f} |")  # fmt: skip
    lines += ["", f"Spearman rank correlation, plan's KL vs perplexity after uptraining: {rho:.2f} ({len(rows)} G's)"]
    text = "\n".join(lines)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
