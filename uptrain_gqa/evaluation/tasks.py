"""lm-evaluation-harness tasks on an already loaded model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uptrain_gqa.errors import UptrainError, first_line
from uptrain_gqa.io.folders import write_file
from uptrain_gqa.version import install_hint


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: str,
    limit: int | None,
    include: str | None,
    batch_size: int,
    *,
    num_fewshot: int | None = None,
    chat_template: bool = False,
    log_samples: Path | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Run lm-eval `tasks` on the loaded model: (metrics per task, settings per task: n-shot, version,
    limit, chat template). With `log_samples`, every scored example goes to LOG_SAMPLES/TASK.jsonl."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UptrainError(f"--tasks needs lm-evaluation-harness: {install_hint('eval')}") from e
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # indexing every built-in task takes a while
        manager = TaskManager(include_path=include)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UptrainError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            limit=limit,
            task_manager=manager,
            num_fewshot=num_fewshot,
            apply_chat_template=chat_template,
            log_samples=log_samples is not None,
        )
    except ConnectionError as e:
        raise UptrainError(
            f"the data of the lm-eval tasks cannot be reached ({first_line(e)}); run where the Hugging "
            "Face Hub is reachable, or with HF_DATASETS_CACHE pointing at a cache that holds it"
        ) from e

    def is_metric(key: str, value: Any) -> bool:
        return isinstance(value, (int, float)) and "stderr" not in key and not key.startswith("sample_len")

    metrics = {
        task: {k.split(",")[0]: float(v) for k, v in values.items() if is_metric(k, v)}
        for task, values in results["results"].items()
    }
    settings = {
        task: {
            "n_shot": (results.get("n-shot") or {}).get(task),
            "version": (results.get("versions") or {}).get(task),
            "limit": limit,
            "chat_template": chat_template,
        }
        for task in metrics
    }
    if log_samples is not None:
        log_samples.mkdir(parents=True, exist_ok=True)
        for task, samples in (results.get("samples") or {}).items():
            lines = (json.dumps(sample, default=str) + "\n" for sample in samples)
            write_file(log_samples / f"{task}.jsonl", "".join(lines).encode(), "--log-samples")
    return metrics, settings
