"""Validation split and test/train consistency checks.

Validation (DESIGN.md §5): for every user with at least two training target interactions,
one of them (chosen by a generator seeded with ``seed``; or the latest one when timestamps
are given) is moved from train to validation. Users with a single training purchase keep it
and have no validation item. Auxiliary behaviors are untouched: just as for the test item,
the validation item may also appear among the user's views or carts.
"""

from __future__ import annotations

import numpy as np


def carve_validation(users: np.ndarray, items: np.ndarray, seed: int,
                     timestamps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (keep_mask over the target pairs, valid_index) for one item per eligible user."""
    n = len(users)
    if n == 0:
        return np.ones(0, dtype=bool), np.zeros(0, dtype=np.int64)
    if timestamps is None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A11D]))
        key = rng.random(n)
    else:
        key = timestamps.astype(np.float64)
    # Sort by user, then key, then item (deterministic tie-break); last of each user wins.
    order = np.lexsort((items, key, users))
    su = users[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = su[1:] != su[:-1]
    first = np.ones(n, dtype=bool)
    first[1:] = su[1:] != su[:-1]
    eligible = last & ~first  # user has >= 2 target pairs
    valid_idx = order[eligible]
    keep = np.ones(n, dtype=bool)
    keep[valid_idx] = False
    return keep, np.sort(valid_idx)


def pair_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return users.astype(np.int64) * np.int64(n_items) + items.astype(np.int64)
