"""`make demo`: convert a built-in MHA checkpoint to GQA and MQA with the real CLI, then check
the results with transformers.

The source is a Llama-architecture MHA checkpoint (configs/demo/source-llama-mha.json: 8 layers,
8 heads, 60 M parameters, bf16, 3 safetensors shards) with random weights, built once into the
user cache. Each output is loaded with AutoModelForCausalLM, generates, and its KV cache is
measured from transformers' DynamicCache and compared with 2 · layers · kv_heads · head_dim · bytes.

    python scripts/demo.py [--out demo-out] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_CONFIG = ROOT / "configs" / "demo" / "source-llama-mha.json"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "uptrain" / "demo"


def build_source(folder: Path) -> Path:
    """The built-in MHA checkpoint, made once and reused (keyed by the config's content)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = json.loads(SOURCE_CONFIG.read_text())
    stamp = folder / "source-config.json"
    if stamp.exists() and json.loads(stamp.read_text()) == config:
        return folder
    print(f"building the demo source model in {folder} ...", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="50MB")
    stamp_tmp = tmp / "source-config.json"
    stamp_tmp.write_text(json.dumps(config))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def uptrain(*args: str | Path) -> None:
    cmd = ["uptrain", *map(str, args)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    exe = [sys.executable, "-m", "uptrain"]
    subprocess.run([*exe, *map(str, args)], check=True)


def measure(folder: Path, tokens: int) -> dict:
    """Load with transformers, generate, and sum the KV cache tensors actually held."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, return_dict_in_generate=True
        )
    seconds = time.perf_counter() - start
    layers = out.past_key_values.layers
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    seq = layers[0].keys.shape[2]
    cfg = model.config
    formula = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    return {
        "kv_heads": cfg.num_key_value_heads,
        "formula_per_token": formula,
        "measured_per_token": cached / seq,
        "cache_bytes": cached,
        "seq": seq,
        "params": model.num_parameters(),
        "tokens_per_s": tokens / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out", help="where converted models go")
    ap.add_argument("--tokens", type=int, default=256, help="tokens to generate when measuring the cache")
    args = ap.parse_args()
    from transformers.utils.logging import disable_progress_bar, set_verbosity_error

    disable_progress_bar()
    set_verbosity_error()
    source = build_source(cache_dir() / "source-llama-mha")
    uptrain("inspect", source)
    heads = json.loads(SOURCE_CONFIG.read_text())["num_attention_heads"]
    targets = {"gqa": heads // 4, "mqa": 1}
    for name, g in targets.items():
        uptrain("convert", source, args.out / name, "--num-kv-heads", g, "--max-shard-size", "50MB", "--overwrite")
    rows = [("MHA source", measure(source, args.tokens), None)]
    for name, g in targets.items():
        report = json.loads((args.out / name / "uptrain_conversion.json").read_text())
        label = "MQA" if g == 1 else f"GQA-{g}"
        rows.append((label, measure(args.out / name, args.tokens), report["seconds"]))

    print(f"\nmeasured with transformers: {args.tokens} generated tokens after a 16-token prompt, bf16, CPU\n")
    print(
        "| model | KV heads | KV bytes/token (formula) | KV bytes/token (measured) | cache at "
        f"{rows[0][1]['seq']} tokens | vs MHA | parameters | convert s | generate tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[0][1]["cache_bytes"]
    for label, m, secs in rows:
        assert m["measured_per_token"] == m["formula_per_token"], (label, m)
        smaller = "-" if secs is None else f"{base / m['cache_bytes']:.0f}x smaller"
        print(
            f"| {label} | {m['kv_heads']} | {m['formula_per_token']:,} | {m['measured_per_token']:,.0f} "
            f"| {m['cache_bytes'] / 2**20:.2f} MiB | {smaller} "
            f"| {m['params'] / 1e6:.1f} M | {'-' if secs is None else f'{secs:.1f}'} | {m['tokens_per_s']:.0f} |"
        )
    print(f"\nconverted checkpoints: {args.out}/gqa, {args.out}/mqa (load with AutoModelForCausalLM)")
    print(
        "\nThe source has random weights: this demo shows the conversion and the cache saving. Quality"
        "\nrecovery (uptraining) and a trained built-in model come with `uptrain train`."
    )


if __name__ == "__main__":
    main()
