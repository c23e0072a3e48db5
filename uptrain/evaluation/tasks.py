"""lm-evaluation-harness tasks on an already loaded model."""

from __future__ import annotations

from typing import Any

from uptrain.errors import UptrainError
from uptrain.version import install_hint


def run_tasks(
    model: Any, tokenizer: Any, tasks: str, limit: int | None, include: str | None, batch_size: int
) -> dict[str, dict[str, float]]:
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
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager)
    except ConnectionError as e:
        raise UptrainError(
            f"the data of the lm-eval tasks cannot be reached ({str(e).splitlines()[0]}); run where the Hugging "
            "Face Hub is reachable, or with HF_DATASETS_CACHE pointing at a cache that holds it"
        ) from e

    def is_metric(key: str, value: Any) -> bool:
        return isinstance(value, (int, float)) and "stderr" not in key and not key.startswith("sample_len")

    return {
        task: {k.split(",")[0]: float(v) for k, v in metrics.items() if is_metric(k, v)}
        for task, metrics in results["results"].items()
    }
