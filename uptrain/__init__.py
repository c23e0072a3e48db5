"""uptrain: turn multi-head-attention checkpoints into grouped-query-attention ones."""

__version__ = "0.1.0"

from uptrain.errors import UptrainError

__all__ = ["UptrainError", "__version__"]
