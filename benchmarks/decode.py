"""Benchmark decode speed and KV cache of MHA against the GQA / MQA models `uptrain convert` makes.

A Llama-shaped MHA checkpoint with random weights is saved, converted by uptrain to each number of
KV heads G, and each model generates after the same long prompt; decode tokens/s (prefill excluded),
the KV cache transformers holds, and peak memory are measured in this run and printed as a table
with ratios against MHA. Random weights decode as fast as trained ones: speed depends on shapes only.
`--layers N` keeps a preset's width with fewer layers (less to write, convert and compile); `--json FILE`
keeps the figures, rewritten after every model.

    python -m benchmarks.decode                                    # CPU-sized (a minute here)
    python -m benchmarks.decode --preset llama2-7b --prompt 4096 --batch 16 --cache dynamic static  # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from uptrain_gqa.evaluation.attention import NAME as ATTENTION
from uptrain_gqa.evaluation.attention import register as register_attention

PRESETS = {  # hidden, layers, heads, intermediate, vocab
    "tiny": (256, 4, 8, 688, 4096),
    "llama2-7b": (4096, 32, 32, 11008, 32000),
    "llama2-1b": (2048, 16, 32, 5504, 32000),
}


def make_source(folder: Path, preset: str, max_len: int, dtype: str, layers: int | None = None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from uptrain_gqa.device import compute_device
    from uptrain_gqa.synthetic import llama_config

    hidden, preset_layers, heads, inter, vocab = PRESETS[preset]
    layers = layers or preset_layers
    cfg = llama_config(hidden, layers, heads, intermediate=inter, vocab=vocab, max_positions=max_len, dtype=dtype)
    device = compute_device()
    torch.manual_seed(0)
    with device:  # initialising 7B weights on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="the MHA model's shape")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--groups", type=int, nargs="+", help="KV heads to compare (default: H/4, H/8 and 1)")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens before decoding")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--attn", nargs="+", default=["sdpa", ATTENTION],
                    help=f"sdpa: transformers' own; {ATTENTION}: reads shared K/V once")  # fmt: skip
    ap.add_argument("--cache", nargs="+", choices=["dynamic", "static"], default=["dynamic"],
                    help="dynamic: transformers' default cache, eager steps; static: preallocated cache and CUDA "
                    "graphs (torch.compile), as a serving stack decodes (GPU)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write the figures here (rewritten after every model)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from uptrain_gqa import convert
    from uptrain_gqa.device import compute_device, device_name
    from uptrain_gqa.evaluation.generation import generation
    from uptrain_gqa.units import format_bytes

    device = compute_device()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    hidden, preset_layers, heads, *_ = PRESETS[args.preset]
    layers = args.layers or preset_layers
    setup = {"preset": args.preset, "hidden": hidden, "layers": layers, "heads": heads, "dtype": dtype,
             "batch": args.batch, "prompt": args.prompt, "new": args.new, "device": device_name(device)}  # fmt: skip
    groups = args.groups or sorted({heads, heads // 4, heads // 8, 1}, reverse=True)
    groups = [heads, *[g for g in groups if g != heads]]  # MHA first: the baseline
    register_attention()
    rows = []
    with tempfile.TemporaryDirectory(prefix="uptrain-bench-decode-") as tmp:
        source = make_source(Path(tmp) / "mha", args.preset, args.prompt + args.new, dtype, layers)
        paths = {heads: source}
        for g in groups[1:]:
            paths[g] = Path(tmp) / f"g{g}"
            convert(src=str(source), out=str(paths[g]), num_kv_heads=g)
        # every G with one attention before the next: a run cut short still compares the G's
        for attn in args.attn:
            for g in groups:
                for mode in args.cache:
                    model = AutoModelForCausalLM.from_pretrained(
                        paths[g], dtype=getattr(torch, dtype), attn_implementation=attn
                    )
                    model.to(device).eval()
                    kv, dec = generation(model, args.prompt, args.new, args.batch, static=mode == "static")
                    rows.append((g, f"{attn}, {mode}", kv, dec))
                    print(f"  G={g} {attn} {mode}: {dec.decode_tokens_per_s:,.0f} tok/s", file=sys.stderr, flush=True)
                    if args.json:  # a run cut short by a time limit keeps the models already measured
                        args.json.write_text(json.dumps(figures(setup, heads, rows), indent=1))
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    torch.compiler.reset()  # each model compiles afresh
    print(
        f"\n{args.preset} shape (hidden {hidden}, {layers} layers, {heads} heads), {dtype}, batch {args.batch}, "
        f"prompt {args.prompt}, {args.new} new tokens; {device_name(device)}"
    )
    print("| KV heads | attention, cache | KV bytes/token | KV cache held | peak memory | decode tok/s | vs MHA |")
    print("|---|---|---|---|---|---|---|")
    base = {attn: dec.decode_tokens_per_s for g, attn, _, dec in rows if g == heads}
    for g, attn, kv, dec in sorted(rows, key=lambda row: groups.index(row[0])):  # by G, as measured within
        peak = "-" if dec.peak_memory_bytes is None else format_bytes(dec.peak_memory_bytes, binary=True)
        print(
            f"| {g}{' (MHA)' if g == heads else ' (MQA)' if g == 1 else ''} | {attn} | {kv.bytes_per_token:,} "
            f"| {format_bytes(kv.measured_bytes, binary=True)} | {peak} | {dec.decode_tokens_per_s:,.0f} "
            f"| {dec.decode_tokens_per_s / base[attn]:.2f}x |"
        )


def figures(setup: dict, heads: int, rows: list[tuple]) -> dict:
    """What --json keeps: the set-up and one entry per model, attention and cache, with its ratio to MHA."""
    base = {attn: dec.decode_tokens_per_s for g, attn, _, dec in rows if g == heads}
    return {
        **setup,
        "rows": [
            {
                "kv_heads": g,
                "attention": attn.split(", ")[0],
                "cache": attn.split(", ")[1],
                "kv_bytes_per_token": kv.bytes_per_token,
                "kv_cache_bytes": kv.measured_bytes,
                "peak_memory_bytes": dec.peak_memory_bytes,
                "decode_tokens_per_s": dec.decode_tokens_per_s,
                "vs_mha": dec.decode_tokens_per_s / base[attn] if attn in base else None,
            }
            for g, attn, kv, dec in rows
        ],
    }


if __name__ == "__main__":
    main()
