"""How the work is laid out over ranks (DESIGN.md §4): which users a rank owns (its
``part.LocalPart``), the gradient all-reduce of replicated parameters, and
partition-invariant random views. All of it reduces to the single-process case at P = 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..graph import BehaviorGraph, MultiBehaviorGraph, view_keep
from ..partition import assign_edge_balanced, compute_assignment
from ..partition.core import EdgeList
from .comm import Comm
from .part import LocalPart, load_partition, local_part_from_dataset

log = logging.getLogger(__name__)


def shard_users(ds, comm: Comm, method: str = "edge-balanced", partition_dir: str = "", seed: int = 0) -> LocalPart:
    """This rank's users. With ``partition_dir`` the rank loads only its part from disk (made
    by ``python -m mbssl_dist.partition``); otherwise every rank computes the same
    deterministic assignment in memory."""
    P = comm.world_size
    if partition_dir:
        part = load_partition(Path(partition_dir), comm.rank, dataset_sha256=ds.checksum() or None)
        if part.n_parts != P:
            raise ValueError(f"{partition_dir} has {part.n_parts} parts but the job has {P} ranks")
        return part
    if P == 1:
        assign = np.zeros(ds.n_users, dtype=np.int16)
    elif method == "edge-balanced":
        assign = assign_edge_balanced(np.bincount(ds.train_user, minlength=ds.n_users), P)
    else:
        edges = EdgeList.from_graph(MultiBehaviorGraph.from_dataset(ds))
        assign, _ = compute_assignment(edges, P, method, seed)
    return local_part_from_dataset(ds, np.asarray(assign), comm.rank)


class GradReducer:
    """``reduce_grads(grads, sharded)`` hook of ``TrainStep``: sums the replicated
    parameters' gradients over ranks in ONE flat bucket per call (= per task); sharded
    (user-row) gradients stay local. Unused gradients (None) become zeros on every world
    size, so every rank enters the collective with the same shapes and 1 rank and N ranks
    hand identical inputs to HMG."""

    def __init__(self, params: list[torch.Tensor], comm: Comm):
        self.params = list(params)
        self.comm = comm

    def __call__(self, grads: list, sharded: list[bool]) -> list:
        out = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)]
        if self.comm.world_size == 1:
            return out
        idx = [j for j, s in enumerate(sharded) if not s]
        if not idx:
            return out
        flat = torch.cat([out[j].reshape(-1) for j in idx])
        self.comm.all_reduce_sum_(flat)
        off = 0
        for j in idx:
            n = out[j].numel()
            out[j] = flat[off: off + n].view_as(out[j])
            off += n
        return out


def target_views(part: LocalPart, mode: str, p: float, seed: int, epoch: int, comm: Comm, norm: str = "sym",
                 dtype: torch.dtype = torch.float32, device="cpu"):
    """Two random views of the target behavior (``edge`` or ``node`` dropout), identical
    for any number of ranks: keep decisions hash (global user, item) ids, and the view's item
    degrees are summed over ranks so normalization uses global view degrees."""
    g = part.graph.target
    rows = g.rows()
    gu = part.users[rows.numpy()]
    gi = g.indices.numpy()
    U, I = part.n_users_global, part.n_items
    out = []
    for view in range(2):
        keep = torch.from_numpy(view_keep(gu, gi, U, I, mode, p, seed, epoch, view))
        lu = rows[keep]
        li = g.indices[keep]
        udeg = torch.bincount(lu, minlength=g.n_users).to(torch.float64)
        ideg = torch.bincount(li, minlength=I).to(torch.float64)
        comm.all_reduce_sum_(ideg)
        v = BehaviorGraph.from_pairs(lu.numpy(), li.numpy(), g.n_users, I, user_deg=udeg, item_deg=ideg)
        out.append(v.adjacency(norm, dtype, device))
    return out
