"""Per-behavior bipartite graphs as torch CSR tensors.

Propagation in MBSSL updates users from items and items from users with the normalized
bipartite adjacency of each behavior. We keep the user->item CSR (``indptr``/``indices``)
and build, on demand and cached, the two normalized sparse matrices

    A_ui (n_users x n_items)  used for   E_u' = A_ui @ E_i
    A_iu (n_items x n_users)  used for   E_i' = A_iu @ E_u

Normalizations (DESIGN.md §3): ``sym`` = D_u^-1/2 A D_i^-1/2 (the authors' code, no self
loops) and ``row`` = mean aggregation (the paper's text). Degrees may be passed in
explicitly so that a rank holding only its users' edges still normalizes with the global
degrees (distributed layout, DESIGN.md §4). Sparse values are constants (no autograd through
them: gradients w.r.t. CSR values are slow on torch 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import warnings

import numpy as np
import torch

from ..utils.seeding import uniform_hash

# torch warns on every CSR construction that sparse CSR is "beta" and that invariant checks
# are off; our CSR arrays are built sorted and validated here, so the noise is dropped.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

NORMS = ("sym", "row")


def _csr_from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, de-duplicated CSR (indptr, indices) from COO pairs."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    if len(rows) > 1:
        keep = np.ones(len(rows), dtype=bool)
        keep[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])
        rows, cols = rows[keep], cols[keep]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    np.cumsum(indptr, out=indptr)
    return torch.from_numpy(indptr), torch.from_numpy(cols)


@dataclass
class BehaviorGraph:
    """One behavior's user->item bipartite graph.

    ``user_deg``/``item_deg`` default to the degrees of the edges held here; pass global
    degrees when this object holds only part of the graph.
    """

    n_users: int
    n_items: int
    indptr: torch.Tensor  # int64 [n_users + 1]
    indices: torch.Tensor  # int64 [nnz], item ids, sorted within each row
    user_deg: torch.Tensor | None = None  # float [n_users]
    item_deg: torch.Tensor | None = None  # float [n_items]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.user_deg is None:
            self.user_deg = (self.indptr[1:] - self.indptr[:-1]).to(torch.float64)
        if self.item_deg is None:
            self.item_deg = torch.bincount(self.indices, minlength=self.n_items).to(torch.float64)

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
                   user_deg: torch.Tensor | None = None, item_deg: torch.Tensor | None = None) -> "BehaviorGraph":
        indptr, indices = _csr_from_pairs(users, items, n_users)
        return cls(n_users, n_items, indptr, indices, user_deg, item_deg)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def rows(self) -> torch.Tensor:
        """User id of every edge (COO row index)."""
        return torch.repeat_interleave(torch.arange(self.n_users), self.indptr[1:] - self.indptr[:-1])

    def edge_values(self, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge weights for A_ui and for A_iu (aligned with this CSR's edge order)."""
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        u, i = self.rows(), self.indices
        du = self.user_deg.clamp(min=1.0)
        di = self.item_deg.clamp(min=1.0)
        if norm == "sym":
            w = 1.0 / torch.sqrt(du[u] * di[i])
            return w, w
        return 1.0 / du[u], 1.0 / di[i]

    def adjacency(self, norm: str = "sym", dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized (A_ui, A_iu) as sparse CSR tensors; cached per (norm, dtype, device)."""
        key = (norm, dtype, str(device))
        if key not in self._cache:
            w_ui, w_iu = self.edge_values(norm)
            a_ui = torch.sparse_csr_tensor(self.indptr, self.indices, w_ui.to(dtype),
                                           size=(self.n_users, self.n_items))
            # Transpose: item -> user CSR with the same edge weights.
            u = self.rows()
            order = torch.argsort(self.indices * self.n_users + u)
            it_indptr = torch.zeros(self.n_items + 1, dtype=torch.int64)
            it_indptr[1:] = torch.cumsum(torch.bincount(self.indices, minlength=self.n_items), 0)
            a_iu = torch.sparse_csr_tensor(it_indptr, u[order], w_iu[order].to(dtype),
                                           size=(self.n_items, self.n_users))
            self._cache[key] = (a_ui.to(device), a_iu.to(device))
        return self._cache[key]

    def subgraph_edges(self, keep: torch.Tensor, renormalize: bool = True) -> "BehaviorGraph":
        """Graph with only the edges where ``keep`` (bool [nnz]) is true.

        With ``renormalize`` the view's own degrees are used (as SGL-style views do);
        otherwise the original degrees are kept.
        """
        u = self.rows()[keep]
        i = self.indices[keep]
        indptr = torch.zeros(self.n_users + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(torch.bincount(u, minlength=self.n_users), 0)
        if renormalize:
            return BehaviorGraph(self.n_users, self.n_items, indptr, i.clone())
        return BehaviorGraph(self.n_users, self.n_items, indptr, i.clone(), self.user_deg, self.item_deg)

    def to_scipy(self):
        import scipy.sparse as sp

        data = np.ones(self.nnz, dtype=np.float32)
        return sp.csr_matrix((data, self.indices.numpy(), self.indptr.numpy()), shape=(self.n_users, self.n_items))


@dataclass
class MultiBehaviorGraph:
    """All behaviors of a dataset (target last), sharing one user and one item id space."""

    behaviors: list[str]
    graphs: list[BehaviorGraph]

    @classmethod
    def from_dataset(cls, ds) -> "MultiBehaviorGraph":
        """Build from a ``PreparedDataset`` (training interactions only)."""
        graphs = []
        for k in range(ds.n_behaviors):
            u, i = ds.pairs(k)
            graphs.append(BehaviorGraph.from_pairs(u, i, ds.n_users, ds.n_items))
        return cls(list(ds.behaviors), graphs)

    @property
    def n_users(self) -> int:
        return self.graphs[0].n_users

    @property
    def n_items(self) -> int:
        return self.graphs[0].n_items

    @property
    def target(self) -> BehaviorGraph:
        return self.graphs[-1]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, k: int) -> BehaviorGraph:
        return self.graphs[k]

    def adjacency(self, k: int, norm: str = "sym", dtype=torch.float32, device="cpu"):
        return self.graphs[k].adjacency(norm, dtype, device)

    def user_degrees(self) -> torch.Tensor:
        """Total degree of each user over all behaviors (for edge-balanced partitioning)."""
        return sum(g.user_deg for g in self.graphs)


def view_keep(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, mode: str, p: float,
              seed: int, epoch: int, view: int) -> np.ndarray:
    """Which edges (global user id, item id) random view ``view`` (0 or 1) of an epoch keeps.
    ``edge``: each edge independently with probability 1 - p (the paper's ρ); ``node``: drop
    each user and item node with probability p, with all its edges (the authors' code).
    Decisions hash global ids, so any partition of the edges draws the same view."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"view dropout p must be in [0, 1), got {p}")
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if mode == "edge":
        return uniform_hash(users * n_items + items, seed, epoch, 2 * view) >= p
    if mode == "node":
        return (uniform_hash(users, seed, epoch, 2 * view) >= p) & \
            (uniform_hash(items + n_users, seed, epoch, 2 * view + 1) >= p)
    raise ValueError(f"view mode must be 'edge' or 'node', got {mode!r}")
