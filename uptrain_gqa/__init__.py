"""uptrain: turn multi-head-attention checkpoints into grouped-query-attention ones, and recover their quality.

The Python API: one options object per stage, one function that runs it and returns a typed result
(`.to_json()`: what the command's --json prints). Functions raise `UptrainError` (never exit) and print
nothing (progress bars aside: `set_verbosity("quiet")` hides them; notes go to the `uptrain_gqa` logger):

    import uptrain_gqa as ug
    made = ug.convert(ug.ConvertOptions("llama", "llama-gqa8", num_kv_heads=8, method="svd"))
    run = ug.train({"model": {"path": str(made.out)}, "data": {"files": ["text/*.txt"]}, "out": "runs/gqa8",
                    "budget": {"tokens": 10**9}})
    scores = ug.evaluate(ug.EvalOptions(str(run.model), reference="llama", data=["uptrain:heldout"]))
    serving = ug.plan(ug.PlanOptions("llama", memory="80GB", context=32768, batch=16))

docs/api.md has more. Everything is imported on first use, so `import uptrain_gqa` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from uptrain_gqa.errors import Stopped, UptrainError
from uptrain_gqa.progress import set_verbosity
from uptrain_gqa.version import __version__

_API = {
    "convert": "uptrain_gqa.conversion.convert:convert",
    "ConvertOptions": "uptrain_gqa.conversion.options:ConvertOptions",
    "ConvertResult": "uptrain_gqa.conversion.convert:ConvertResult",
    "train": "uptrain_gqa.training.run:train",
    "TrainConfig": "uptrain_gqa.training.config:TrainConfig",
    "TrainResult": "uptrain_gqa.training.run:TrainResult",
    "evaluate": "uptrain_gqa.commands.eval:run_evaluation",
    "EvalOptions": "uptrain_gqa.evaluation.options:EvalOptions",
    "EvalResult": "uptrain_gqa.evaluation.result:EvalResult",
    "plan": "uptrain_gqa.commands.plan:make_plan",
    "PlanOptions": "uptrain_gqa.commands.plan:PlanOptions",
    "PlanResult": "uptrain_gqa.commands.plan:PlanResult",
    "checkpoint_facts": "uptrain_gqa.model.facts:checkpoint_facts",
}

__all__ = ["Stopped", "UptrainError", "__version__", "set_verbosity", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'uptrain_gqa' has no attribute {name!r}")
