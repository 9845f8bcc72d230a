"""Everything distributed lives in this package; model and loss code only see a ``Comm``."""

from .comm import Comm, LocalComm

__all__ = ["Comm", "LocalComm"]
