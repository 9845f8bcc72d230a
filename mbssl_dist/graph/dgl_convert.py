"""Conversion to and from ``dgl.heterograph``.

DGL is an optional backend (DESIGN.md §2): it lives in its own pinned environment
(tools/dgl_env.sh) and is imported lazily here, never at package import time.
Node types ``user`` and ``item``; for each behavior ``b`` two edge types:
``(user, b, item)`` and its reverse ``(item, rev_b, user)``.
"""

from __future__ import annotations

import importlib.util

import torch

from .multigraph import BehaviorGraph, MultiBehaviorGraph


def dgl_available() -> bool:
    if importlib.util.find_spec("dgl") is None:
        return False
    try:
        import dgl  # noqa: F401
    except Exception:  # DGL 2.1 fails to import on torch > 2.2.1
        return False
    return True


def to_dgl(graph: MultiBehaviorGraph):
    import dgl

    data = {}
    for name, g in zip(graph.behaviors, graph.graphs):
        u, i = g.rows(), g.indices
        data[("user", name, "item")] = (u, i)
        data[("item", f"rev_{name}", "user")] = (i, u)
    return dgl.heterograph(data, num_nodes_dict={"user": graph.n_users, "item": graph.n_items})


def from_dgl(hg, behaviors: list[str] | None = None) -> MultiBehaviorGraph:
    """Inverse of ``to_dgl``; ``behaviors`` fixes the order (target last)."""
    if behaviors is None:
        behaviors = [et for (s, et, d) in hg.canonical_etypes if s == "user" and d == "item"]
    n_users, n_items = hg.num_nodes("user"), hg.num_nodes("item")
    graphs = []
    for name in behaviors:
        u, i = hg.edges(etype=("user", name, "item"))
        graphs.append(BehaviorGraph.from_pairs(u.numpy(), i.numpy(), n_users, n_items))
    return MultiBehaviorGraph(list(behaviors), graphs)
