"""The GQA paper's ablations (Ainslie et al., 2023), at small scale, on the built-in source model.

With the built-in MHA source (8 heads; pretrained once by `make demo`), this runs the real uptrain
commands for:
  - Fig. 4: conversion method (mean / first / random) -> perplexity at alpha = 0 and after alpha = 0.05;
  - Fig. 5: alpha in {0, 0.01, 0.025, 0.05, 0.1} for GQA (H/4 KV heads) and MQA;
  - Fig. 6: every G dividing H -> KV bytes/token, decode tokens/s at a long context, perplexity after 0.05;
  - baselines: the MHA source continued for the same extra tokens, and GQA trained from scratch on the
    same total tokens.
Uptraining runs are repeated over seeds (data order; and the init for `random`); results are
reported as mean ± std. Writes results.json, results.md and PNG plots into --out.

    python -m experiments.reproduce_gqa_paper --out reproduce-out      # about an hour on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from uptrain_gqa import config as configlib
from uptrain_gqa.demo.pipeline import CONFIGS, Pipeline, run_in_process
from uptrain_gqa.io.folders import read_config
from uptrain_gqa.model.shape import shape_of_config_json


@dataclass
class Reproduction:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the conversion-method runs (Fig. 4: data order, and the random init)."""
    sweep_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the alpha and G sweeps and of the continued MHA baseline (Figs. 5-6)."""
    methods: list[str] = field(default_factory=lambda: ["mean", "first", "random"])
    """Conversion methods compared in Fig. 4."""
    alphas: list[float] = field(default_factory=lambda: [0.01, 0.025, 0.05, 0.1])
    """Uptraining fractions of the source's pretraining tokens (alpha = 0 is always measured)."""
    scratch_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the from-scratch GQA baseline (a full pretraining each)."""
    eval_max_tokens: int = 20000
    """Held-out tokens each perplexity is measured on."""
    speed_prompt_tokens: int = 768
    """Prompt length for the decode-speed measurement (Fig. 6)."""
    speed_new_tokens: int = 32
    """Tokens generated for the decode-speed measurement."""
    speed_batch: int = 16
    """Sequences generated together for the decode-speed measurement."""


class Experiment:
    """Runs the ablations; every result is appended to `results` as it comes, and a rerun skips those."""

    def __init__(self, cfg: Reproduction, pipeline: Pipeline, results: Path) -> None:
        self.cfg, self.p, self.results = cfg, pipeline, results
        self.records: list[dict] = json.loads(results.read_text())["records"] if results.is_file() else []
        self.run = pipeline.source_run()
        self.source = self.run / "model"
        self.tokens = pipeline.source_tokens(self.run)
        self.heads = shape_of_config_json(read_config(self.source)).heads

    def measure(self, model: Path, tag: str, speed: bool = False) -> dict:
        args = ["--max-tokens", str(self.cfg.eval_max_tokens), "--window", "256", "--stride", "192"]
        if speed:
            args += ["--prompt-tokens", str(self.cfg.speed_prompt_tokens), "--new-tokens",
                     str(self.cfg.speed_new_tokens), "--decode-batch", str(self.cfg.speed_batch)]  # fmt: skip
        self.p.eval_args = args
        return self.p.evaluate(model, tag, reference=self.source, speed=speed)

    def record(self, result: dict, **keys) -> None:
        q = result["quality"]
        row = {**keys, "perplexity": q["perplexity"], "kl": q["kl"], "top1": q["top1_agreement"]}
        if result.get("decode"):
            row["decode_tokens_per_s"] = result["decode"]["model"]["decode_tokens_per_s"]
            row["kv_bytes_per_token"] = result["kv_cache"]["model"]["bytes_per_token"]
        self.save(row)
        self.p.log(f"  -> {keys}: perplexity {row['perplexity']:.2f}, KL {row['kl']:.3f}")

    def done(self, **keys) -> bool:
        return any(all(r.get(k) == v for k, v in keys.items()) for r in self.records)

    def save(self, row: dict) -> None:
        self.records.append(row)
        info = {"heads": self.heads, "source_tokens": self.tokens}
        self.results.write_text(json.dumps({"info": info, "records": self.records}, indent=2))

    def convert_and_uptrain(self, g: int, method: str, alphas: list[float], seed: int) -> None:
        name = f"g{g}-{method}-s{seed}"
        if all(self.done(g=g, method=method, alpha=a, seed=seed) for a in [0.0, *alphas]):
            return
        converted = self.p.convert(self.source, name, g, method=method, seed=seed)
        if not self.done(g=g, method=method, alpha=0.0, seed=seed):
            self.record(self.measure(converted, f"{name}-a0"), g=g, method=method, alpha=0.0, seed=seed)
        for alpha in alphas:
            if self.done(g=g, method=method, alpha=alpha, seed=seed):
                continue
            model = self.p.uptrain_model(converted, f"{name}-a{alpha}", self.tokens, alpha, seed)
            self.record(self.measure(model, f"{name}-a{alpha}"), g=g, method=method, alpha=alpha, seed=seed)

    def all(self) -> None:
        cfg, h = self.cfg, self.heads
        gqa = h // 4
        if not self.done(method="source"):
            self.record(self.measure(self.source, "source", speed=True), g=h, method="source", alpha=0.0, seed=0)
        for seed in cfg.seeds:  # Fig. 4
            for method in cfg.methods:
                self.convert_and_uptrain(gqa, method, [0.05], seed)
        for seed in cfg.sweep_seeds:  # Fig. 5
            for g in (gqa, 1):
                self.convert_and_uptrain(g, "mean", cfg.alphas, seed)
        for g in sorted({d for d in range(1, h) if h % d == 0} - {gqa, 1}):  # Fig. 6: the other G
            for seed in cfg.sweep_seeds:
                self.convert_and_uptrain(g, "mean", [0.05], seed)
        for seed in cfg.sweep_seeds:  # MHA continued for the same extra tokens
            if self.done(method="continued", seed=seed):
                continue
            model = self.p.uptrain_model(self.source, f"mha-continued-s{seed}", self.tokens, 0.05, seed)
            self.record(self.measure(model, f"mha-continued-s{seed}"), g=h, method="continued", alpha=0.05, seed=seed)
        for g in sorted({d for d in range(1, h + 1) if h % d == 0}):  # speed at a long context, one per G
            if self.done(method="speed", g=g):
                continue
            model = self.p.out / (
                f"g{g}-mean-s0-a0.05-uptrained/model" if g < h else "mha-continued-s0-uptrained/model"
            )
            result = self.measure(model, f"speed-g{g}", speed=True)
            self.save({"g": g, "method": "speed", "alpha": 0.05, "seed": 0,
                                 "decode_tokens_per_s": result["decode"]["model"]["decode_tokens_per_s"],
                                 "kv_bytes_per_token": result["kv_cache"]["model"]["bytes_per_token"]})  # fmt: skip
        total = round(self.tokens * 1.05)
        for seed in cfg.scratch_seeds:  # GQA from scratch on the same total tokens
            if self.done(method="scratch", seed=seed):
                continue
            arch = json.loads(self.p.architecture.read_text()) | {"num_key_value_heads": gqa}
            arch_path = self.p.out / f"scratch-gqa{gqa}.json"
            arch_path.write_text(json.dumps(arch))
            run = self.p.out / f"scratch-gqa{gqa}-s{seed}"
            self.p.uptrain_cmd(
                "train", self.p.pretrain, f"--model.config={arch_path}", f"--model.tokenizer={self.p.tokenizer()}",
                *self.p.data_overrides(), f"--budget.tokens={total}", f"--seed={seed}", f"--out={run}",
                "--overwrite", "--checkpoint.every=0",
            )  # fmt: skip
            self.record(self.measure(run / "model", f"scratch-s{seed}"), g=gqa, method="scratch", alpha=1.05, seed=seed)


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def pick(records: list[dict], key: str = "perplexity", **where) -> list[float]:
    return [r[key] for r in records if all(r.get(k) == v for k, v in where.items()) and key in r]


def report(records: list[dict], heads: int, tokens: int, out: Path) -> str:
    gqa = heads // 4
    src = pick(records, method="source")[0]
    lines = [
        f"Source: MHA Llama, {heads} heads, pretrained on {tokens:,} tokens; held-out perplexity {src:.2f}. "
        "Perplexity on held-out plays (lower is better), mean ± std over seeds.",
        "",
        f"### Conversion method (paper Fig. 4), GQA-{gqa}",
        "",
        "| method | perplexity at alpha = 0 | KL to source at 0 | perplexity after alpha = 0.05 | KL after 0.05 |",
        "|---|---|---|---|---|",
    ]
    for m in ("mean", "first", "random"):
        cells = [
            stats(pick(records, key, g=gqa, method=m, alpha=a)) for a in (0.0, 0.05) for key in ("perplexity", "kl")
        ]
        lines.append(f"| {m} | {' | '.join(cells)} |")
    alphas = sorted({r["alpha"] for r in records if r["method"] == "mean"})
    lines += ["", "### Uptraining proportion alpha (paper Fig. 5)", "",
              f"| alpha | GQA-{gqa} | MQA |", "|---|---|---|"]  # fmt: skip
    for a in alphas:
        lines.append(f"| {a:g} | {stats(pick(records, g=gqa, method='mean', alpha=a))} "
                     f"| {stats(pick(records, g=1, method='mean', alpha=a))} |")  # fmt: skip
    lines += [f"| MHA source | {src:.2f} | {src:.2f} |",
              f"| MHA continued (0.05) | {stats(pick(records, method='continued'))} | |"]  # fmt: skip
    lines += ["", "### Number of groups G (paper Fig. 6), after alpha = 0.05", "",
              "| G | KV bytes/token | decode tokens/s | perplexity |", "|---|---|---|---|"]  # fmt: skip
    gs = {
        r["g"] for r in records if r["method"] in ("speed", "continued") or (r["method"], r["alpha"]) == ("mean", 0.05)
    }
    for g in sorted(gs, reverse=True):
        speed = pick(records, "decode_tokens_per_s", g=g, method="speed")
        kv = pick(records, "kv_bytes_per_token", g=g, method="speed")
        ppl = pick(records, g=g, method="continued" if g == heads else "mean", alpha=0.05)
        cells = (f"{kv[0]:,}" if kv else "-", f"{speed[0]:,.0f}" if speed else "-")
        lines.append(f"| {g} | {cells[0]} | {cells[1]} | {stats(ppl)} |")
    total = f"{round(tokens * 1.05):,}"
    lines += [
        "",
        "### Baselines",
        "",
        "| model | tokens trained | perplexity |",
        "|---|---|---|",
        f"| MHA source | {tokens:,} | {src:.2f} |",
        f"| MHA source continued for alpha = 0.05 | {total} | {stats(pick(records, method='continued'))} |",
        f"| GQA-{gqa} uptrained (mean, alpha = 0.05) | {total} "
        f"| {stats(pick(records, g=gqa, method='mean', alpha=0.05))} |",
        f"| GQA-{gqa} from scratch | {total} | {stats(pick(records, method='scratch'))} |",
    ]
    return "\n".join(lines)


def plots(records: list[dict], heads: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gqa = heads // 4
    src = pick(records, method="source")[0]

    def mean_std(vals: list[float]) -> tuple[float, float]:
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    fig, ax = plt.subplots(figsize=(6, 4))
    methods = ["mean", "first", "random"]
    for i, alpha in enumerate((0.0, 0.05)):
        ms = [mean_std(pick(records, g=gqa, method=m, alpha=alpha)) for m in methods]
        ax.bar([x + i * 0.4 for x in range(3)], [m for m, _ in ms], 0.4, yerr=[s for _, s in ms],
               label=f"alpha = {alpha:g}")  # fmt: skip
    ax.axhline(src, color="black", linestyle="--", label="MHA source")
    ax.set_xticks([x + 0.2 for x in range(3)], methods)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"Conversion method, GQA-{gqa} (cf. paper Fig. 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig4_methods.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = sorted({r["alpha"] for r in records if r["method"] == "mean"})
    for g, label in ((gqa, f"GQA-{gqa}"), (1, "MQA")):
        done = [a for a in alphas if pick(records, g=g, method="mean", alpha=a)]
        ms = [mean_std(pick(records, g=g, method="mean", alpha=a)) for a in done]
        ax.errorbar(done, [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", label=label)
    ax.axhline(src, color="black", linestyle="--", label="MHA source")
    cont = pick(records, method="continued")
    if cont:
        ax.axhline(statistics.mean(cont), color="grey", linestyle=":", label="MHA continued (alpha = 0.05)")
    ax.set_yscale("log")
    ax.set_xlabel("uptraining proportion alpha")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Uptraining proportion (cf. paper Fig. 5)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig5_alpha.png", dpi=120)

    gs = sorted({r["g"] for r in records if r["method"] == "speed"})
    if not gs:
        plt.close("all")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    speed = [pick(records, "decode_tokens_per_s", g=g, method="speed")[0] for g in gs]
    ax.plot(gs, [1000 / s for s in speed], marker="o", color="tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.set_xlabel("KV heads G (1 = MQA, 8 = MHA)")
    ax.set_ylabel("ms per decoded token (batch)", color="tab:blue")
    ax2 = ax.twinx()
    ppl = [mean_std(pick(records, g=g, method="continued" if g == heads else "mean", alpha=0.05))[0] for g in gs]
    ax2.plot(gs, ppl, marker="s", color="tab:red")
    ax2.set_ylabel("perplexity after alpha = 0.05", color="tab:red")
    ax.set_title("Number of groups (cf. paper Fig. 6)")
    fig.tight_layout()
    fig.savefig(out / "fig6_groups.png", dpi=120)
    plt.close("all")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reproduce-out"))
    ap.add_argument("--config", type=Path, default=CONFIGS / "reproduce.yaml")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.md and plots from results.json")
    args = ap.parse_args()
    cfg = configlib.load(Reproduction, args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    start = time.perf_counter()
    if not args.report_only:
        exp = Experiment(cfg, Pipeline(out=args.out / "models", run=run_in_process), results)
        exp.all()
        print(f"ran in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    data = json.loads(results.read_text())
    text = report(data["records"], data["info"]["heads"], data["info"]["source_tokens"], args.out)
    (args.out / "results.md").write_text(text + "\n")
    plots(data["records"], data["info"]["heads"], args.out)
    print(text)


if __name__ == "__main__":
    main()
