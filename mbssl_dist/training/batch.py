"""A training batch: one rank's share of the batch users, their positives per behavior, the
SSL anchors with their false negatives, and the interaction-scoring indicators."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from ..graph.sparse import csr_rows, csr_rows_table
from .losses import Anchors


@dataclass
class Batch:
    """One rank's share of a training batch.

    users: local user rows; pos[k] = (row into ``users``, item) of behavior k's positives;
    user_anchors / item_anchors: SSL anchors (reference: every (user, purchased item) pair →
    users weighted by their target-positive count, purchased items with multiplicity), with
    false-negative rows attached; interaction: indicator inputs for interaction scoring."""

    users: torch.Tensor
    pos: list[tuple[torch.Tensor, torch.Tensor]]
    user_anchors: Anchors
    item_anchors: Anchors
    pos_indicators: torch.Tensor | None = None  # [nnz_target_pos, K]
    supp_rows: torch.Tensor | None = None
    supp_items: torch.Tensor | None = None
    supp_indicators: torch.Tensor | None = None  # [n_supp, K]

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor (anchors and false-negative tables included) on ``device``."""
        return _to_device(self, torch.device(device))


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(x, device) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)})
    return obj


def build_batch(csr: Sequence[tuple[torch.Tensor, torch.Tensor]], users: torch.Tensor, n_items: int,
                user_ids: torch.Tensor | None = None,
                user_fn: tuple[torch.Tensor, torch.Tensor] | None = None,
                item_fn: tuple[torch.Tensor, torch.Tensor] | None = None,
                interaction: bool = False, interaction_include_target: bool = False) -> Batch:
    """Build a :class:`Batch` from the local per-behavior user->item CSR (indptr, indices).

    users: local rows of the batch users on this rank. user_ids: global ids of all local rows
    (None = identity). user_fn: FN table indexed by *local* user row, global user ids as
    values; item_fn: FN table over all items."""
    users = users.to(torch.int64)
    K = len(csr)
    pos = [csr_rows(ip.to(torch.int64), ix.to(torch.int64), users) for ip, ix in csr]
    t_rows, t_items = pos[-1]
    u_w = torch.bincount(t_rows, minlength=users.numel()).to(torch.float64)
    keep = u_w > 0
    u_rows = users[keep]
    gids = u_rows if user_ids is None else user_ids[u_rows]
    fptr, fidx = csr_rows_table(user_fn, u_rows)
    user_anchors = Anchors(u_rows, u_w[keep], gids, fptr, fidx)
    items, i_w = torch.unique(t_items, return_counts=True)
    iptr, iidx = csr_rows_table(item_fn, items)
    item_anchors = Anchors(items, i_w.to(torch.float64), items, iptr, iidx)
    b = Batch(users, pos, user_anchors, item_anchors)
    if interaction:
        keys = [r * n_items + i for r, i in pos]
        skeys = [torch.sort(kk)[0] for kk in keys]
        cand = [kk for k, kk in enumerate(keys) if k < K - 1 or interaction_include_target]
        supp = torch.unique(torch.cat(cand)) if cand else torch.zeros(0, dtype=torch.int64)

        def ind(q: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.isin(q, sk).to(torch.float64) for sk in skeys], 1) if q.numel() else \
                torch.zeros(0, K, dtype=torch.float64)

        b.pos_indicators = ind(keys[-1])
        b.supp_rows = supp // n_items
        b.supp_items = supp % n_items
        b.supp_indicators = ind(supp)
    return b
