"""MBSSL model, losses, hybrid gradient manipulation and the training step."""

from .hmg import HMG, STRATEGIES
from .losses import (Anchors, InteractionTerms, InterBehaviorInfoNCE, IntraBehaviorInfoNCE, NonSamplingLoss,
                     info_nce)
from .mbssl import MBSSL, Propagated, VIEW_MODES
from ..utils.seeding import make_generator
from .step import (Batch, NonFiniteLossError, StepResult, TrainConfig, TrainState, TrainStep, build_batch,
                   make_views)

__all__ = ["MBSSL", "Propagated", "VIEW_MODES", "NonSamplingLoss", "InterBehaviorInfoNCE", "IntraBehaviorInfoNCE",
           "Anchors", "InteractionTerms", "info_nce", "HMG", "STRATEGIES", "Batch",
           "build_batch", "make_generator", "make_views", "TrainConfig", "TrainState", "TrainStep", "StepResult",
           "NonFiniteLossError"]
