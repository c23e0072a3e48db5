"""uptrain: turn multi-head-attention checkpoints into grouped-query-attention ones, and recover their quality.

The Python API is the command functions, which raise `UptrainError` (never exit):

    import uptrain_gqa
    record = uptrain_gqa.convert("llama", "llama-gqa8", num_kv_heads=8, quiet=True)
    facts = uptrain_gqa.checkpoint_facts("llama")            # what `uptrain inspect --json` prints
    result = uptrain_gqa.train("run.yaml", overrides=["--budget.tokens=1e9"])
    scores = uptrain_gqa.evaluate("llama-gqa8", reference="llama", overrides=["--data.files=[heldout/*.txt]"])
    serving = uptrain_gqa.plan("llama-gqa8", memory="80GB", context=32768, batch=16)

They are imported on first use, so `import uptrain_gqa` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from uptrain_gqa.errors import Stopped, UptrainError
from uptrain_gqa.version import __version__

_API = {
    "convert": "uptrain_gqa.commands.convert",
    "inspect": "uptrain_gqa.commands.inspect",
    "train": "uptrain_gqa.commands.train",
    "evaluate": "uptrain_gqa.commands.eval",
    "plan": "uptrain_gqa.commands.plan",
    "checkpoint_facts": "uptrain_gqa.model.facts",
}

__all__ = ["Stopped", "UptrainError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'uptrain_gqa' has no attribute {name!r}")
