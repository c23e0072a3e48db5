"""uptrain: turn multi-head-attention checkpoints into grouped-query-attention ones, and recover their quality.

The Python API is the command functions, which raise `UptrainError` (never exit):

    import uptrain
    record = uptrain.convert("llama", "llama-gqa8", num_kv_heads=8, quiet=True)
    facts = uptrain.checkpoint_facts("llama")            # what `uptrain inspect --json` prints
    result = uptrain.train("run.yaml", overrides=["--budget.tokens=1e9"])
    scores = uptrain.evaluate("llama-gqa8", reference="llama", overrides=["--data.files=[heldout/*.txt]"])
    serving = uptrain.plan("llama-gqa8", memory="80GB", context=32768, batch=16)

They are imported on first use, so `import uptrain` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from uptrain.errors import Stopped, UptrainError
from uptrain.version import __version__

_API = {
    "convert": "uptrain.commands.convert",
    "inspect": "uptrain.commands.inspect",
    "train": "uptrain.commands.train",
    "evaluate": "uptrain.commands.eval",
    "plan": "uptrain.commands.plan",
    "checkpoint_facts": "uptrain.model.facts",
}

__all__ = ["Stopped", "UptrainError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'uptrain' has no attribute {name!r}")
