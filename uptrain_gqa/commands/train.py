"""`uptrain train`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

from uptrain_gqa import config as configlib
from uptrain_gqa.config import Overrides
from uptrain_gqa.device import is_main_process
from uptrain_gqa.io.hub import check_push, push_folder
from uptrain_gqa.training.config import TrainConfig
from uptrain_gqa.training.run import run_training


def train(
    config: str,
    *,
    dry_run: bool = False,
    resume: Annotated[str | None, {"nargs": "?", "const": "latest", "metavar": "CHECKPOINT"}] = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    public: bool = False,
    overrides: Annotated[list[str] | None, Overrides(TrainConfig)] = None,
) -> dict[str, Any]:
    """Continue pretraining a (converted) checkpoint for a token budget, with accelerate.

    Runs on the local device (a GPU if present, else the CPU). The same command runs under
    `accelerate launch` or `torchrun` for several GPUs or nodes (see configs/accelerate/).
    Any config key can be overridden on the command line, e.g. --optim.lr=1e-4
    --budget.tokens=2e9. The resolved config is saved in the run folder and in every
    checkpoint; metrics go to OUT/metrics.jsonl (and to the configured trackers); the final
    model is written to OUT/model as a Hugging Face folder.

    Args:
        config: YAML file with the run's config (see configs/ and the keys below).
        dry_run: Print the resolved budget (tokens, steps, batch, FLOPs, GPU-hours) and exit.
        resume: Continue from the latest checkpoint in OUT/checkpoints, or from CHECKPOINT;
            `--resume auto` resumes if there is a checkpoint and starts afresh otherwise.
        overwrite: Delete an existing run folder (checkpoints, metrics, model) and start over.
        push_to_hub: Upload the final model (OUT/model, with its model card) to this Hub repo, e.g. you/llama-gqa8.
        public: Create the --push-to-hub repo public (default: private).
        overrides: --section.key=value settings applied on top of CONFIG.
    """
    cfg = configlib.load(TrainConfig, config, configlib.parse_overrides(overrides or []))
    check_push(push_to_hub)
    result = run_training(cfg, resume=resume, overwrite=overwrite, dry_run=dry_run)
    if push_to_hub and not dry_run and is_main_process():
        url = push_folder(Path(cfg.out) / "model", push_to_hub, private=not public, message="uptrain train")
        print(f"uptrain train: pushed {Path(cfg.out) / 'model'} to {url}", file=sys.stderr)
    return result
