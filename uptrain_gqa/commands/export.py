"""`uptrain export`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from uptrain_gqa.io.hub import check_push, push_folder
from uptrain_gqa.training.export import export_checkpoint


def export(
    checkpoint: str, out: str, *, overwrite: bool = False, push_to_hub: str | None = None, public: bool = False
) -> dict[str, Any]:
    """Turn a step checkpoint of `uptrain train` into a Hugging Face model folder.

    Works for every kind of checkpoint a run writes: one process or DDP (accelerate's
    model.safetensors) and FSDP2 (DCP shards from every rank, reassembled here in one process on
    the CPU, whatever the number of GPUs that wrote them). OUT loads with AutoModelForCausalLM and
    can be evaluated (`uptrain eval OUT`) or shared; it holds the run's config, the conversion
    record of its source and the checkpoint's step and tokens (train_state.json).

    Args:
        checkpoint: A step checkpoint folder, e.g. runs/x/checkpoints/step-00001000.
        out: Folder to write the model into.
        overwrite: Replace OUT if uptrain wrote it.
        push_to_hub: Upload OUT (with its model card) to this Hub repo, e.g. you/llama-gqa8-step1000.
        public: Create the --push-to-hub repo public (default: private).
    """
    check_push(push_to_hub)
    record = export_checkpoint(checkpoint, out, overwrite=overwrite)
    print(
        f"wrote {out}: step {record['step']:,} ({record['tokens']:,} tokens) of a {record['kind']} checkpoint",
        file=sys.stderr,
    )
    if push_to_hub:
        url = push_folder(Path(out), push_to_hub, private=not public, message="uptrain export")
        print(f"uptrain export: pushed {out} to {url}", file=sys.stderr)
    return record
