"""What a training run keeps between steps and across restarts: the evaluation history that
selects the model and stops early, and the checkpoint manager (DCP)."""

from .checkpoint import CheckpointError, CheckpointManager
from .history import EvalHistory

__all__ = ["CheckpointError", "CheckpointManager", "EvalHistory"]
