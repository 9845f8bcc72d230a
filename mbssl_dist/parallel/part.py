"""What one rank holds of the users (DESIGN.md §4): ``LocalPart``, loaded from a partition
directory (``load_partition``; written offline by ``python -m mbssl_dist.partition``) or
built in memory from the dataset (``local_part_from_dataset``). Either way its graph has
LOCAL user rows normalized with the GLOBAL degrees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import read_columns
from ..graph.multigraph import BehaviorGraph, MultiBehaviorGraph
from ..partition.core import PartitionError, load_degrees, part_dir_name, read_manifest


@dataclass
class LocalPart:
    """What one rank holds: its users (global ids, sorted), their edges as a
    ``MultiBehaviorGraph`` with LOCAL user rows 0..n_local-1, normalized with GLOBAL degrees."""

    part: int
    n_parts: int
    users: np.ndarray  # int64 [n_local], sorted global user ids; local index = position
    graph: MultiBehaviorGraph  # n_users = n_local, n_items = all items
    global_to_local: np.ndarray  # int64 [n_users_global], -1 for users of other parts
    n_users_global: int
    n_items: int
    behaviors: list[str]
    manifest: dict = field(default_factory=dict, repr=False)

    @property
    def n_local(self) -> int:
        return len(self.users)

    def to_local(self, global_users) -> np.ndarray:
        """Local indices of global user ids; raises if any is not in this part."""
        g = np.asarray(global_users, dtype=np.int64)
        if g.size and (g.min() < 0 or g.max() >= self.n_users_global):
            raise PartitionError(f"user id out of range [0, {self.n_users_global})")
        loc = self.global_to_local[g]
        if (loc < 0).any():
            bad = int(g[loc < 0].flat[0])
            raise PartitionError(f"user {bad} is not in part {self.part}")
        return loc

    def to_global(self, local_users) -> np.ndarray:
        return self.users[np.asarray(local_users, dtype=np.int64)]


def load_partition(path: str | os.PathLike, part: int, dataset_sha256: str | None = None) -> LocalPart:
    """Load part ``part`` of a partition directory (see module doc).

    ``dataset_sha256``, when given, must match the prepared dataset the partition was made from.
    """
    path = Path(path)
    m = read_manifest(path)
    P = int(m["parts"])
    if not 0 <= part < P:
        raise PartitionError(f"{path}: part {part} out of range [0, {P})")
    if dataset_sha256 is not None and m["dataset"].get("content_sha256") != dataset_sha256:
        raise PartitionError(f"{path}: made from dataset {m['dataset'].get('content_sha256')!r}, "
                             f"not {dataset_sha256!r}; re-run the partitioner")
    U, I, behaviors = int(m["n_users"]), int(m["n_items"]), list(m["behaviors"])
    K = len(behaviors)
    d = path / part_dir_name(part)
    users = read_columns(d / "users.parquet", ["user"], PartitionError)["user"].astype(np.int64)
    if len(users) != m["per_part"][part]["n_users"] or (len(users) > 1 and (np.diff(users) <= 0).any()):
        raise PartitionError(f"{d}/users.parquet: inconsistent with the manifest or not sorted/unique")
    e = read_columns(d / "edges.parquet", ["user", "item", "behavior"], PartitionError)
    eu, ei, eb = (e["user"].astype(np.int64), e["item"].astype(np.int64), e["behavior"].astype(np.int64))
    g2l = np.full(U, -1, dtype=np.int64)
    g2l[users] = np.arange(len(users))
    lu = g2l[eu]
    if (lu < 0).any():
        raise PartitionError(f"{d}/edges.parquet: edge of user {int(eu[lu < 0][0])} who is not in part {part}")
    if len(ei) and (ei.min() < 0 or ei.max() >= I or eb.min() < 0 or eb.max() >= K):
        raise PartitionError(f"{d}/edges.parquet: item or behavior id out of range")
    user_deg, item_deg = load_degrees(path)
    graphs = []
    for k in range(K):
        mk = eb == k
        graphs.append(BehaviorGraph.from_pairs(
            lu[mk], ei[mk], len(users), I,
            user_deg=torch.from_numpy(user_deg[k, users].astype(np.float64)),
            item_deg=torch.from_numpy(item_deg[k].astype(np.float64))))
    return LocalPart(part=part, n_parts=P, users=users, graph=MultiBehaviorGraph(behaviors, graphs),
                     global_to_local=g2l, n_users_global=U, n_items=I, behaviors=behaviors, manifest=m)


def local_part_from_dataset(ds, assign: np.ndarray, part: int) -> LocalPart:
    """The ``LocalPart`` of ``part`` built in memory from a loaded dataset (no partition dir)."""
    n_parts = int(assign.max()) + 1
    users = np.flatnonzero(assign == part).astype(np.int64)
    g2l = np.full(ds.n_users, -1, dtype=np.int64)
    g2l[users] = np.arange(len(users))
    graphs = []
    for k in range(ds.n_behaviors):
        u, i = ds.pairs(k)
        full_udeg = np.bincount(u, minlength=ds.n_users).astype(np.float64)
        ideg = np.bincount(i, minlength=ds.n_items).astype(np.float64)
        m = assign[u] == part
        graphs.append(BehaviorGraph.from_pairs(g2l[u[m]], i[m], len(users), ds.n_items,
                                               user_deg=torch.from_numpy(full_udeg[users]),
                                               item_deg=torch.from_numpy(ideg)))
    return LocalPart(part=part, n_parts=n_parts, users=users, graph=MultiBehaviorGraph(list(ds.behaviors), graphs),
                     global_to_local=g2l, n_users_global=ds.n_users, n_items=ds.n_items,
                     behaviors=list(ds.behaviors))

