"""Calibrated conversion timed: `uptrain convert --method svd --calibration random --refine-steps N` of a
random-weight Llama-shaped MHA checkpoint, with the seconds of each stage and peak memory.

The stages' seconds come from the conversion record (uptrain_conversion.json: calibration, refinement,
the whole conversion); peak memory is the GPU allocator's peak during the conversion (the source runs one
decoder layer at a time, on the GPU when there is one) and the process's peak RSS.

    python -m benchmarks.calibration                                        # CPU-sized (seconds)
    python -m benchmarks.calibration --hidden 2048 --layers 16 --heads 16   # ~1 B on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--num-kv-heads", type=int, help="G (default: heads / 4)")
    ap.add_argument("--calibration", default="random", help="as convert's --calibration (random: no data)")
    ap.add_argument("--calibration-tokens", type=int, help="as convert's (default: convert's own)")
    ap.add_argument("--refine-steps", type=int, default=36, help="as convert's (36: its default with text)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    import torch

    from uptrain_gqa import convert
    from uptrain_gqa.synthetic import llama_config, save_random_checkpoint
    from uptrain_gqa.units import format_bytes

    gpu = torch.cuda.is_available()
    groups = args.num_kv_heads or max(1, args.heads // 4)
    with tempfile.TemporaryDirectory(prefix="uptrain-bench-calibration-") as tmp:
        source, out = Path(tmp) / "mha", Path(tmp) / "gqa"
        started = time.perf_counter()
        config = llama_config(args.hidden, args.layers, args.heads, vocab=args.vocab)
        nbytes = save_random_checkpoint(config, source, shards=max(1, args.layers // 8))
        source_s = time.perf_counter() - started
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        options = {"calibration_tokens": args.calibration_tokens, "refine_steps": args.refine_steps}
        record = convert(
            src=str(source), out=str(out), num_kv_heads=groups, method="svd", calibration=args.calibration, **options
        ).record
        wall = time.perf_counter() - started
    calibration, refinement = record.get("calibration") or {}, record.get("refinement") or {}
    command = (f"uptrain convert SRC OUT --num-kv-heads {groups} --method svd --calibration {args.calibration} "
               f"--refine-steps {args.refine_steps}")  # fmt: skip
    if args.calibration_tokens:
        command += f" --calibration-tokens {args.calibration_tokens}"
    figures = {
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": args.vocab},
        "parameters": record["parameters"]["before"],
        "source_bytes": nbytes,
        "source_written_seconds": source_s,
        "num_kv_heads": groups,
        "command": command,
        "device": calibration.get("device"),
        "calibration_tokens": calibration.get("tokens_used"),
        "calibration_seconds": calibration.get("seconds"),
        "refine_steps": refinement.get("steps"),
        "refinement_seconds": refinement.get("seconds"),
        "layers_improved": refinement.get("layers_improved"),
        "conversion_seconds": record["seconds"],
        "wall_seconds": wall,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        # ru_maxrss is in KiB on Linux; it includes writing the source, one tensor at a time
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    gpu_peak = figures["peak_gpu_memory_bytes"]
    print(f"\n{command}\nsource: {figures['parameters']:,} parameters, {format_bytes(nbytes)}; {figures['device']}")
    print("| figure | value |\n|---|---|")
    # the refinement runs inside the calibration pass, layer by layer: its seconds are part of the pass's
    print(f"| calibration pass ({figures['calibration_tokens']:,} tokens) | {figures['calibration_seconds']:.1f} s |")
    print(f"| of which refinement ({args.refine_steps} steps per layer) | {figures['refinement_seconds'] or 0:.1f} s |")
    print(f"| whole conversion (record; wall) | {record['seconds']:.1f} s; {wall:.1f} s |")
    print(f"| peak GPU memory | {'-' if gpu_peak is None else format_bytes(gpu_peak, binary=True)} |")
    print(f"| peak RSS | {format_bytes(figures['peak_rss_bytes'], binary=True)} |")


if __name__ == "__main__":
    main()
