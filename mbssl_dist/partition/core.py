"""User partitioning for the distributed trainer (DESIGN.md §4).

Users are split into P parts; items are replicated on every rank. A part is a set of users
plus all their training edges in all behaviors. Each rank loads only its part with
``parallel.part.load_partition`` and normalizes with the GLOBAL degrees stored in the
partition directory.

Methods
-------
``edge-balanced``
    Greedy LPT (longest processing time first): users sorted by total degree (all behaviors)
    descending, ties by user id ascending; each user goes to the part with the fewest edges
    so far (ties: fewer users, then lower part id) among the parts that still have room.
    A part holds at most ``ceil((1 + user_slack) * n_users / P)`` users (``user_slack``
    defaults to 0.05), so user counts stay balanced too. Independent of the seed (recorded
    anyway). Cheap: O(U log U + U log P).
``metis``
    METIS (pymetis) on the bipartite user+item graph: vertices are users 0..U-1 and items
    U..U+I-1; one undirected edge per distinct (user, item) pair, weight = number of
    behaviors that contain the pair. Vertex weight = total user degree (min 1) for users,
    0 for items, so parts balance EDGES (ufactor 1: within 0.1% when feasible); user counts
    are not constrained (a multi-constraint (degree, count) run balanced much worse) and end
    up within ~10%. Recursive bisection for P <= 8, k-way above (pymetis' default split).
    Item placement is discarded (items are replicated). Deterministic through METIS'
    ``seed`` option (= --seed). The edge cut is a locality proxy only.
``dgl``
    ``dgl.distributed.partition_graph`` on ``to_dgl(graph)`` (see ``dgl_backend``); needs the
    DGL environment (.venv-dgl).

Directory format (``FORMAT_VERSION`` 1), written atomically::

    manifest.json          parts, method, seed, dataset {path, content_sha256}, n_users,
                           n_items, behaviors, per-part counts, balance stats, "items":
                           "replicated", file layout description
    assignment.parquet     user:int32, part:int16       (all users, sorted by user)
    degrees.parquet        behavior:int8, side:string ('user'|'item'), node:int32, degree:int32
                           long table, every node of every behavior (zeros included),
                           sorted by (behavior, side='user' first, node); GLOBAL degrees of
                           the de-duplicated training graph
    part-00000/users.parquet   user:int32  sorted global user ids; local index = position
    part-00000/edges.parquet   user:int32 (global id), item:int32, behavior:int8,
                               sorted by (behavior, user, item)

Edges are de-duplicated per behavior (as ``MultiBehaviorGraph`` does). Item sharding is not
implemented; ``"items": "replicated"`` in the manifest marks the layout so a future version
can add ``"items": "sharded"`` with per-part item lists without breaking readers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ..data.dataset import PreparedDataset, load_prepared, read_columns
from ..graph.multigraph import MultiBehaviorGraph
from ..utils.io import atomic_dir, atomic_write_json
from ..utils.lpt import lpt_assign

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "mbssl_dist.partition"
MANIFEST = "manifest.json"
METHODS = ("edge-balanced", "range", "metis", "dgl")
DEFAULT_USER_SLACK = 0.05
METIS_UFACTOR = 1  # METIS load imbalance tolerance in 1/1000 (1.001)


class PartitionError(ValueError):
    """Bad partition request or unreadable/inconsistent partition directory."""


def part_dir_name(p: int) -> str:
    return f"part-{p:05d}"


# --------------------------------------------------------------------------- edges / degrees

@dataclass
class EdgeList:
    """De-duplicated training edges of all behaviors (COO, int64), plus global degrees."""

    n_users: int
    n_items: int
    behaviors: list[str]
    user: np.ndarray
    item: np.ndarray
    behavior: np.ndarray
    user_deg: np.ndarray  # int64 [K, n_users]
    item_deg: np.ndarray  # int64 [K, n_items]

    @classmethod
    def from_graph(cls, graph: MultiBehaviorGraph) -> "EdgeList":
        us, its, bs = [], [], []
        K = len(graph)
        user_deg = np.zeros((K, graph.n_users), dtype=np.int64)
        item_deg = np.zeros((K, graph.n_items), dtype=np.int64)
        for k, g in enumerate(graph.graphs):
            u = g.rows().numpy().astype(np.int64)
            i = g.indices.numpy().astype(np.int64)
            us.append(u)
            its.append(i)
            bs.append(np.full(len(u), k, dtype=np.int64))
            user_deg[k] = np.bincount(u, minlength=graph.n_users)
            item_deg[k] = np.bincount(i, minlength=graph.n_items)
        return cls(graph.n_users, graph.n_items, list(graph.behaviors), np.concatenate(us),
                   np.concatenate(its), np.concatenate(bs), user_deg, item_deg)

    @property
    def n_behaviors(self) -> int:
        return len(self.behaviors)

    def total_user_degree(self) -> np.ndarray:
        return self.user_deg.sum(0)


# --------------------------------------------------------------------------- assignment

def _check_parts(n_parts: int, n_users: int) -> None:
    if not isinstance(n_parts, (int, np.integer)) or isinstance(n_parts, bool):
        raise PartitionError(f"number of parts must be an integer, got {n_parts!r}")
    if n_parts < 1:
        raise PartitionError(f"number of parts must be >= 1, got {n_parts}")
    if n_parts > n_users:
        raise PartitionError(f"cannot split {n_users} users into {n_parts} parts: every part needs at "
                             f"least one user (use --parts <= {n_users})")
    if n_parts > np.iinfo(np.int16).max:
        raise PartitionError(f"at most {np.iinfo(np.int16).max} parts are supported, got {n_parts}")


def assign_edge_balanced(user_degree: np.ndarray, n_parts: int,
                         user_slack: float = DEFAULT_USER_SLACK) -> np.ndarray:
    """Greedy LPT assignment balancing edges, with a cap on users per part (see module doc)."""
    deg = np.asarray(user_degree, dtype=np.int64)
    n = len(deg)
    _check_parts(n_parts, n)
    if user_slack < 0:
        raise PartitionError(f"user_slack must be >= 0, got {user_slack}")
    cap = max(math.ceil(n / n_parts), math.ceil((1.0 + user_slack) * n / n_parts))
    return lpt_assign(deg, n_parts, cap=cap, count_ties=True).astype(np.int16)


def assign_range(user_degree: np.ndarray, n_parts: int) -> np.ndarray:
    """Contiguous user-id ranges with balanced cost, cost(u) = degree(u) + mean degree (a
    user's rows cost as much as its edges on average). Each rank's users are then one id
    range, so per-block random draws keyed by global ids (dropout masks) stay local."""
    deg = np.asarray(user_degree, dtype=np.float64)
    n = len(deg)
    _check_parts(n_parts, n)
    cost = deg + (deg.mean() if n else 0.0)
    cum = np.cumsum(cost)
    total = cum[-1] if n else 0.0
    # part p starts at the first user whose cumulative cost exceeds p/P of the total
    starts = np.searchsorted(cum, total * np.arange(1, n_parts) / n_parts, side="right").tolist()
    prev = 0
    for j in range(n_parts - 1):  # strictly increasing, leaving a user for every later part
        starts[j] = min(max(starts[j], prev + 1), n - (n_parts - 1 - j))
        prev = starts[j]
    out = np.zeros(n, dtype=np.int16)
    for p, s in enumerate(starts, start=1):
        out[s:] = p
    return out


def _repair_empty_parts(assign: np.ndarray, n_parts: int, weight: np.ndarray) -> int:
    """Give every empty part one user (lowest-weight user, lowest id, of the largest part)."""
    moved = 0
    for p in range(n_parts):
        counts = np.bincount(assign, minlength=n_parts)
        if counts[p] > 0:
            continue
        big = int(np.argmax(counts))
        cand = np.flatnonzero(assign == big)
        u = cand[np.lexsort((cand, weight[cand]))[0]]
        assign[u] = p
        moved += 1
    return moved


def assign_metis(edges: EdgeList, n_parts: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """METIS on the bipartite user+item graph (see module doc). Returns (assignment, info)."""
    import pymetis

    U, I = edges.n_users, edges.n_items
    _check_parts(n_parts, U)
    deg = edges.total_user_degree()
    # Distinct (user, item) pairs, weight = number of behaviors containing the pair.
    b = sp.csr_matrix((np.ones(len(edges.user), dtype=np.int64), (edges.user, edges.item)), shape=(U, I))
    b.sum_duplicates()
    adj = sp.bmat([[None, b], [b.T, None]], format="csr", dtype=np.int64)
    adj.sort_indices()
    xadj = adj.indptr.astype(np.int64)
    adjncy = adj.indices.astype(np.int64)
    ew = adj.data.astype(np.int64)
    nv = U + I
    # One balance constraint: user vertex weight = total degree (at least 1, so users without
    # edges still count), item vertices weigh 0. Multi-constraint (degree, count) balanced
    # both far worse on Taobao (edges max/mean 1.13-1.4), so user counts are only reported.
    vw = np.zeros(nv, dtype=np.int64)
    vw[:U] = np.maximum(deg, 1)
    t0 = time.time()
    if n_parts == 1:
        assign = np.zeros(U, dtype=np.int16)
        cut = 0
    else:
        opts = pymetis.Options(seed=int(seed), ufactor=METIS_UFACTOR)
        res = pymetis.part_graph(n_parts, adjacency=pymetis.CSRAdjacency(xadj, adjncy),
                                 vweights=vw, eweights=ew, options=opts, recursive=n_parts <= 8)
        cut = int(res[0])
        assign = np.asarray(res[1], dtype=np.int64)[:U].astype(np.int16)
    moved = _repair_empty_parts(assign, n_parts, deg)
    info = {"graph": "bipartite user+item", "vertices": nv, "undirected_edges": int(b.nnz),
            "edge_weight": "number of behaviors with the (user, item) pair",
            "vertex_weight": "user: total degree (min 1); item: 0",
            "scheme": "recursive bisection" if n_parts <= 8 else "k-way", "ufactor": METIS_UFACTOR,
            "metis_seed": int(seed), "edge_cut": cut, "empty_parts_repaired": moved,
            "metis_seconds": round(time.time() - t0, 3)}
    if moved:
        log.warning("METIS left %d part(s) empty; moved one low-degree user into each", moved)
    return assign, info


def compute_assignment(edges: EdgeList, n_parts: int, method: str, seed: int = 0,
                       **opts: Any) -> tuple[np.ndarray, dict]:
    """User -> part (int16 [n_users]) for ``method`` in ``METHODS``; returns (assignment, info)."""
    if method not in METHODS:
        raise PartitionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_parts(n_parts, edges.n_users)
    if method == "edge-balanced":
        slack = float(opts.get("user_slack", DEFAULT_USER_SLACK))
        a = assign_edge_balanced(edges.total_user_degree(), n_parts, slack)
        return a, {"algorithm": "greedy LPT by total user degree, ties by user id; user cap "
                                "ceil((1+user_slack)*n_users/P)", "user_slack": slack}
    if method == "range":
        return assign_range(edges.total_user_degree(), n_parts), {
            "algorithm": "contiguous user-id ranges balancing degree + mean degree"}
    if method == "metis":
        return assign_metis(edges, n_parts, seed)
    from .dgl_backend import assign_dgl

    return assign_dgl(edges, n_parts, seed, part_method=opts.get("dgl_part_method", "metis"))


# --------------------------------------------------------------------------- statistics

def _balance(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    mean = float(x.mean())
    return {"max": int(x.max()), "min": int(x.min()), "mean": mean,
            "max_over_mean": float(x.max() / mean) if mean > 0 else None}


def partition_stats(edges: EdgeList, assign: np.ndarray, n_parts: int) -> dict:
    """Per-part user/edge counts and balance, recomputed from an assignment."""
    K = edges.n_behaviors
    users = np.bincount(assign.astype(np.int64), minlength=n_parts)
    ep = assign.astype(np.int64)[edges.user]
    per_b = np.zeros((n_parts, K), dtype=np.int64)
    np.add.at(per_b, (ep, edges.behavior), 1)
    per_part = []
    for p in range(n_parts):
        per_part.append({"part": p, "dir": part_dir_name(p), "n_users": int(users[p]),
                         "n_edges": int(per_b[p].sum()),
                         "n_edges_per_behavior": {b: int(per_b[p, k]) for k, b in enumerate(edges.behaviors)}})
    return {"per_part": per_part,
            "balance": {"users": _balance(users), "edges": _balance(per_b.sum(1))}}


def format_balance(manifest: dict) -> str:
    lines = [f"{manifest['parts']} part(s), method {manifest['method']}:"]
    for pp in manifest["per_part"]:
        lines.append(f"  part {pp['part']}: {pp['n_users']} users, {pp['n_edges']} edges")
    bu, be = manifest["balance"]["users"], manifest["balance"]["edges"]
    lines.append(f"  users max/mean = {bu['max']}/{bu['mean']:.1f} = {bu['max_over_mean']:.4f}; "
                 f"edges max/mean = {be['max']}/{be['mean']:.1f} = {be['max_over_mean']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- writing

def _write_table(path: Path, cols: dict[str, np.ndarray]) -> None:
    pq.write_table(pa.table({k: pa.array(v) for k, v in cols.items()}), path)


def write_partition(out: str | os.PathLike, edges: EdgeList, assign: np.ndarray, n_parts: int, *,
                    method: str, seed: int, dataset: dict | None = None, info: dict | None = None,
                    overwrite: bool = False) -> dict:
    """Write the partition directory atomically; returns the manifest."""
    assign = np.asarray(assign, dtype=np.int16)
    if assign.shape != (edges.n_users,):
        raise PartitionError(f"assignment has shape {assign.shape}, expected ({edges.n_users},)")
    if len(assign) and (assign.min() < 0 or assign.max() >= n_parts):
        raise PartitionError(f"assignment values must be in [0, {n_parts})")
    stats = partition_stats(edges, assign, n_parts)
    empty = [pp["part"] for pp in stats["per_part"] if pp["n_users"] == 0]
    if empty:
        raise PartitionError(f"part(s) {empty} have no users")
    K = edges.n_behaviors
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_table(tmp / "assignment.parquet", {"user": np.arange(edges.n_users, dtype=np.int32),
                                                  "part": assign})
        # Long degree table: for each behavior, all users then all items.
        beh, side, node, degree = [], [], [], []
        for k in range(K):
            for s, d in (("user", edges.user_deg[k]), ("item", edges.item_deg[k])):
                beh.append(np.full(len(d), k, dtype=np.int8))
                side.extend([s] * len(d))
                node.append(np.arange(len(d), dtype=np.int32))
                degree.append(d.astype(np.int32))
        pq.write_table(pa.table({"behavior": pa.array(np.concatenate(beh)),
                                 "side": pa.array(side, type=pa.string()),
                                 "node": pa.array(np.concatenate(node)),
                                 "degree": pa.array(np.concatenate(degree))}), tmp / "degrees.parquet")
        ep = assign.astype(np.int64)[edges.user]
        # Sort all edges once by (part, behavior, user, item), then slice per part.
        order = np.lexsort((edges.item, edges.user, edges.behavior, ep))
        bounds = np.searchsorted(ep[order], np.arange(n_parts + 1))
        for p in range(n_parts):
            d = tmp / part_dir_name(p)
            d.mkdir()
            _write_table(d / "users.parquet", {"user": np.flatnonzero(assign == p).astype(np.int32)})
            sel = order[bounds[p]:bounds[p + 1]]
            _write_table(d / "edges.parquet", {"user": edges.user[sel].astype(np.int32),
                                               "item": edges.item[sel].astype(np.int32),
                                               "behavior": edges.behavior[sel].astype(np.int8)})
        per_b_total = np.bincount(edges.behavior, minlength=K)
        manifest = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "parts": int(n_parts),
            "method": method,
            "seed": int(seed),
            "dataset": dict(dataset or {}),
            "n_users": int(edges.n_users),
            "n_items": int(edges.n_items),
            "behaviors": list(edges.behaviors),
            "n_edges": int(len(edges.user)),
            "n_edges_per_behavior": {b: int(per_b_total[k]) for k, b in enumerate(edges.behaviors)},
            "users": "partitioned",
            "items": "replicated",
            "edges": "training edges, de-duplicated per behavior; a part holds all edges of its users",
            "files": {
                "assignment": "assignment.parquet (user:int32, part:int16), all users",
                "degrees": "degrees.parquet long table (behavior:int8, side:'user'|'item', node:int32, "
                           "degree:int32), global degrees, all nodes incl. zeros",
                "part_users": "part-{p:05d}/users.parquet (user:int32) sorted global ids; local index = position",
                "part_edges": "part-{p:05d}/edges.parquet (user:int32 global, item:int32, behavior:int8)",
            },
            **stats,
            "method_info": dict(info or {}),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def partition_dataset(data: str | os.PathLike | PreparedDataset, out: str | os.PathLike, n_parts: int,
                      method: str = "edge-balanced", seed: int = 0, overwrite: bool = False,
                      **opts: Any) -> dict:
    """Load a prepared dataset, partition its users and write ``out``; returns the manifest.

    Every check happens before anything is written, so a failure leaves no output behind.
    """
    t0 = time.time()
    if method not in METHODS:
        raise PartitionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(n_parts, (int, np.integer)) or n_parts < 1:
        raise PartitionError(f"number of parts must be an integer >= 1, got {n_parts!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: output directory already exists (pass --overwrite to replace it)")
    ds = data if isinstance(data, PreparedDataset) else load_prepared(data)
    if ds.path is not None:
        src, dst = Path(ds.path).resolve(), out.resolve()
        if dst == src or dst in src.parents:
            raise PartitionError(f"--out {out} would replace the dataset directory {ds.path}")
    if method == "dgl":
        from .dgl_backend import require_dgl
        require_dgl()
    edges = EdgeList.from_graph(MultiBehaviorGraph.from_dataset(ds))
    _check_parts(n_parts, edges.n_users)
    t1 = time.time()
    assign, info = compute_assignment(edges, n_parts, method, seed, **opts)
    info["assign_seconds"] = round(time.time() - t1, 3)
    dataset = {"path": str(Path(ds.path).resolve()) if ds.path is not None else None,
               "content_sha256": ds.checksum()}
    manifest = write_partition(out, edges, assign, n_parts, method=method, seed=seed, dataset=dataset,
                               info=info, overwrite=overwrite)
    manifest["elapsed_seconds"] = round(time.time() - t0, 3)
    return manifest


# --------------------------------------------------------------------------- loading

def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise PartitionError(f"{path}: not a partition directory (no {MANIFEST}); run "
                             "`python -m mbssl_dist.partition` first")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise PartitionError(f"{mpath}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise PartitionError(f"{path}: not a partition directory ({MANIFEST} has kind "
                             f"{m.get('kind') if isinstance(m, dict) else None!r}, expected {KIND!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise PartitionError(f"{mpath}: format_version {m.get('format_version')!r}, expected "
                             f"{FORMAT_VERSION}; re-run the partitioner")
    if m.get("items") != "replicated":
        raise PartitionError(f"{mpath}: items layout {m.get('items')!r} is not supported by this reader")
    return m


def load_assignment(path: str | os.PathLike) -> np.ndarray:
    """part id (int16) of every user."""
    m = read_manifest(path)
    a = read_columns(Path(path) / "assignment.parquet", ["user", "part"], PartitionError)
    out = np.full(m["n_users"], -1, dtype=np.int16)
    out[a["user"].astype(np.int64)] = a["part"]
    return out


def load_degrees(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Global degrees: (user_deg int64 [K, n_users], item_deg int64 [K, n_items])."""
    m = read_manifest(path)
    K, U, I = len(m["behaviors"]), m["n_users"], m["n_items"]
    d = read_columns(Path(path) / "degrees.parquet", ["behavior", "side", "node", "degree"], PartitionError)
    beh = d["behavior"].astype(np.int64)
    node = d["node"].astype(np.int64)
    is_user = d["side"] == "user"
    ud = np.zeros((K, U), dtype=np.int64)
    idg = np.zeros((K, I), dtype=np.int64)
    ud[beh[is_user], node[is_user]] = d["degree"][is_user]
    idg[beh[~is_user], node[~is_user]] = d["degree"][~is_user]
    return ud, idg
