"""Greedy LPT (longest processing time first): the one bin-packing heuristic of the package.

Used for users -> parts (``partition.assign_edge_balanced``: costs = user degrees, with a cap
on users per part) and swing chunks -> ranks (``swing.parallel.run_side_rank``: costs =
triple counts). Deterministic: items by cost descending, ties by index ascending; each goes
to the least-loaded bin (ties: fewer items first with ``count_ties``, then lower bin id).
"""

from __future__ import annotations

import heapq
import math

import numpy as np


def lpt_assign(costs: np.ndarray, n_bins: int, *, cap: int | None = None,
               count_ties: bool = False) -> np.ndarray:
    """Bin (int64, in ``[0, n_bins)``) of every item of ``costs``.

    ``cap``: at most this many items per bin (a full bin takes no more; ``cap * n_bins``
    must cover the items). ``count_ties``: among bins of equal load, the one holding fewer
    items wins before the lower bin id. Loads are summed in the dtype ``costs`` has (integer
    costs are summed exactly)."""
    costs = np.asarray(costs)
    n = len(costs)
    assign = np.zeros(n, dtype=np.int64)
    if n_bins <= 1 or n == 0:
        return assign
    if cap is not None and cap * n_bins < n:
        raise ValueError(f"{n} items do not fit {n_bins} bins of at most {cap}")
    if cap is None:
        cap = math.inf
    order = np.lexsort((np.arange(n), -costs))  # cost desc, then index asc
    heap = [(0, 0, b) for b in range(n_bins)]  # (load, items (count_ties) or 0, bin)
    held = [0] * n_bins
    for i, c in zip(order.tolist(), costs[order].tolist()):
        load, tie, b = heapq.heappop(heap)
        assign[i] = b
        held[b] += 1
        if held[b] < cap:
            heapq.heappush(heap, (load + c, held[b] if count_ties else 0, b))
    return assign
