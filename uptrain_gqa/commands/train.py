"""`uptrain train`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

from uptrain_gqa import config as configlib
from uptrain_gqa.commands.output import JsonOption, check_json_target, emit_json
from uptrain_gqa.config import Overrides
from uptrain_gqa.device import is_main_process
from uptrain_gqa.errors import UptrainError
from uptrain_gqa.io.hub import check_push, push_folder
from uptrain_gqa.training.config import TrainConfig, shipped_config
from uptrain_gqa.training.preflight import fit_to_model
from uptrain_gqa.training.run import TrainResult, run_training


def train(
    config: str | None = None,
    *,
    config_name: Annotated[str | None, {"metavar": "NAME"}] = None,
    dry_run: bool = False,
    print_config: bool = False,
    resume: Annotated[str | None, {"nargs": "?", "const": "latest", "metavar": "CHECKPOINT"}] = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    public: bool = False,
    json: JsonOption = None,
    overrides: Annotated[list[str] | None, Overrides(TrainConfig)] = None,
) -> TrainResult | None:
    """Continue pretraining a (converted) checkpoint for a token budget, with accelerate.

    Runs on the local device (a GPU if present, else the CPU). The same command runs under
    `accelerate launch` or `torchrun` for several GPUs or nodes (see configs/accelerate/).
    Every config key is also a flag, so a YAML file is optional: `uptrain train --model.path=M
    --data.files=F --budget.steps=100` runs, and a file's keys can be overridden the same way
    (--optim.lr=1e-4 --budget.tokens=2e9). data.seq_len and batch.global_batch_size, when unset,
    are fitted to the model and printed. --print-config prints the resolved YAML, which `uptrain
    train FILE` runs as the same run. The resolved config is saved in the run folder and in every
    checkpoint; metrics go to OUT/metrics.jsonl (and to the configured trackers); the final
    model is written to OUT/model as a Hugging Face folder.

    Args:
        config: YAML file with the run's config (see configs/ and the keys below); optional when the
            required keys (model.path, data.*, budget.*) are given as flags.
        config_name: A run config shipped with uptrain, by name, instead of CONFIG: llama2-7b-gqa8,
            qwen1.5-7b-gqa8, olmo-1b-gqa4, olmo-1b-gqa4-mixture or tiny-cpu (override its keys with flags).
        dry_run: Print the resolved budget (tokens, steps, batch, FLOPs, GPU-hours) and exit.
        print_config: Print the resolved config as YAML (every key, the values fitted to the model
            included) to stdout and exit; save it and `uptrain train` it to run the same run.
        resume: Continue from the latest checkpoint in OUT/checkpoints, or from CHECKPOINT;
            `--resume auto` resumes if there is a checkpoint and starts afresh otherwise.
        overwrite: Delete an existing run folder (checkpoints, metrics, model) and start over.
        push_to_hub: Upload the final model (OUT/model, with its model card) to this Hub repo, e.g. you/llama-gqa8.
        public: Create the --push-to-hub repo public (default: private).
        json: The result (final step, tokens, last metrics; with --dry-run the budget) as JSON: alone, to
            stdout; with FILE, written to FILE.
        overrides: --section.key=value settings applied on top of CONFIG.
    """
    check_json_target(json)
    if config_name is not None:
        if config is not None:
            raise UptrainError(f"give CONFIG or --config-name, not both (got {config} and {config_name})")
        config = str(shipped_config(config_name))
    cfg = configlib.load(TrainConfig, config, configlib.parse_overrides(overrides or []))
    if print_config:
        cfg, _ = fit_to_model(cfg)
        sys.stdout.write(configlib.dumps(cfg))
        return None
    check_push(push_to_hub)
    result = run_training(cfg, resume=resume, overwrite=overwrite, dry_run=dry_run)
    if is_main_process():
        emit_json(result.to_json(), json)
    if push_to_hub and not dry_run and is_main_process():
        url = push_folder(Path(cfg.out) / "model", push_to_hub, private=not public, message="uptrain train")
        print(f"uptrain train: pushed {Path(cfg.out) / 'model'} to {url}", file=sys.stderr)
    return result
