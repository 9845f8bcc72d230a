"""``--method dgl``: user assignment from ``dgl.distributed.partition_graph``.

DGL lives in its own environment (tools/dgl_env.sh -> .venv-dgl; DGL 2.1 does not import on
newer torch) and is imported lazily. We build the heterograph with ``graph.to_dgl`` (node
types ``user``/``item``) from ONE merged behavior holding the distinct (user, item) pairs of
all behaviors, i.e. edge types ``(user, interact, item)`` and ``(item, rev_interact, user)``:
the per-behavior heterograph has parallel edges, on which DGL 2.1's METIS path corrupts the
heap (abort "free(): corrupted unsorted chunks"). A user's in-degree is then its number of
distinct items, so edge balance is by distinct pairs, not by per-behavior edges. We let
DGL partition it into a temporary directory (it converts to a homogeneous graph internally;
``balance_ntypes`` defaults to the node type, so users and items are balanced separately, and
``balance_edges=True`` adds in-degree as a METIS constraint), and read the user assignment
back: DGL reshuffles node ids so that the users of part p are the contiguous per-type range
given by ``node_map['user'][p]`` in the partition config, and ``orig_nids['user']`` (from
``return_mapping=True``) lists original user ids in reshuffled order. Item placement is
discarded (items are replicated). The DGL output directory is deleted; we write our format.
Determinism: ``random`` is reproducible (``dgl.random.seed(seed)``); DGL 2.1's METIS path is
NOT — ``dgl.partition.metis_partition_assignment`` returns different partitions on repeated
calls with the same graph in one process (no seed is exposed), so the manifest records
``"deterministic": false``. Use ``--method metis`` (pymetis, seeded) for reproducible METIS.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
DGL_PART_METHODS = ("metis", "random")


def require_dgl() -> None:
    from ..graph.dgl_convert import dgl_available
    from .core import PartitionError

    if not dgl_available():
        raise PartitionError(
            "--method dgl needs DGL, which cannot be imported in this Python environment "
            f"(torch {torch.__version__}; DGL 2.1 needs torch 2.2.1). Build the DGL environment with "
            "`tools/dgl_env.sh` and run `.venv-dgl/bin/python -m mbssl_dist.partition ... --method dgl`.")


def dgl_input_graph(edges):
    """The heterograph we hand to DGL: distinct (user, item) pairs of all behaviors."""
    from ..graph.dgl_convert import to_dgl
    from ..graph.multigraph import BehaviorGraph, MultiBehaviorGraph

    # One merged edge type of DISTINCT (user, item) pairs (+ its reverse): the per-behavior
    # heterograph has parallel edges (a pair in several behaviors), which DGL 2.1's METIS path
    # corrupts the heap on ("free(): corrupted unsorted chunks", reproduced on synthetic data).
    key = np.unique(edges.user * np.int64(edges.n_items) + edges.item)
    merged = BehaviorGraph.from_pairs(key // edges.n_items, key % edges.n_items, edges.n_users, edges.n_items)
    return to_dgl(MultiBehaviorGraph(["interact"], [merged]))


def run_partition_graph(hg, n_parts: int, out_dir: str | Path, seed: int = 0, part_method: str = "metis",
                        graph_name: str = "mbssl"):
    """``dgl.distributed.partition_graph`` into ``out_dir``; returns (orig_nids, config path)."""
    from .core import PartitionError

    import dgl

    dgl.random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            orig_nids, _ = dgl.distributed.partition_graph(
                hg, graph_name, n_parts, str(out_dir), num_hops=1, part_method=part_method,
                balance_edges=True, return_mapping=True)
    except Exception as e:  # DGL raises assorted errors (e.g. a part without some edge type)
        raise PartitionError(f"dgl.distributed.partition_graph failed: {type(e).__name__}: {e}") from e
    finally:
        for line in buf.getvalue().splitlines():
            log.debug("dgl: %s", line)
    return orig_nids, Path(out_dir) / f"{graph_name}.json"


def assignment_from_dgl(config_path: str | Path, orig_nids, n_users: int, n_parts: int) -> np.ndarray:
    """User -> part from DGL's partition config (node_map ranges) and ``orig_nids['user']``."""
    from .core import PartitionError

    config = json.loads(Path(config_path).read_text())
    ranges = config["node_map"]["user"]
    counts = [int(e) - int(s) for s, e in ranges]
    order = orig_nids["user"].numpy().astype(np.int64)
    if len(ranges) != n_parts or sum(counts) != n_users or len(order) != n_users:
        raise PartitionError(f"unexpected DGL partition output: node_map['user']={ranges}, "
                             f"{len(order)} mapped users, expected {n_users} users in {n_parts} parts")
    assign = np.full(n_users, -1, dtype=np.int16)
    assign[order] = np.repeat(np.arange(n_parts, dtype=np.int16), counts)
    if (assign < 0).any():
        raise PartitionError("DGL partition did not assign every user")
    return assign


def assign_dgl(edges, n_parts: int, seed: int = 0, part_method: str = "metis") -> tuple[np.ndarray, dict]:
    """User -> part via ``dgl.distributed.partition_graph``; returns (assignment int16, info)."""
    from .core import PartitionError

    require_dgl()
    if part_method not in DGL_PART_METHODS:
        raise PartitionError(f"unknown DGL part_method {part_method!r}; choose one of {DGL_PART_METHODS}")
    import dgl

    hg = dgl_input_graph(edges)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mbssl-dgl-part-") as tmp:
        orig_nids, config = run_partition_graph(hg, n_parts, tmp, seed, part_method)
        assign = assignment_from_dgl(config, orig_nids, edges.n_users, n_parts)
    info = {"dgl_version": dgl.__version__, "torch_version": torch.__version__,
            "part_method": part_method, "balance_edges": True, "num_hops": 1,
            "deterministic": part_method == "random",
            "heterograph": "to_dgl() of the distinct (user, item) pairs of all behaviors: "
                           "(user,interact,item) + (item,rev_interact,user)",
            "dgl_seconds": round(time.time() - t0, 3)}
    return assign, info
