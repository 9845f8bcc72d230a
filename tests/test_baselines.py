import json

import numpy as np
import pytest
import torch

from mbssl_dist.baselines import (AuxPopularityScorer, BPRLoss, LightGCN, PopularityScorer, main,
                                  merged_pairs, run_baselines, sample_negatives, train_lightgcn)
from mbssl_dist.data.dataset import PreparedDataset
from mbssl_dist.evaluate import eval_split, evaluate
from mbssl_dist.graph.multigraph import BehaviorGraph


def order_of(scores_row, exclude=()):
    """Ranking by the evaluator's rule: descending score, ties by ascending id."""
    return [i for i in sorted(range(len(scores_row)), key=lambda i: (-scores_row[i], i)) if i not in exclude]


def hand_dataset():
    # 3 users x 6 items; behaviors view(0), cart(1), buy(2)
    pairs = [  # (user, item, behavior)
        (0, 0, 2), (1, 0, 2), (2, 0, 2),  # item 0 bought 3x
        (0, 3, 2), (1, 3, 2),             # item 3 bought 2x
        (2, 5, 2),                        # item 5 bought 1x
        (0, 1, 0), (0, 5, 0), (0, 2, 1), (0, 4, 0), (0, 4, 1),  # user 0 views 1,5,4; carts 2,4
        (1, 0, 0),                        # user 1 viewed item 0 (also bought: masked at eval)
    ]
    u, i, b = (np.array(x) for x in zip(*pairs))
    return PreparedDataset(n_users=3, n_items=6, behaviors=["view", "cart", "buy"], train_user=u.astype(np.int32),
                           train_item=i.astype(np.int32), train_behavior=b.astype(np.int8),
                           valid_user=np.zeros(0, np.int32), valid_item=np.zeros(0, np.int32),
                           test_user=np.array([0, 1, 2], np.int32), test_item=np.array([1, 2, 3], np.int32))


def test_popularity_ranking():
    ds = hand_dataset()
    s = PopularityScorer(ds)(torch.tensor([0, 2])).numpy()
    assert s.shape == (2, 6)
    assert order_of(s[0]) == [0, 3, 5, 1, 2, 4]  # counts 3, 2, 1, then zero-count items by id
    assert (s[0] == s[1]).all()


def test_aux_popularity_ranking():
    ds = hand_dataset()
    s = AuxPopularityScorer(ds)(torch.tensor([0, 1, 2])).numpy()
    # user 0: carted {2, 4} (4 also viewed) -> by popularity (both 0) then id: 2, 4;
    # viewed {1, 5}: 5 (pop 1) before 1 (pop 0); then the rest by popularity: 0 (3), 3 (2)
    assert order_of(s[0]) == [2, 4, 5, 1, 0, 3]
    assert order_of(s[0], exclude={0, 3}) == [2, 4, 5, 1]  # after masking training buys
    # user 1: viewed item 0 -> first; then popularity
    assert order_of(s[1]) == [0, 3, 5, 1, 2, 4]
    # user 2: no aux items -> plain popularity
    assert order_of(s[2]) == order_of(PopularityScorer(ds)(torch.tensor([2])).numpy()[0])


def tiny_graph(seed=0, n_users=7, n_items=5, p=0.4):
    rng = np.random.default_rng(seed)
    R = (rng.random((n_users, n_items)) < p).astype(np.float64)
    R[0, :] = 0  # isolated user
    R[1, 0] = 1
    u, i = np.nonzero(R)
    return R, u, i


def dense_lightgcn(R, eu, ei, n_layers):
    du, di = R.sum(1), R.sum(0)
    du[du == 0] = 1
    di[di == 0] = 1
    A = torch.from_numpy(R / np.sqrt(np.outer(du, di)))
    u, i = eu, ei
    su, si = u, i
    for _ in range(n_layers):
        u, i = A @ i, A.T @ u
        su, si = su + u, si + i
    return su / (n_layers + 1), si / (n_layers + 1)


def test_propagation_matches_dense_and_grad():
    R, u, i = tiny_graph()
    g = BehaviorGraph.from_pairs(u, i, *R.shape)
    a_ui, a_iu = g.adjacency("sym", torch.float64)
    m = LightGCN(*R.shape, dim=4, n_layers=3).double()
    eu, ei = m(a_ui, a_iu)
    ru, ri = dense_lightgcn(R, m.user_emb.weight, m.item_emb.weight, 3)
    assert torch.allclose(eu, ru, atol=1e-12) and torch.allclose(ei, ri, atol=1e-12)
    w = torch.randn(eu.shape, dtype=torch.float64)
    v = torch.randn(ei.shape, dtype=torch.float64)
    gu, gi = torch.autograd.grad((eu * w).sum() + (ei * v).sum(), [m.user_emb.weight, m.item_emb.weight])
    ru, ri = dense_lightgcn(R, m.user_emb.weight, m.item_emb.weight, 3)
    hu, hi = torch.autograd.grad((ru * w).sum() + (ri * v).sum(), [m.user_emb.weight, m.item_emb.weight])
    assert torch.allclose(gu, hu, atol=1e-12) and torch.allclose(gi, hi, atol=1e-12)
    m.refresh(a_ui, a_iu)
    sc = m.recommend(torch.tensor([1, 2]))
    assert torch.allclose(sc, eu[[1, 2]] @ ei.T)


def test_recommend_needs_refresh():
    m = LightGCN(3, 4, dim=2, n_layers=1)
    with pytest.raises(RuntimeError):
        m.recommend(torch.tensor([0]))


def test_bpr_loss():
    u = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[2.0, 0.0]])
    n = torch.tensor([[0.0, 1.0]])
    assert float(BPRLoss(0.0)(u, p, n, u, p, n)) == pytest.approx(float(-torch.nn.functional.logsigmoid(torch.tensor(2.0))))
    assert float(BPRLoss(1.0)(u, p, n, u, p, n)) == pytest.approx(
        float(-torch.nn.functional.logsigmoid(torch.tensor(2.0))) + 0.5 * 6.0)


def test_negative_sampling_avoids_positives():
    pu = torch.tensor([0, 0, 0, 1])
    pi = torch.tensor([0, 1, 2, 3])
    keys = pu * 5 + pi
    g = torch.Generator().manual_seed(0)
    users = torch.tensor([0] * 200 + [1] * 200)
    neg = sample_negatives(users, keys, 5, g)
    assert set(neg[:200].tolist()) <= {3, 4} and 3 not in set(neg[200:].tolist())


def clustered_dataset(seed=0, sizes=(60, 25, 15), items_per=20, n_train=5):
    """Users of cluster c only interact with items of cluster c; cluster 0 dominates popularity."""
    rng = np.random.default_rng(seed)
    tu, ti, vu, vi, su, si = [], [], [], [], [], []
    u = 0
    for c, n in enumerate(sizes):
        base = c * items_per
        for _ in range(n):
            its = base + rng.choice(items_per, n_train + 2, replace=False)
            tu += [u] * n_train
            ti += its[:n_train].tolist()
            vu.append(u), vi.append(its[n_train])
            su.append(u), si.append(its[n_train + 1])
            u += 1
    n_users, n_items = u, items_per * len(sizes)
    # auxiliary behavior: a noisy view graph
    vw_u = rng.integers(0, n_users, 200)
    vw_i = rng.integers(0, n_items, 200)
    a = lambda x, t: np.asarray(x, dtype=t)
    return PreparedDataset(
        n_users=n_users, n_items=n_items, behaviors=["view", "buy"],
        train_user=a(np.concatenate([vw_u, tu]), np.int32), train_item=a(np.concatenate([vw_i, ti]), np.int32),
        train_behavior=a([0] * 200 + [1] * len(tu), np.int8),
        valid_user=a(vu, np.int32), valid_item=a(vi, np.int32), test_user=a(su, np.int32), test_item=a(si, np.int32))


def test_lightgcn_beats_popularity_on_clusters():
    ds = clustered_dataset()  # ~1.5 s on an idle 2-core machine
    users, h, m = eval_split(ds, "test")
    pop = evaluate(PopularityScorer(ds), users, h, m)
    res = train_lightgcn(ds.pairs(1), ds.n_users, ds.n_items, epochs=40, batch_size=128, lr=0.01, reg=1e-4,
                         dim=16, n_layers=2, seed=3)
    lg = evaluate(res.model.recommend, users, h, m)
    assert lg["recall@10"] > pop["recall@10"] + 0.2, (lg, pop)


def test_lightgcn_deterministic_and_early_stopping():
    ds = clustered_dataset(seed=1)
    pairs = ds.pairs(1)
    kw = dict(epochs=4, batch_size=64, lr=0.01, dim=8, n_layers=2, seed=7)
    a = train_lightgcn(pairs, ds.n_users, ds.n_items, **kw)
    b = train_lightgcn(pairs, ds.n_users, ds.n_items, **kw)
    c = train_lightgcn(pairs, ds.n_users, ds.n_items, **{**kw, "seed": 8})
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert not torch.equal(a.model.user_emb.weight, c.model.user_emb.weight)

    # eval_fn: metric peaks at epoch 2 -> best state from epoch 2 restored, stop after patience
    metrics = [0.1, 0.3, 0.5, 0.4, 0.2, 0.6, 0.9]
    states = {}

    def eval_fn(epoch, model):
        states[epoch] = model.user_emb.weight.detach().clone()
        return metrics[epoch]

    r = train_lightgcn(pairs, ds.n_users, ds.n_items, **{**kw, "epochs": 7}, eval_fn=eval_fn, patience=2)
    assert r.best_epoch == 2 and r.best_metric == 0.5
    assert len(r.history) == 5  # epochs 0..4, stopped after 2 non-improving evaluations
    assert torch.equal(r.model.user_emb.weight, states[2])


def test_merged_pairs_dedup():
    ds = hand_dataset()
    u, i = merged_pairs(ds)
    pairs = list(zip(u.tolist(), i.tolist()))
    assert len(pairs) == len(set(pairs)) == 10  # (0,4) view+cart and (1,0) view+buy merged
    assert pairs == sorted(pairs)


def test_run_baselines_and_cli(tmp_path):
    from mbssl_dist.data.dataset import write_prepared

    ds = clustered_dataset(seed=2, sizes=(20, 10), items_per=10)
    res = run_baselines(ds, ["popularity", "aux_popularity", "lightgcn_all"], epochs=3, batch_size=64,
                        dim=8, n_layers=1, eval_every=1, patience=2)
    assert set(res) == {"popularity", "aux_popularity", "lightgcn_all"}
    for r in res.values():
        assert r["valid"]["n_users"] == 30 and r["test"]["n_users"] == 30
    d = tmp_path / "prep"
    d.mkdir()
    write_prepared(d, ds)
    out = tmp_path / "res.json"
    assert main(["--data", str(d), "--out", str(out), "--which", "popularity,lightgcn", "--epochs", "2",
                 "--batch-size", "64", "--dim", "8", "--layers", "1", "--eval-every", "1", "--no-mlflow"]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"popularity", "lightgcn"}
    assert doc["results"]["popularity"]["test"] == res["popularity"]["test"]
    # the CLI's LightGCN figures equal a brute-force evaluation of the same training run
    # (same arguments -> same model, train_lightgcn is deterministic): epoch selected on a
    # brute-force validation recall@10, test recall@10 / ndcg@10 from its embeddings
    lg = doc["results"]["lightgcn"]
    r = train_lightgcn(ds.pairs(1), ds.n_users, ds.n_items, epochs=2, batch_size=64, lr=1e-3, reg=1e-4, seed=0,
                       dim=8, n_layers=1, eval_every=1, patience=5,
                       eval_fn=lambda ep, model: brute_force_metrics(model, ds, "valid")[0])
    assert lg["best_epoch"] == r.best_epoch and lg["best_valid_recall@10"] == pytest.approx(r.best_metric, abs=1e-12)
    recall, ndcg = brute_force_metrics(r.model, ds, "test")
    assert lg["test"]["recall@10"] == pytest.approx(recall, abs=1e-9)
    assert lg["test"]["ndcg@10"] == pytest.approx(ndcg, abs=1e-9)
    assert lg["valid"]["recall@10"] == pytest.approx(brute_force_metrics(r.model, ds, "valid")[0], abs=1e-9)


def brute_force_metrics(model, ds, phase: str, k: int = 10) -> tuple[float, float]:
    """Recall@k and NDCG@k by the protocol's literal rule, one held-out item per user: the
    candidates are all items minus the user's training buys (and, at test, the validation
    item); rank = #candidates scoring higher + #equal-scoring candidates with a lower id."""
    scores = model.recommend(torch.arange(ds.n_users)).detach().double().numpy()
    buys = {}
    for u, i in zip(*ds.pairs(ds.n_behaviors - 1)):
        buys.setdefault(int(u), set()).add(int(i))
    if phase == "test":
        for u, i in zip(ds.valid_user, ds.valid_item):
            buys.setdefault(int(u), set()).add(int(i))
    held = zip(ds.valid_user, ds.valid_item) if phase == "valid" else zip(ds.test_user, ds.test_item)
    hits, dcg, n = 0.0, 0.0, 0
    for u, t in held:
        u, t = int(u), int(t)
        s = scores[u]
        rank = sum(1 for j in range(ds.n_items) if j != t and j not in buys.get(u, ())
                   and (s[j] > s[t] or (s[j] == s[t] and j < t)))
        n += 1
        if rank < k:
            hits += 1
            dcg += 1.0 / np.log2(rank + 2)
    return hits / n, dcg / n
