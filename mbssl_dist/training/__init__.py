"""Training: the step (losses, per-task gradients, HMG, Adam) and what a run keeps between
steps and across restarts (optimizer state, the evaluation history that selects the model and
stops early, the checkpoint manager)."""

from .batch import Batch, build_batch
from .checkpoint import CheckpointError, CheckpointManager
from .history import EvalHistory
from .hmg import HMG, STRATEGIES
from .optimizer import TrainState
from .step import NonFiniteLossError, StepResult, TrainStep

__all__ = ["Batch", "build_batch", "CheckpointError", "CheckpointManager", "EvalHistory", "HMG", "STRATEGIES",
           "TrainState", "NonFiniteLossError", "StepResult", "TrainStep"]
