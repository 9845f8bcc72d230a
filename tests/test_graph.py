"""Graph object: CSR, degrees, normalizations against dense formulas, seeded views, DGL."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mbssl_dist.graph import BehaviorGraph, MultiBehaviorGraph, dgl_available, from_dgl, to_dgl


def random_graph(seed=0, n_users=7, n_items=5, p=0.4):
    rng = np.random.default_rng(seed)
    dense = rng.random((n_users, n_items)) < p
    dense[0, :] = False  # an isolated user
    u, i = np.nonzero(dense)
    return dense.astype(np.float64), BehaviorGraph.from_pairs(u, i, n_users, n_items)


def test_degrees_and_duplicates():
    g = BehaviorGraph.from_pairs(np.array([1, 0, 1, 1]), np.array([2, 0, 2, 0]), 3, 3)
    assert g.nnz == 3  # duplicate (1, 2) merged
    assert g.user_deg.tolist() == [1, 2, 0] and g.item_deg.tolist() == [2, 0, 1]
    assert g.indptr.tolist() == [0, 1, 3, 3] and g.indices.tolist() == [0, 0, 2]


@pytest.mark.parametrize("norm", ["sym", "row"])
def test_normalization_matches_dense(norm):
    dense, g = random_graph()
    a_ui, a_iu = g.adjacency(norm, dtype=torch.float64)
    du = np.maximum(dense.sum(1), 1)
    di = np.maximum(dense.sum(0), 1)
    if norm == "sym":
        exp_ui = dense / np.sqrt(du[:, None] * di[None, :])
        exp_iu = exp_ui.T
    else:
        exp_ui = dense / du[:, None]
        exp_iu = dense.T / di[:, None]
    np.testing.assert_allclose(a_ui.to_dense().numpy(), exp_ui, atol=1e-12)
    np.testing.assert_allclose(a_iu.to_dense().numpy(), exp_iu, atol=1e-12)
    x = torch.randn(g.n_items, 3, dtype=torch.float64, requires_grad=True)
    y = torch.sparse.mm(a_ui, x)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), exp_ui.sum(0)[:, None].repeat(3, 1), atol=1e-12)


def test_global_degrees_override():
    dense, g = random_graph()
    u = g.rows().numpy()
    part = u >= 4  # this "rank" holds users 4.. only
    sub = BehaviorGraph.from_pairs(u[part], g.indices.numpy()[part], g.n_users, g.n_items,
                                   user_deg=g.user_deg, item_deg=g.item_deg)
    full_ui = g.adjacency("sym")[0].to_dense()
    np.testing.assert_allclose(sub.adjacency("sym")[0].to_dense()[4:], full_ui[4:])


def test_views_seeded_and_correct():
    from mbssl_dist.graph import view_keep

    dense, g = random_graph(seed=1, n_users=40, n_items=30, p=0.3)
    u, i = g.rows().numpy(), g.indices.numpy()

    def view(mode, seed, v=0):
        return g.subgraph_edges(torch.from_numpy(view_keep(u, i, g.n_users, g.n_items, mode, 0.5, seed, 0, v)))

    v1, v2, v3 = view("edge", 7), view("edge", 7), view("edge", 8)
    assert torch.equal(v1.indices, v2.indices) and torch.equal(v1.indptr, v2.indptr)
    assert not torch.equal(v1.indptr, v3.indptr)
    assert not torch.equal(v1.indptr, view("edge", 7, v=1).indptr)  # the epoch's two views differ
    assert 0.3 * g.nnz < v1.nnz < 0.7 * g.nnz
    sub = v1.to_scipy().toarray()
    assert ((sub > 0) <= (dense > 0)).all()  # a subgraph
    assert v1.user_deg.tolist() == sub.sum(1).tolist()  # renormalized on the view
    n1 = view("node", 3)
    m = n1.to_scipy().toarray() > 0
    assert (m <= (dense > 0)).all()
    # node dropout removes whole nodes: between a surely-kept user and a surely-kept item
    # (each has some kept edge) every original edge survives
    ku, ki = m.any(1), m.any(0)
    assert (m[np.ix_(ku, ki)] == (dense[np.ix_(ku, ki)] > 0)).all()
    assert 0 < m.sum() < (dense > 0).sum()
    with pytest.raises(ValueError, match="p must be in"):
        view_keep(u, i, g.n_users, g.n_items, "edge", 1.0, 0, 0, 0)
    with pytest.raises(ValueError, match="view mode"):
        view_keep(u, i, g.n_users, g.n_items, "walk", 0.5, 0, 0, 0)


def _require_dgl():
    if not dgl_available():
        if os.environ.get("MBSSL_REQUIRE_DGL") == "1":
            pytest.fail("DGL not importable in this environment (MBSSL_REQUIRE_DGL=1)")
        pytest.skip("DGL not importable (run in .venv-dgl: tools/dgl_env.sh)")


@pytest.mark.dgl
def test_dgl_roundtrip():
    _require_dgl()
    gs = [random_graph(seed=s, n_users=9, n_items=6)[1] for s in range(3)]
    mg = MultiBehaviorGraph(["view", "cart", "buy"], gs)
    hg = to_dgl(mg)
    assert hg.num_nodes("user") == 9 and hg.num_nodes("item") == 6
    assert hg.num_edges(("user", "buy", "item")) == gs[2].nnz
    back = from_dgl(hg, ["view", "cart", "buy"])
    for a, b in zip(mg.graphs, back.graphs):
        assert torch.equal(a.indptr, b.indptr) and torch.equal(a.indices, b.indices)


@pytest.mark.dgl
def test_dgl_message_passing_matches_ours():
    _require_dgl()
    import dgl.function as fn

    dense, g = random_graph(seed=4, n_users=12, n_items=8)
    mg = MultiBehaviorGraph(["buy"], [g])
    hg = to_dgl(mg)
    x = torch.randn(8, 4, dtype=torch.float64)
    w_ui, _ = g.edge_values("sym")
    hg.edges["buy"].data["w"] = w_ui.double()
    hg.nodes["item"].data["h"] = x
    sub = hg.edge_type_subgraph([("user", "buy", "item")])
    ours = torch.sparse.mm(g.adjacency("sym", dtype=torch.float64)[0], x)
    # DGL: item -> user along reversed buy edges, weighted by the same normalization
    hg.edges[("item", "rev_buy", "user")].data["w"] = w_ui.double()
    hg.update_all(fn.u_mul_e("h", "w", "m"), fn.sum("m", "out"), etype=("item", "rev_buy", "user"))
    torch.testing.assert_close(hg.nodes["user"].data["out"], ours)
