"""Swing similarity (issue 3): exactness against the literal Eq 6, the authors' Beibei matrix,
worker-count invariance, the CLI contract and the loader."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mbssl_dist.swing import (load_swing, load_swing_topn, read_manifest, swing_full, swing_topk,
                              swing_topk_combined)
from mbssl_dist.swing.__main__ import main as swing_main

from .conftest import require_torchrun
from .oracles import swing_bruteforce

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def random_graph(seed: int, n_users: int = 40, n_items: int = 30, density: float = 0.15) -> sp.csr_matrix:
    """Binary user x item matrix with a few popular items/heavy users (to create ties and hubs)."""
    rng = np.random.default_rng(seed)
    p_u = rng.uniform(0.3, 1.7, n_users)[:, None]
    p_i = rng.uniform(0.3, 1.7, n_items)[None, :]
    D = rng.random((n_users, n_items)) < density * p_u * p_i
    return sp.csr_matrix(D.astype(np.float64))


def assert_topn_matches(src, dst, score, rank, S: np.ndarray, topn: int, tol: float = 1e-9) -> None:
    """Our top-N rows against a dense exact similarity matrix ``S`` (zero diagonal)."""
    src, dst, score, rank = map(np.asarray, (src, dst, score, rank))
    n = S.shape[0]
    for i in range(n):
        m = src == i
        d, v, r = dst[m], score[m], rank[m]
        row = S[i].copy()
        row[i] = 0.0
        nz = np.flatnonzero(row)
        k = min(topn, len(nz))
        assert len(d) == k, (i, len(d), k)
        if k == 0:
            continue
        assert np.array_equal(r, np.arange(k)), (i, r)
        assert len(np.unique(d)) == k and not np.any(d == i)
        np.testing.assert_allclose(v, row[d], rtol=tol, atol=tol)          # scores are exact
        expect = np.sort(row[nz])[::-1][:k]
        np.testing.assert_allclose(v, expect, rtol=tol, atol=tol)          # a valid top-k
        kth = expect[-1]
        must = np.flatnonzero(row > kth + tol * max(1.0, kth))             # strictly above the boundary
        assert set(must.tolist()) <= set(d.tolist()), i
        # ties (equal up to rounding) are ordered by smaller dst
        for a in range(k - 1):
            if abs(row[d[a]] - row[d[a + 1]]) <= 1e-12 * max(1.0, abs(row[d[a]])):
                assert d[a] < d[a + 1], (i, d[a], d[a + 1])
            else:
                assert row[d[a]] > row[d[a + 1]]


def read_text_behavior(path: Path, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary user x item CSR from a ``uid item item ...`` (gzipped) text file."""
    users, items = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            it = np.array(parts[1:], dtype=np.int64)
            users.append(np.full(len(it), int(parts[0]), dtype=np.int64))
            items.append(it)
    u, i = np.concatenate(users), np.concatenate(items)
    R = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=shape)
    R.sum_duplicates()
    R.data[:] = 1.0
    return R


def make_prepared(tmp_path: Path, n_users: int = 120, n_items: int = 80, seed: int = 0) -> Path:
    """A small prepared dataset (view, cart, buy) written through the data layer."""
    from mbssl_dist.data.dataset import PreparedDataset, write_prepared
    from mbssl_dist.utils.io import atomic_dir

    rng = np.random.default_rng(seed)
    us, its, bs = [], [], []
    for k, dens in enumerate([0.12, 0.06, 0.04]):
        R = random_graph(seed * 10 + k, n_users, n_items, dens).tocoo()
        us.append(R.row)
        its.append(R.col)
        bs.append(np.full(R.nnz, k))
    z = np.zeros(0, np.int32)
    test_u = np.arange(n_users, dtype=np.int32)
    test_i = rng.integers(0, n_items, n_users).astype(np.int32)
    ds = PreparedDataset(n_users=n_users, n_items=n_items, behaviors=["view", "cart", "buy"],
                         train_user=np.concatenate(us).astype(np.int32),
                         train_item=np.concatenate(its).astype(np.int32),
                         train_behavior=np.concatenate(bs).astype(np.int8),
                         valid_user=z, valid_item=z, test_user=test_u, test_item=test_i,
                         manifest={"source": {"format": "test"}})
    out = tmp_path / "prepared"
    with atomic_dir(out) as tmp:
        write_prepared(tmp, ds)
    return out


# ------------------------------------------------------------------------------------------------
# exactness against the literal definition
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("side", ["items", "users"])
def test_full_matrix_equals_bruteforce(seed, side):
    R = random_graph(seed)
    X = R.T.tocsr() if side == "items" else R
    S = swing_bruteforce(X, alpha=0.5)
    F = swing_full(X, alpha=0.5).toarray()
    np.testing.assert_allclose(F, S, rtol=1e-9, atol=1e-12)
    assert np.all(np.diag(F) == 0)


def test_hand_worked_example():
    """Eq 6 by hand on 4 users x 3 items (alpha = 0.5), so the oracle itself is checked too.

    Purchases:  u0: {a, b, c}   u1: {a, b}   u2: {a, b, c}   u3: {c}      (a, b, c = items 0, 1, 2)

    Item-item swing (sources = items, intermediaries = users). The users of each item:
    U_a = U_b = {u0, u1, u2}, U_c = {u0, u2, u3}; overlaps of the users' item sets:
    |I_u0 & I_u1| = |{a,b}| = 2, |I_u0 & I_u2| = 3, |I_u1 & I_u2| = 2, |I_u0 & I_u3| = |I_u2 & I_u3| = 1.
      sim(a, b): user pairs from {u0,u1,u2}: (u0,u1) 1/(0.5+2) = 0.4, (u0,u2) 1/(0.5+3) = 2/7,
                 (u1,u2) 0.4                                      -> 0.8 + 2/7 = 38/35 = 1.0857...
      sim(a, c) = sim(b, c): common users {u0, u2}: one pair (u0,u2) -> 2/7 = 0.2857...

    User-user swing (sources = users, intermediaries = items). The items' user sets:
    I_a = I_b = {u0,u1,u2}, I_c = {u0,u2,u3}: |I_a & I_b| = 3, |I_a & I_c| = |I_b & I_c| = 2.
      sim(u0, u2): common items {a,b,c}: (a,b) 1/3.5 = 2/7, (a,c) 1/2.5 = 0.4, (b,c) 0.4 -> 38/35
      sim(u0, u1) = sim(u1, u2): common {a, b}: (a,b) -> 2/7
      sim(u3, anyone) = 0: u3 shares only item c with u0 and u2, so no pair of common items.
    """
    R = sp.csr_matrix(np.array([[1, 1, 1],
                                [1, 1, 0],
                                [1, 1, 1],
                                [0, 0, 1]], dtype=np.float64))
    s1, s2 = 38 / 35, 2 / 7
    items_want = np.array([[0, s1, s2],
                           [s1, 0, s2],
                           [s2, s2, 0]])
    users_want = np.array([[0, s2, s1, 0],
                           [s2, 0, s2, 0],
                           [s1, s2, 0, 0],
                           [0, 0, 0, 0]])
    for X, want in ((R.T.tocsr(), items_want), (R, users_want)):
        np.testing.assert_allclose(swing_bruteforce(X, alpha=0.5), want, rtol=1e-12)
        np.testing.assert_allclose(swing_full(X, alpha=0.5).toarray(), want, rtol=1e-12)
        src, dst, score = swing_topk(X, alpha=0.5, topn=1)  # each source's best neighbor (ties: lower id)
        best = {int(s): (int(d), float(v)) for s, d, v in zip(src, dst, score)}
        for s in range(want.shape[0]):
            if want[s].max() > 0:
                j = int(np.argmax(want[s]))
                assert best[s][0] == j and best[s][1] == pytest.approx(want[s, j], rel=1e-12)
            else:
                assert s not in best
    # alpha enters only through the 1/(alpha + overlap) weights: at alpha = 1, sim(a, b) =
    # 1/3 + 1/4 + 1/3 = 11/12 and sim(a, c) = 1/4
    np.testing.assert_allclose(swing_full(R.T.tocsr(), alpha=1.0).toarray()[0], [0, 11 / 12, 1 / 4], rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("side", ["items", "users"])
@pytest.mark.parametrize("topn", [1, 3, 10, 1000])
def test_topn_single_behavior_equals_bruteforce(seed, side, topn):
    R = random_graph(seed)
    X = R.T.tocsr() if side == "items" else R
    S = swing_bruteforce(X, alpha=0.5)
    src, dst, score = swing_topk(X, alpha=0.5, topn=topn)
    rank = np.concatenate([np.arange((src == s).sum()) for s in np.unique(src)]) if len(src) else src
    assert_topn_matches(src, dst, score, rank, S, topn)


@pytest.mark.parametrize("seed", [4, 5])
@pytest.mark.parametrize("side", ["items", "users"])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.2, 0.0, 1.0), (0.0, 0.0, 1.0), (2.5, 0.5, 0.125)])
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_weighted_combination_equals_bruteforce(seed, side, weights, alpha):
    Rs = [random_graph(seed * 7 + k, density=d) for k, d in enumerate([0.2, 0.1, 0.08])]
    Xs = [R.T.tocsr() if side == "items" else R for R in Rs]
    S = sum(w * swing_bruteforce(X, alpha=alpha) for X, w in zip(Xs, weights))
    for topn in (4, 100):
        src, dst, score, rank = swing_topk_combined(Xs, list(weights), alpha=alpha, topn=topn)
        assert_topn_matches(src, dst, score, rank, S, topn)


def test_combination_is_before_truncation():
    """Top-N of the weighted sum differs from the union of per-behavior top-Ns in general."""
    Rs = [random_graph(11, density=0.25), random_graph(12, density=0.25)]
    Xs = [R.T.tocsr() for R in Rs]
    S = swing_bruteforce(Xs[0]) + 0.3 * swing_bruteforce(Xs[1])
    src, dst, score, rank = swing_topk_combined(Xs, [1.0, 0.3], topn=2)
    assert_topn_matches(src, dst, score, rank, S, 2)


def test_sources_subset_and_empty_rows():
    R = random_graph(3)
    X = R.T.tocsr()
    S = swing_bruteforce(X)
    full = swing_topk(X, topn=5)
    sub = swing_topk(X, topn=5, sources=np.array([7, 2, 2, 19]))
    m = np.isin(full[0], [2, 7, 19])
    for a, b in zip(full, sub):
        np.testing.assert_array_equal(a[m], b)
    # a graph where nothing co-occurs twice: no rows at all
    E = sp.identity(6, format="csr")
    assert len(swing_topk(E)[0]) == 0
    assert np.all(S >= 0)


def test_bad_parameters_raise():
    X = random_graph(0).T.tocsr()
    with pytest.raises(ValueError, match="alpha"):
        swing_topk(X, alpha=0.0)
    with pytest.raises(ValueError, match="topn"):
        swing_topk(X, topn=0)
    with pytest.raises(ValueError, match="zero"):
        swing_topk_combined([X], [0.0])


# ------------------------------------------------------------------------------------------------
# CLI, parallel invariance, loader
# ------------------------------------------------------------------------------------------------

def _run(argv) -> int:
    return swing_main([str(a) for a in argv] + ["--no-progress"])


def test_cli_workers_identical_and_matches_core(tmp_path):
    data = make_prepared(tmp_path)
    out1, out2 = tmp_path / "sw1", tmp_path / "sw2"
    common = ["--data", data, "--topn", 7, "--weights", "view=0.25,cart=0.5,buy=1"]
    assert _run(common + ["--out", out1, "--workers", 1]) == 0
    assert _run(common + ["--out", out2, "--workers", 2]) == 0
    m1, m2 = read_manifest(out1), read_manifest(out2)
    assert m2["results"]["items"]["n_parts"] == 2 and m1["results"]["items"]["n_parts"] == 1
    assert m1["weights"] == {"view": 0.25, "cart": 0.5, "buy": 1.0}
    assert m1["dataset"]["content_sha256"] == json.loads((data / "manifest.json").read_text())["content_sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    from mbssl_dist.data.dataset import load_prepared
    ds = load_prepared(data)
    for side in ("items", "users"):
        a, b = load_swing(out1, side), load_swing(out2, side)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)  # bit-identical, scores included
        Rs = [ds.behavior_csr(k, dtype=np.float64) for k in range(3)]
        Xs = [R.T.tocsr() if side == "items" else R for R in Rs]
        ref = swing_topk_combined(Xs, [0.25, 0.5, 1.0], topn=7)
        for x, y in zip(a, ref):
            np.testing.assert_array_equal(x, y)
        S = sum(w * swing_bruteforce(X) for X, w in zip(Xs, [0.25, 0.5, 1.0]))
        assert_topn_matches(*a, S, 7)
        assert m1["results"][side]["rows"] == len(a[0])


def test_cli_buy_only_and_side(tmp_path):
    data = make_prepared(tmp_path)
    out = tmp_path / "sw"
    assert _run(["--data", data, "--out", out, "--side", "item", "--weights", "buy=1", "--topn", 5]) == 0
    man = read_manifest(out)
    assert man["behaviors"] == ["buy"] and man["sides"] == ["items"]
    assert not (out / "users").exists()
    from mbssl_dist.data.dataset import load_prepared
    ds = load_prepared(data)
    X = ds.behavior_csr(ds.behavior_index("buy"), dtype=np.float64).T.tocsr()
    assert_topn_matches(*load_swing(out, "items"), swing_bruteforce(X), 5)
    # overwrite replaces
    assert _run(["--data", data, "--out", out, "--side", "user", "--behaviors", "buy,cart",
                 "--topn", 3]) == 2
    assert _run(["--data", data, "--out", out, "--side", "user", "--behaviors", "buy,cart",
                 "--topn", 3, "--overwrite"]) == 0
    assert read_manifest(out)["sides"] == ["users"] and read_manifest(out)["behaviors"] == ["cart", "buy"]


def test_load_swing_topn(tmp_path):
    data = make_prepared(tmp_path)
    out = tmp_path / "sw"
    assert _run(["--data", data, "--out", out, "--topn", 6, "--workers", 2]) == 0
    src, dst, score, rank = load_swing(out, "items")
    for n in (1, 3, 6):
        indptr, idx = load_swing_topn(out, "item", n)
        assert len(indptr) == 80 + 1
        for s in range(80):
            exp = dst[(src == s) & (rank < n)]
            np.testing.assert_array_equal(idx[indptr[s]:indptr[s + 1]], exp)
    with pytest.raises(ValueError, match="stored top-N"):
        load_swing_topn(out, "items", 7)
    assert src.dtype == np.int32 and dst.dtype == np.int32 and score.dtype == np.float64


@pytest.mark.parametrize("extra, needle", [
    (["--behaviors", "buy,like"], "--behaviors: unknown behavior 'like'"),
    (["--weights", "like=1"], "--weights: unknown behavior 'like'"),
    (["--weights", "buy=abc"], "expected a number >= 0"),
    (["--weights", "buy=-1"], "expected a finite number >= 0"),
    (["--weights", "buy"], "expected NAME=VALUE"),
    (["--weights", "buy=0,cart=0"], "all behavior weights are zero"),
    (["--alpha", "0"], "--alpha 0.0: expected a number > 0"),
    (["--alpha", "-1"], "--alpha"),
    (["--topn", "0"], "--topn 0: expected an integer >= 1"),
    (["--side", "both2"], "--side"),
    (["--workers", "0"], "--workers"),
])
def test_cli_bad_input(tmp_path, capsys, extra, needle):
    data = make_prepared(tmp_path)
    out = tmp_path / "sw"
    assert _run(["--data", data, "--out", out] + extra) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sw")]


def test_cli_missing_data(tmp_path, capsys):
    out = tmp_path / "sw"
    assert _run(["--data", tmp_path / "nope", "--out", out]) == 2
    assert "--data" in capsys.readouterr().err and not out.exists()
    (tmp_path / "empty").mkdir()
    assert _run(["--data", tmp_path / "empty", "--out", out]) == 2
    assert "manifest.json" in capsys.readouterr().err and not out.exists()


def test_torchrun_two_ranks_identical(tmp_path):
    torchrun = require_torchrun()
    data = make_prepared(tmp_path)
    out1, out2 = tmp_path / "sw1", tmp_path / "sw2"
    assert _run(["--data", data, "--out", out1, "--topn", 5]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mbssl_dist.swing",
                        "--data", str(data), "--out", str(out2), "--topn", "5", "--no-progress"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    man = read_manifest(out2)
    assert man["mode"] == "torchrun" and man["world_size"] == 2 and man["results"]["users"]["n_parts"] == 2
    for side in ("items", "users"):
        for x, y in zip(load_swing(out1, side), load_swing(out2, side)):
            np.testing.assert_array_equal(x, y)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------
# real data: the MBSSL authors' Beibei buy item-item matrix
# ------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_beibei_buy_items_match_authors_matrix(shared_data):
    ref_path = shared_data / "reference" / "beibei_buy_item_swing_reference.npz"
    buy = shared_data / "incomplete" / "Beibei" / "buy.txt.gz"
    for p in (ref_path, buy):
        if not p.exists():
            if os.environ.get("MBSSL_REQUIRE_DATA") == "1":
                pytest.fail(f"missing {p}")
            pytest.skip(f"missing {p}")
    R = read_text_behavior(buy, (21716, 7977))  # the FULL buy data, no validation hold-out
    ref = sp.load_npz(ref_path).tocsr()
    assert ref.shape == (7977, 7977)
    X = R.T.tocsr()
    ours = swing_full(X, alpha=0.5)
    ref.sort_indices()
    # same sparsity pattern and every nonzero within 1e-6 relative
    assert ours.nnz == ref.nnz
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    np.testing.assert_allclose(ours.data, ref.data, rtol=1e-6)

    topn = 500
    src, dst, score, rank = swing_topk_combined([X], [1.0], alpha=0.5, topn=topn)
    starts = np.searchsorted(src, np.arange(ref.shape[0] + 1))
    for i in range(ref.shape[0]):
        cols = ref.indices[ref.indptr[i]:ref.indptr[i + 1]]
        vals = ref.data[ref.indptr[i]:ref.indptr[i + 1]]
        d = dst[starts[i]:starts[i + 1]]
        v = score[starts[i]:starts[i + 1]]
        k = min(topn, len(cols))
        assert len(d) == k, i
        if k == 0:
            continue
        kth = np.sort(vals)[::-1][k - 1]
        lookup = dict(zip(cols.tolist(), vals.tolist()))
        np.testing.assert_allclose(v, [lookup[j] for j in d.tolist()], rtol=1e-6)
        must = set(cols[vals > kth * (1 + 1e-6)].tolist())          # above the boundary: all present
        allowed = set(cols[vals >= kth * (1 - 1e-6)].tolist())      # ties at the boundary: any may be
        assert must <= set(d.tolist()) <= allowed, i


def test_chunking_and_blocking_do_not_change_results(tmp_path):
    """Many tiny phase-1 chunks / phase-2 blocks, 1 or 3 workers: bit-identical output."""
    from mbssl_dist.swing import core
    from mbssl_dist.swing.parallel import SideJob, run_side_pool

    Rs = [random_graph(21, 60, 50, 0.2), random_graph(22, 60, 50, 0.1)]
    Xs = [R.T.tocsr() for R in Rs]
    ref = swing_topk_combined(Xs, [1.0, 0.5], topn=9)
    idx = core.SideIndex.build(Xs[0])
    assert len(core.plan_chunks(idx, 40)) > 10
    pm_small = core.build_pair_matrix(idx, chunk_triples=40)
    pm_big = core.build_pair_matrix(idx)
    np.testing.assert_array_equal(pm_small.lens, pm_big.lens)
    np.testing.assert_array_equal(pm_small.indices, pm_big.indices)
    pms = [core.build_pair_matrix(core.SideIndex.build(X), chunk_triples=40) for X in Xs]
    got = core.similarity_topk(pms, [1.0, 0.5], 0.5, 9, block_flops=25)
    for x, y in zip(got, ref):
        np.testing.assert_array_equal(x, y)
    outs = []
    for w in (1, 3):
        job = SideJob(side="items", behaviors=["a", "b"], weights=[1.0, 0.5], mats=Xs, topn=9,
                      chunk_triples=40, block_flops=25)
        summary = run_side_pool(job, tmp_path / f"p{w}", tmp_path / f"s{w}", w, progress=False)
        assert summary["n_parts"] == w and not (tmp_path / f"s{w}").exists()
        import pyarrow.parquet as pq
        t = [pq.read_table(f) for f in sorted((tmp_path / f"p{w}").glob("*.parquet"))]
        cols = [np.concatenate([x[c].to_numpy() for x in t]) for c in ("src", "dst", "score", "rank")]
        order = np.lexsort((cols[3], cols[0]))
        outs.append([c[order] for c in cols])
    for x, y, z in zip(outs[0], outs[1], ref):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_chunked_fill_equals_in_memory_stacking(tmp_path):
    """The parallel layout (per-chunk slices of diag(w) M and M^T written into memory-mapped
    files) is array-for-array the in-memory ``StackedPairs.build``."""
    from mbssl_dist.swing import core, parallel

    Rs = [random_graph(31, 70, 45, 0.2), random_graph(32, 70, 45, 0.1), random_graph(33, 70, 45, 0.15)]
    Xs = [R.T.tocsr() for R in Rs]
    weights = [1.0, 0.0, 0.3]
    job = parallel.SideJob(side="items", behaviors=["a", "b", "c"], weights=weights, mats=Xs,
                           alpha=0.7, chunk_triples=50)
    tasks = job.chunks()
    assert len(tasks) > 5 and all(t[1] != 1 for t in tasks)     # zero-weight behavior skipped
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    p1 = [parallel.phase1(job, t, scratch) for t in reversed(tasks)]   # any completion order
    layout = parallel.make_layout(job, tasks, p1, scratch)
    for t in tasks[::2] + tasks[1::2]:
        parallel.fill(job, t, layout, scratch)
    parallel.finish_layout(job, tasks, scratch)
    got = parallel.open_stacked(scratch, job.n_src)
    pms = [core.build_pair_matrix(core.SideIndex.build(X)) for X, w in zip(Xs, weights) if w != 0]
    ref = core.StackedPairs.build(pms, [w for w in weights if w != 0], 0.7)
    for name in ("indptr", "indices", "data", "t_indptr", "t_indices", "costs"):
        a, b = np.asarray(getattr(got, name)), np.asarray(getattr(ref, name))
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    # and every row of M^T lists ascending pairs, i.e. the same summation order for any shard
    ti, tp = ref.t_indices, ref.t_indptr
    d = np.diff(ti.astype(np.int64))
    row_start = np.zeros(len(ti), dtype=bool)
    row_start[tp[:-1][tp[:-1] < len(ti)]] = True
    assert np.all(d[~row_start[1:]] > 0)
    shards = parallel.contiguous_shards(ref.costs, 3)
    assert np.array_equal(np.concatenate(shards), np.arange(job.n_src))
