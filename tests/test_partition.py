"""User partitioning: coverage (no edge lost or doubled), balance, determinism, manifest stats,
local adjacency = rows of the global adjacency, bad input (exit 2, nothing left behind), DGL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mbssl_dist.data.dataset import load_prepared
from mbssl_dist.graph import MultiBehaviorGraph, dgl_available
from mbssl_dist.parallel.part import load_partition
from mbssl_dist.partition import (
    EdgeList,
    PartitionError,
    assign_edge_balanced,
    load_assignment,
    load_degrees,
    partition_dataset,
    read_manifest,
)
from mbssl_dist.partition.__main__ import main as cli_main

REPO = Path(__file__).resolve().parents[1]
CPU_METHODS = ["edge-balanced", "range", "metis"]


def _require_dgl():
    if not dgl_available():
        if os.environ.get("MBSSL_REQUIRE_DGL") == "1":
            pytest.fail("DGL not importable in this environment (MBSSL_REQUIRE_DGL=1)")
        pytest.skip("DGL not importable (run in .venv-dgl: tools/dgl_env.sh)")


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    d = tmp_path_factory.mktemp("partition") / "d"
    prepare_synthetic(d, SyntheticSpec(n_users=200, n_items=150, seed=0))
    return d


@pytest.fixture(scope="module")
def full(syn):
    ds = load_prepared(syn)
    return ds, MultiBehaviorGraph.from_dataset(ds)


_CACHE: dict = {}


@pytest.fixture(scope="module")
def parted(syn, tmp_path_factory):
    """parted(method, P) -> partition directory (made once per module)."""
    root = tmp_path_factory.mktemp("parts")

    def make(method: str, P: int) -> Path:
        key = (str(syn), method, P)
        if key not in _CACHE:
            out = root / f"{method}-{P}"
            partition_dataset(syn, out, P, method=method, seed=0)
            _CACHE[key] = out
        return _CACHE[key]

    return make


def _edge_keys(graph: MultiBehaviorGraph, users_global: np.ndarray | None = None) -> list[np.ndarray]:
    """Per behavior: sorted keys user * n_items + item of all edges (global user ids)."""
    out = []
    for g in graph.graphs:
        u = g.rows().numpy()
        if users_global is not None:
            u = users_global[u]
        out.append(np.sort(u.astype(np.int64) * g.n_items + g.indices.numpy()))
    return out


def _check_coverage(path: Path, full_graph: MultiBehaviorGraph, P: int) -> None:
    m = read_manifest(path)
    assert m["parts"] == P
    parts = [load_partition(path, p) for p in range(P)]
    # users: a disjoint cover of all users, consistent with assignment.parquet
    all_users = np.concatenate([lp.users for lp in parts])
    assert len(all_users) == full_graph.n_users
    assert np.array_equal(np.sort(all_users), np.arange(full_graph.n_users))
    assign = load_assignment(path)
    for lp in parts:
        assert lp.n_local > 0
        assert (assign[lp.users] == lp.part).all()
        assert np.array_equal(lp.to_global(np.arange(lp.n_local)), lp.users)
        assert np.array_equal(lp.to_local(lp.users), np.arange(lp.n_local))
    # edges: union over parts == full graph, per behavior, with no duplicates
    want = _edge_keys(full_graph)
    for k in range(len(full_graph)):
        got = np.sort(np.concatenate([_edge_keys(lp.graph, lp.users)[k] for lp in parts]))
        assert np.array_equal(got, want[k]), f"behavior {k}: edges lost or doubled"
        assert sum(lp.graph[k].nnz for lp in parts) == full_graph[k].nnz


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("P", [1, 2, 3])
def test_union_of_parts_is_whole_graph(parted, full, method, P):
    _check_coverage(parted(method, P), full[1], P)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_manifest_stats_match_files(parted, full, syn, method):
    ds, g = full
    path = parted(method, 3)
    m = read_manifest(path)
    assert m["method"] == method and m["seed"] == 0 and m["items"] == "replicated"
    assert m["dataset"]["content_sha256"] == ds.checksum() and m["dataset"]["content_sha256"]
    assert Path(m["dataset"]["path"]) == Path(syn).resolve()
    assert (m["n_users"], m["n_items"], m["behaviors"]) == (ds.n_users, ds.n_items, ds.behaviors)
    assert m["n_edges"] == sum(x.nnz for x in g.graphs)
    users, edges = [], []
    for p in range(3):
        pp = m["per_part"][p]
        d = path / f"part-{p:05d}"
        u = pq.read_table(d / "users.parquet")
        e = pq.read_table(d / "edges.parquet")
        assert u.schema.field("user").type == "int32"
        assert [str(e.schema.field(c).type) for c in ("user", "item", "behavior")] == ["int32", "int32", "int8"]
        beh = e["behavior"].to_numpy()
        assert pp["n_users"] == u.num_rows and pp["n_edges"] == e.num_rows
        assert pp["n_edges_per_behavior"] == {b: int((beh == k).sum()) for k, b in enumerate(ds.behaviors)}
        users.append(u.num_rows)
        edges.append(e.num_rows)
    for name, x in (("users", users), ("edges", edges)):
        b = m["balance"][name]
        assert b["max"] == max(x) and b["min"] == min(x)
        assert b["mean"] == pytest.approx(np.mean(x)) and b["max_over_mean"] == pytest.approx(max(x) / np.mean(x))
    a = pq.read_table(path / "assignment.parquet")
    assert str(a.schema.field("user").type) == "int32" and str(a.schema.field("part").type) == "int16"
    assert np.array_equal(a["user"].to_numpy(), np.arange(ds.n_users))
    # global degrees
    ud, idg = load_degrees(path)
    for k, bg in enumerate(g.graphs):
        assert np.array_equal(ud[k], bg.user_deg.numpy()) and np.array_equal(idg[k], bg.item_deg.numpy())


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("norm", ["sym", "row"])
def test_local_adjacency_equals_global_rows(parted, full, method, norm):
    _, g = full
    path = parted(method, 3)
    parts = [load_partition(path, p) for p in range(3)]
    for k in range(len(g)):
        a_ui, a_iu = (a.to_dense() for a in g.adjacency(k, norm, dtype=torch.float64))
        e_u = torch.randn(g.n_users, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        partial_sum = torch.zeros(g.n_items, 4, dtype=torch.float64)
        for lp in parts:
            l_ui, l_iu = (a.to_dense() for a in lp.graph.adjacency(k, norm, dtype=torch.float64))
            idx = torch.from_numpy(lp.users)
            assert l_ui.shape == (lp.n_local, g.n_items) and l_iu.shape == (g.n_items, lp.n_local)
            torch.testing.assert_close(l_ui, a_ui[idx], rtol=0, atol=1e-15)  # A_ui rows
            torch.testing.assert_close(l_iu, a_iu[:, idx], rtol=0, atol=1e-15)  # A_iu columns
            partial_sum += torch.sparse.mm(lp.graph.adjacency(k, norm, dtype=torch.float64)[1], e_u[idx])
        # the all-reduce of per-rank partial item updates equals the full item update
        torch.testing.assert_close(partial_sum, a_iu @ e_u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("P", [2, 3, 4])
def test_edge_balanced_bounds(parted, full, P):
    _, g = full
    m = read_manifest(parted("edge-balanced", P))
    deg = g.user_degrees().numpy()
    e, u = m["balance"]["edges"], m["balance"]["users"]
    assert e["max"] <= e["mean"] + deg.max()  # LPT bound
    assert e["max_over_mean"] < 1.05
    assert u["max"] <= int(np.ceil(1.05 * g.n_users / P))


def test_edge_balanced_unit():
    deg = np.array([10, 1, 1, 1, 5, 5, 0, 7])
    a = assign_edge_balanced(deg, 2, user_slack=0.0)
    loads = np.bincount(a, weights=deg, minlength=2)
    assert np.bincount(a, minlength=2).tolist() == [4, 4]
    assert sorted(loads.tolist()) == [14, 16]  # optimum under the 4-users-per-part cap
    assert np.array_equal(a, assign_edge_balanced(deg, 2, user_slack=0.0))
    a = assign_edge_balanced(deg, 2, user_slack=1.0)  # no effective cap: pure LPT, 15/15
    assert np.bincount(a, weights=deg, minlength=2).tolist() == [15, 15]
    with pytest.raises(PartitionError, match="cannot split 8 users into 9 parts"):
        assign_edge_balanced(deg, 9)


def test_lpt_assign_ties_and_cap():
    """The one LPT of partition (count ties, user cap) and swing (load ties by bin id)."""
    from mbssl_dist.utils.lpt import lpt_assign

    assert lpt_assign(np.zeros(4), 2).tolist() == [0, 0, 0, 0]  # equal loads: the lower bin id
    assert lpt_assign(np.zeros(4), 2, count_ties=True).tolist() == [0, 1, 0, 1]  # then fewer items
    assert lpt_assign(np.array([5, 4, 3, 3]), 2).tolist() == [0, 1, 1, 0]
    assert lpt_assign(np.array([5, 1, 1, 1]), 2).tolist() == [0, 1, 1, 1]
    assert lpt_assign(np.array([5, 1, 1, 1]), 2, cap=2).tolist() == [0, 1, 1, 0]  # a full bin takes no more
    assert lpt_assign(np.array([3.0, 1.0]), 1).tolist() == [0, 0]
    with pytest.raises(ValueError, match="do not fit"):
        lpt_assign(np.ones(5), 2, cap=2)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_deterministic(syn, tmp_path, method):
    partition_dataset(syn, tmp_path / "a", 3, method=method, seed=5)
    partition_dataset(syn, tmp_path / "b", 3, method=method, seed=5)
    assert np.array_equal(load_assignment(tmp_path / "a"), load_assignment(tmp_path / "b"))
    for p in range(3):
        for f in ("users.parquet", "edges.parquet"):
            ta = pq.read_table(tmp_path / "a" / f"part-{p:05d}" / f)
            assert ta.equals(pq.read_table(tmp_path / "b" / f"part-{p:05d}" / f))


def test_load_partition_errors(parted, syn, full):
    path = parted("edge-balanced", 2)
    with pytest.raises(PartitionError, match="out of range"):
        load_partition(path, 2)
    with pytest.raises(PartitionError, match="made from dataset"):
        load_partition(path, 0, dataset_sha256="0" * 64)
    lp = load_partition(path, 0, dataset_sha256=full[0].checksum())
    other = int(np.flatnonzero(lp.global_to_local < 0)[0])
    with pytest.raises(PartitionError, match="not in part 0"):
        lp.to_local([other])
    with pytest.raises(PartitionError, match="not a partition directory"):
        load_partition(syn, 0)


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("case", ["missing-data", "zero-parts", "negative-parts", "too-many-parts",
                                  "out-is-data"])
def test_cli_bad_input_exit_2_nothing_written(syn, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {"missing-data": ["--data", str(tmp_path / "nope"), "--parts", "2"],
            "zero-parts": ["--data", str(syn), "--parts", "0"],
            "negative-parts": ["--data", str(syn), "--parts", "-1"],
            "too-many-parts": ["--data", str(syn), "--parts", "201"]}.get(case)
    if case == "out-is-data":
        import shutil
        data = tmp_path / "data"
        shutil.copytree(syn, data)
        rc = cli_main(["--data", str(data), "--parts", "2", "--method", "metis", "--out", str(data),
                       "--overwrite"])
        assert rc == 2 and "would replace the dataset" in capsys.readouterr().err
        assert load_prepared(data).n_users == 200
        return
    rc = cli_main(args + ["--method", "edge-balanced", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ")
    expect = {"missing-data": "no manifest.json", "zero-parts": ">= 1", "negative-parts": ">= 1",
              "too-many-parts": "cannot split 200 users into 201 parts"}[case]
    assert expect in err
    assert _leftovers(tmp_path, "out") == []


def test_cli_unknown_method_and_existing_out(syn, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--data", str(syn), "--parts", "2", "--method", "kahip", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(PartitionError, match="unknown method"):
        partition_dataset(syn, tmp_path / "o", 2, method="kahip")
    assert _leftovers(tmp_path, "o") == []
    # existing output: refused without --overwrite (and left untouched), replaced with it
    out = tmp_path / "out"
    assert cli_main(["--data", str(syn), "--parts", "2", "--method", "edge-balanced", "--out", str(out)]) == 0
    before = (out / "manifest.json").read_text()
    assert cli_main(["--data", str(syn), "--parts", "3", "--method", "edge-balanced", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert cli_main(["--data", str(syn), "--parts", "3", "--method", "metis", "--out", str(out),
                     "--overwrite"]) == 0
    assert read_manifest(out)["parts"] == 3 and read_manifest(out)["method"] == "metis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_dgl_without_dgl_is_clear(syn, tmp_path):
    if dgl_available():
        pytest.skip("DGL is importable here; the no-DGL message is tested in .venv")
    r = subprocess.run([sys.executable, "-m", "mbssl_dist.partition", "--data", str(syn), "--parts", "2",
                        "--method", "dgl", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 2
    assert "tools/dgl_env.sh" in r.stderr and ".venv-dgl/bin/python" in r.stderr
    assert _leftovers(tmp_path, "o") == []


def test_cli_logs_balance(syn, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="mbssl_dist.partition"):
        assert cli_main(["--data", str(syn), "--parts", "2", "--method", "edge-balanced",
                         "--out", str(tmp_path / "o")]) == 0
    assert "edges max/mean" in caplog.text and "users max/mean" in caplog.text


# ----------------------------------------------------------------------------------- DGL

@pytest.mark.dgl
@pytest.mark.parametrize("P", [1, 2, 3])
def test_dgl_union_of_parts_is_whole_graph(syn, full, tmp_path, P):
    _require_dgl()
    out = tmp_path / "dgl"
    m = partition_dataset(syn, out, P, method="dgl", seed=0)
    assert m["method"] == "dgl" and m["method_info"]["part_method"] == "metis"
    _check_coverage(out, full[1], P)
    if P > 1:
        assert m["balance"]["users"]["max_over_mean"] < 1.2
        assert m["balance"]["edges"]["max_over_mean"] < 1.2


@pytest.mark.dgl
def test_dgl_deterministic_and_random(syn, tmp_path, full):
    _require_dgl()
    # DGL 2.1's METIS is not reproducible (documented in dgl_backend); 'random' is, by seed.
    for name in ("a", "b"):
        partition_dataset(syn, tmp_path / name, 3, method="dgl", seed=1, dgl_part_method="random")
    assert np.array_equal(load_assignment(tmp_path / "a"), load_assignment(tmp_path / "b"))
    info = read_manifest(tmp_path / "a")["method_info"]
    assert info["part_method"] == "random" and info["deterministic"] is True
    _check_coverage(tmp_path / "a", full[1], 3)
    m = partition_dataset(syn, tmp_path / "m", 3, method="dgl", seed=1)
    assert m["method_info"]["deterministic"] is False


@pytest.mark.dgl
def test_dgl_assignment_matches_partition_book(full, tmp_path):
    """Our reading of DGL's output (node_map ranges + orig_nids) agrees with DGL's own
    partition book loaded through dgl.distributed.load_partition."""
    _require_dgl()
    import dgl

    from mbssl_dist.partition.dgl_backend import assignment_from_dgl, dgl_input_graph, run_partition_graph

    edges = EdgeList.from_graph(full[1])
    orig, config = run_partition_graph(dgl_input_graph(edges), 3, tmp_path, seed=0)
    ours = assignment_from_dgl(config, orig, edges.n_users, 3)
    *_, gpb, _, _, _ = dgl.distributed.load_partition(str(config), 0, load_feats=False)
    theirs = np.full(edges.n_users, -1)
    # the partition book is global: shuffled per-type user id -> part; orig maps it back
    theirs[orig["user"].numpy()] = gpb.nid2partid(torch.arange(edges.n_users), ntype="user").numpy()
    assert np.array_equal(ours, theirs)
    # and each part's inner user nodes are exactly the users we assign to it
    for p in range(3):
        g, _, _, gpb, _, ntypes, _ = dgl.distributed.load_partition(str(config), p, load_feats=False)
        inner = (g.ndata["inner_node"] == 1) & (g.ndata[dgl.NTYPE] == ntypes.index("user"))
        shuffled = gpb.map_to_per_ntype(g.ndata[dgl.NID][inner])[1]
        assert np.array_equal(np.sort(orig["user"].numpy()[shuffled.numpy()]), np.flatnonzero(ours == p))


# ----------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_retailrocket_two_parts(shared_data, tmp_path):
    from mbssl_dist.data.prepare import prepare_text

    prepare_text(shared_data / "Retailrocket", tmp_path / "rr")
    ds = load_prepared(tmp_path / "rr")
    g = MultiBehaviorGraph.from_dataset(ds)
    deg = sum(np.diff(x.indptr.numpy()) for x in g.graphs)  # global degree of each user, all behaviors
    for method in CPU_METHODS:
        m = partition_dataset(tmp_path / "rr", tmp_path / method, 2, method=method)
        assert m["n_edges"] == sum(x.nnz for x in g.graphs)
        assert sum(pp["n_users"] for pp in m["per_part"]) == ds.n_users
        assert sum(pp["n_edges"] for pp in m["per_part"]) == m["n_edges"]
        if method == "range":  # balances edges + users (x mean degree), not edges alone
            mean_deg = m["n_edges"] / ds.n_users
            cost = [x["n_edges"] + mean_deg * x["n_users"] for x in m["per_part"]]
            assert max(cost) / (sum(cost) / len(cost)) < 1.05
        else:
            assert m["balance"]["edges"]["max_over_mean"] < 1.05
        parts = [load_partition(tmp_path / method, p) for p in range(2)]
        # every user in exactly one part; each part holds all edges of its users and no other
        users = np.concatenate([lp.users for lp in parts])
        assert np.array_equal(np.sort(users), np.arange(ds.n_users))
        for p, lp in enumerate(parts):
            local_edges = sum(x.nnz for x in lp.graph.graphs)
            assert local_edges == int(deg[lp.users].sum()) == m["per_part"][p]["n_edges"]
            assert lp.n_local == len(lp.users) == m["per_part"][p]["n_users"]
        k = len(g) - 1  # target behavior: local A_ui rows = global rows (spot check)
        a_ui = g.adjacency(k, "sym")[0]
        for lp in parts:
            rows = np.sort(np.random.default_rng(0).choice(lp.users, size=min(50, lp.n_local), replace=False))
            want = torch.stack([a_ui[int(r)].to_dense() for r in rows])
            l_ui = lp.graph.adjacency(k, "sym")[0]
            got = torch.stack([l_ui[int(i)].to_dense() for i in lp.to_local(rows)])
            torch.testing.assert_close(got, want)
        json.dumps(m)
