"""`uptrain env`."""

from __future__ import annotations

from typing import Any

from uptrain_gqa.commands.output import JsonOption, emit_json, table_wanted
from uptrain_gqa.device import environment


def env(*, json: JsonOption = None) -> dict[str, Any]:
    """Print what uptrain runs on: its version and its libraries', Python, platform, GPUs, processes.

    The same facts go into every run folder (uptrain_run.json) and conversion record; paste this
    into a bug report.

    Args:
        json: The facts as JSON: alone, to stdout instead of the list; with FILE, written to FILE as well.
    """
    facts = environment()
    emit_json(facts, json)
    if not table_wanted(json):
        return facts
    for name, version in facts["versions"].items():  # type: ignore[union-attr]
        print(f"- {name}: {version or 'not installed'}")
    print(f"- platform: {facts['platform']}")
    print(f"- CUDA: {facts['cuda'] or 'none'}; GPUs: {', '.join(facts['devices']) or 'none'}")  # type: ignore[arg-type]
    print(f"- CPU cores: {facts['cpu_count']}; processes in this job: {facts['processes']}")
    return facts
