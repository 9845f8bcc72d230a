"""The MBSSL encoder (its propagation written once, forward and reverse), score and interaction term."""

from .mbssl import MBSSL, Propagated
from .propagation import Propagation

__all__ = ["MBSSL", "Propagated", "Propagation"]
