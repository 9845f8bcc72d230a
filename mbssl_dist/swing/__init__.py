"""Swing similarity (DESIGN Eq 6): exact top-N item-item and user-user lists.

``python -m mbssl_dist.swing --data PREPARED --out DIR --workers W`` writes Parquet parts and a
manifest; the trainer reads them back with ``load_swing_topn``.
"""

from .core import (DEFAULT_ALPHA, DEFAULT_TOPN, swing_full, swing_topk,
                   swing_topk_combined, topk_dense)
from .store import load_swing, load_swing_topn, read_manifest

__all__ = ["DEFAULT_ALPHA", "DEFAULT_TOPN", "swing_topk", "swing_topk_combined", "swing_full",
           "topk_dense", "load_swing", "load_swing_topn", "read_manifest"]
