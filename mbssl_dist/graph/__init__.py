"""Multi-behavior user-item graph: CSR per behavior, degrees, normalizations, random views."""

from .multigraph import BehaviorGraph, MultiBehaviorGraph, NORMS, view_keep
from .dgl_convert import from_dgl, to_dgl, dgl_available

__all__ = ["BehaviorGraph", "MultiBehaviorGraph", "NORMS", "view_keep", "to_dgl", "from_dgl", "dgl_available"]
