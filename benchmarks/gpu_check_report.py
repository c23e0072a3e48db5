"""The GPU check's report (benchmarks/gpu_check.py): its targets judged, and its Markdown.

Targets (docs/benchmarks.md, "On a GPU"): training at >= 45 % MFU in bf16 on the ~1 B model and ahead of transformers'
Trainer; decode with `uptrain_sdpa` at >= 2x MHA's tokens/s for GQA-8 and >= 3x for MQA.
"""

from __future__ import annotations

import json
from typing import Any

from uptrain_gqa.units import format_bytes, format_count

MFU_TARGET = 0.45
DECODE_TARGETS = {8: 2.0, 1: 3.0}  # KV heads -> decode tokens/s over MHA's, both with uptrain_sdpa
ATTENTION = "uptrain_sdpa"  # uptrain_gqa.evaluation.attention.NAME, spelled out: the report imports no torch


def size(n: int | None) -> str:
    return "-" if n is None else format_bytes(n, binary=True)


def judge(value: float | None, target: float, unit: str) -> tuple[bool | None, str]:
    """(met, what to print): by how much it was missed when it was."""
    if value is None:
        return None, "not measured"
    shown = f"{value:.1%}" if unit == "%" else f"{value:.2f}x"
    if value >= target:
        return True, shown
    short = f"{(target - value) * 100:.1f} points" if unit == "%" else f"{target - value:.2f}x"
    return False, f"{shown}: {short} short ({value / target:.0%} of the target)"


def targets(report: dict) -> list[dict[str, Any]]:
    """Each target with met (True / False / None when not measured) and the measured value."""
    parts = report["parts"]
    judged = report["gpu"] and report["shapes"] == "gpu"
    rows: list[tuple[str, tuple[bool | None, str]]] = []
    best = ((parts.get("train") or {}).get("figures") or {}).get("best", {})
    ours = {name: b for name, b in best.items() if name.startswith("uptrain")}
    fastest = max(ours, key=lambda n: ours[n]["tokens_per_s"], default=None)
    mfu = ours[fastest]["mfu"] if fastest is not None else None
    rows.append((f"training >= 45 % MFU in bf16 (~1 B model; the fastest: {fastest})", judge(mfu, MFU_TARGET, "%")))
    ratio = ours[fastest]["vs_trainer"] if fastest is not None else None
    rows.append(("training ahead of transformers Trainer (tokens/s ratio)", judge(ratio, 1.0, "x")))
    decode = (parts.get("decode") or {}).get("figures") or {}
    shared = [r for r in decode.get("rows", []) if r["kv_heads"] < decode["heads"]]  # MHA is the baseline
    for kv_heads, target in DECODE_TARGETS.items():
        row = next((r for r in shared if r["kv_heads"] == kv_heads and r["attention"] == ATTENTION), None)
        name = "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"
        ratio = row["vs_mha"] if row else None
        rows.append((f"decode {name} >= {target:.0f}x MHA tokens/s with {ATTENTION}", judge(ratio, target, "x")))
    judged_rows = []
    for name, (met, shown) in rows:
        if not judged and shown != "not measured":
            shown += " (not judged: tiny shapes without a GPU)"
        judged_rows.append({"target": name, "met": met if judged else None, "measured": shown})
    return judged_rows


def train_table(figures: dict) -> list[str]:
    m = figures["model"]
    lines = [
        f"Llama-shaped, hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads -> GQA-{m['kv_heads']} "
        f"({format_count(m['params_matmul'])} matmul parameters); seq {figures['seq_len']}, micro-batch "
        f"{figures['micro_batch']} x {figures['accum']}, {figures['steps']} steps ({figures['timed_steps']} timed); "
        f"MFU = 6·N·tokens/s over {figures['peak_tflops']:.0f} TFLOP/s",
        "",
        "| trainer | tokens/s | vs Trainer | MFU | peak memory |",
        "|---|---|---|---|---|",
    ]
    for name, b in figures["best"].items():
        ratio = "-" if b["vs_trainer"] is None else f"{b['vs_trainer']:.2f}"
        mfu = "-" if b["mfu"] is None else f"{b['mfu']:.1%}"
        lines.append(f"| {name} | {b['tokens_per_s']:,.0f} | {ratio} | {mfu} | {size(b['peak_memory_bytes'])} |")
    return lines


def decode_table(f: dict) -> list[str]:
    lines = [
        f"{f['preset']} width (hidden {f['hidden']}, {f['heads']} heads), {f['layers']} layers, {f['dtype']}, "
        f"batch {f['batch']}, prompt {f['prompt']}, {f['new']} new tokens",
        "",
        "| KV heads | attention, cache | KV bytes/token | KV cache held | peak memory | decode tok/s | vs MHA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in f["rows"]:
        ratio = "-" if r["vs_mha"] is None else f"{r['vs_mha']:.2f}x"
        lines.append(
            f"| {r['kv_heads']} | {r['attention']}, {r['cache']} | {r['kv_bytes_per_token']:,} | "
            f"{size(r['kv_cache_bytes'])} | {size(r['peak_memory_bytes'])} | {r['decode_tokens_per_s']:,.0f} "
            f"| {ratio} |"
        )
    return lines


def fsdp2_table(f: dict) -> list[str]:
    m = f["model"]
    writes = ", ".join(f"{s:.2f}" for s in f["checkpoint_write_seconds"])
    return [
        f"{f['processes']} process(es) over {f['backend']}; hidden {m['hidden']}, {m['layers']} layers, "
        f"{m['heads']} heads -> GQA-{m['kv_heads']}; seq {f['seq_len']} x micro-batch {f['micro_batch']}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| seconds per step (median) | {f['seconds_per_step']:.4f} |",
        f"| tokens/s (median) | {f['tokens_per_s']:,.0f} |",
        f"| peak memory | {size(f['peak_memory_bytes'])} |",
        f"| checkpoint written (s, each) | {writes} |",
        f"| checkpoint read on resume (s) | {f['checkpoint_read_seconds']:.2f} |",
        f"| SIGTERM -> checkpoint saved (s) | {f['signal_to_saved_seconds']:.2f} |",
        f"| stopped at step -> resumed to | {f['stopped_at_step']} -> {f['final_step']} |",
        f"| resumed launch, start to end (s) | {f['resumed_launch_seconds']:.1f} |",
        f"| uptrain export (s) | {f['export_seconds']:.1f} |",
    ]


def calibration_table(f: dict) -> list[str]:
    m = f["model"]
    return [
        f"`{f['command']}` on a random Llama (hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads, vocab "
        f"{m['vocab']:,}: {format_count(f['parameters'])} parameters), {f['device']}",
        "",
        "| figure | value |",
        "|---|---|",
        f"| calibration pass, s ({f['calibration_tokens']:,} tokens; refinement included) | "
        f"{f['calibration_seconds']} |",
        f"| of which refinement, s ({f['refine_steps']} steps per layer) | {f['refinement_seconds']} |",
        f"| whole conversion, s (record) | {f['conversion_seconds']} |",
        f"| peak GPU memory | {size(f['peak_gpu_memory_bytes'])} |",
        f"| peak RSS (source writing included) | {size(f['peak_rss_bytes'])} |",
    ]


TABLES = {"train": train_table, "decode": decode_table, "fsdp2": fsdp2_table, "calibration": calibration_table}


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [
        "# uptrain GPU check",
        "",
        f"{report['device']} · torch {v['torch']} · transformers {v['transformers']} · accelerate {v['accelerate']} "
        f"· datasets {v['datasets'] or '-'} · Python {v['python']} · {report['started']} · "
        f"{report.get('seconds', 0):.0f} s ({report['shapes']} shapes)",
        "",
        f"Packages: {report['packages']}.",
        "",
        "| part | status | seconds (limit) | command |",
        "|---|---|---|---|",
    ]
    for entry in report["parts"].values():
        status = entry["status"] + (f": {entry['why']}" if "why" in entry else "")
        seconds = f"{entry.get('seconds', '-')} ({entry['limit_s']})"
        lines.append(f"| {entry['title']} | {status} | {seconds} | `{entry['command']}` |")
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for t in report.get("targets", []):
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    for name, entry in report["parts"].items():
        lines += ["", f"## {entry['title'][0].upper()}{entry['title'][1:]}", ""]
        if entry.get("figures"):
            try:
                lines += TABLES[name](entry["figures"]) if name in TABLES else [f"`{json.dumps(entry['figures'])}`"]
            except KeyError as e:  # a run cut short has part of its figures
                lines.append(f"(figures incomplete: no {e}; they are in gpu-check.json)")
        if "output" in entry:
            lines += ["", f"{entry['status']}: {entry['why']}; the end of its output:", ""]
            lines += ["```", entry["output"], "```"]
        elif not entry.get("figures"):  # skipped, or not run yet (waiting, running) when the check was killed
            lines.append(entry["status"] + (f": {entry['why']}" if "why" in entry else ""))
    return "\n".join(lines) + "\n"
