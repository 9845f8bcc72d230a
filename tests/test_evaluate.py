import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mbssl_dist.data.dataset import PreparedDataset
from mbssl_dist.evaluate import (eval_masks, eval_split, evaluate, evaluate_sums, heldout_sets,
                                 metric_names, pairs_to_csr, sums_to_metrics)
from mbssl_dist.parallel.comm import LocalComm


def brute_force(scores: np.ndarray, users, held: dict, mask: dict, ks):
    """Per-user reference: sort candidates by (-score, item id), read off top-K."""
    n_items = scores.shape[1]
    tot = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    n = 0
    for u in users:
        h = sorted(held.get(u, ()))
        if not h:
            continue
        n += 1
        cands = [i for i in range(n_items) if i not in mask.get(u, set()) or i in h]
        order = sorted(cands, key=lambda i: (-scores[u, i], i))
        for k in ks:
            top = order[:k]
            hits = [r for r, i in enumerate(top) if i in h]
            tot[f"recall@{k}"] += len(hits) / len(h)
            dcg = sum(1 / math.log2(r + 2) for r in hits)
            idcg = sum(1 / math.log2(j + 2) for j in range(min(len(h), k)))
            tot[f"ndcg@{k}"] += dcg / idcg
    return {key: v / n for key, v in tot.items()}, n


def random_case(seed, n_users=40, n_items=30, n_levels=5, multi=True):
    rng = np.random.default_rng(seed)
    # Few distinct score values -> many ties.
    scores = rng.integers(0, n_levels, size=(n_users, n_items)).astype(np.float32)
    held, mask = {}, {}
    for u in range(n_users):
        if u % 7 == 3:
            continue  # no held-out item: skipped
        nh = rng.integers(1, 4) if multi else 1
        items = rng.permutation(n_items)
        held[u] = set(items[:nh].tolist())
        # many masked items for some users (K > #candidates edge case)
        nm = n_items - nh - 2 if u % 5 == 0 else rng.integers(0, 10)
        mask[u] = set(items[nh:nh + nm].tolist())
    return scores, held, mask


def to_csr(d, shape):
    us = [u for u, s in d.items() for _ in s]
    it = [i for s in d.values() for i in s]
    return pairs_to_csr(np.array(us, dtype=np.int64), np.array(it, dtype=np.int64), shape)


def score_fn_of(scores):
    t = torch.from_numpy(scores)
    return lambda u: t[u]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("multi", [False, True])
def test_matches_brute_force(seed, multi):
    scores, held, mask = random_case(seed, multi=multi)
    n_users, n_items = scores.shape
    ks = (1, 5, 10, 50)  # 50 > n_items
    users = np.arange(n_users)
    ref, n_ref = brute_force(scores, users, held, mask, ks)
    got = evaluate(score_fn_of(scores), users, to_csr(held, scores.shape), to_csr(mask, scores.shape), ks=ks,
                   batch_size=7)
    assert got["n_users"] == n_ref
    for key, v in ref.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    # K beyond the candidate count: every held-out item is found.
    assert got["recall@50"] == pytest.approx(1.0)


def test_batch_size_invariance_and_pair_input():
    scores, held, mask = random_case(5)
    shape = scores.shape
    users = np.arange(shape[0])
    res = [evaluate(score_fn_of(scores), users, to_csr(held, shape), to_csr(mask, shape), batch_size=b)
           for b in (1, 3, 16, 1000)]
    for r in res[1:]:
        for key in r:
            assert r[key] == pytest.approx(res[0][key], abs=1e-12)
    hu = np.array([u for u, s in held.items() for _ in s])
    hi = np.array([i for s in held.values() for i in s])
    r2 = evaluate(score_fn_of(scores), users, (hu, hi), to_csr(mask, shape))
    assert r2 == pytest.approx(res[0])


def test_split_users_sums_add_up():
    scores, held, mask = random_case(9, n_users=50)
    shape = scores.shape
    H, M = to_csr(held, shape), to_csr(mask, shape)
    perm = np.random.default_rng(0).permutation(shape[0])
    a, b = perm[:20], perm[20:]
    whole = evaluate_sums(score_fn_of(scores), np.arange(shape[0]), H, M)
    parts = evaluate_sums(score_fn_of(scores), a, H, M) + evaluate_sums(score_fn_of(scores), b, H, M)
    assert torch.allclose(whole, parts, rtol=0, atol=1e-10)
    assert len(whole) == len(metric_names())


class FakeComm(LocalComm):
    """Two 'ranks' simulated: all_reduce adds a fixed other-rank tensor, counts calls."""

    def __init__(self, other):
        self.other = other
        self.calls = 0

    def all_reduce_sum_(self, t):
        self.calls += 1
        t += self.other
        return t


def test_single_all_reduce_and_distributed_mean():
    scores, held, mask = random_case(4, n_users=30)
    shape = scores.shape
    H, M = to_csr(held, shape), to_csr(mask, shape)
    a, b = np.arange(0, 13), np.arange(13, 30)
    comm = FakeComm(evaluate_sums(score_fn_of(scores), b, H, M))
    got = evaluate(score_fn_of(scores), a, H, M, comm=comm)
    assert comm.calls == 1
    ref = evaluate(score_fn_of(scores), np.arange(30), H, M)
    assert got == pytest.approx(ref)


def test_tie_rule_explicit():
    # all scores equal: the held-out item's rank = number of unmasked candidates with smaller id
    scores = np.zeros((1, 20), dtype=np.float32)
    H = pairs_to_csr([0], [12], (1, 20))
    M = pairs_to_csr([0, 0, 0], [0, 1, 2], (1, 20))  # 9 candidates before item 12
    r = evaluate(score_fn_of(scores), [0], H, M, ks=(9, 10))
    assert r["recall@9"] == 0.0 and r["recall@10"] == 1.0
    assert r["ndcg@10"] == pytest.approx(1 / math.log2(11))


def test_heldout_overrides_mask_and_nan_rejected():
    scores = np.arange(10, dtype=np.float32)[None, :].copy()
    H = pairs_to_csr([0], [0], (1, 10))
    M = pairs_to_csr([0, 0], [0, 9], (1, 10))
    r = evaluate(score_fn_of(scores), [0], H, M, ks=(8, 9))
    # 8 candidates (1..8) better than item 0; 9 is masked; 0 stays a candidate
    assert r["recall@8"] == 0.0 and r["recall@9"] == 1.0
    scores[0, 3] = np.nan
    with pytest.raises(ValueError):
        evaluate(score_fn_of(scores), [0], H, M)


def test_empty_users():
    H = pairs_to_csr([0], [1], (3, 5))
    r = evaluate(lambda u: torch.zeros(len(u), 5), [1, 2], H, None)
    assert r["n_users"] == 0 and math.isnan(r["recall@10"])


def tiny_dataset():
    # behaviors: view(0), buy(1). 3 users x 6 items
    tu = np.array([0, 0, 1, 2, 0, 1], dtype=np.int32)
    ti = np.array([0, 1, 2, 3, 4, 5], dtype=np.int32)
    tb = np.array([1, 1, 1, 1, 0, 0], dtype=np.int8)
    return PreparedDataset(n_users=3, n_items=6, behaviors=["view", "buy"], train_user=tu, train_item=ti,
                           train_behavior=tb, valid_user=np.array([0, 1], dtype=np.int32),
                           valid_item=np.array([2, 3], dtype=np.int32),
                           test_user=np.array([0, 1, 2], dtype=np.int32),
                           test_item=np.array([5, 4, 0], dtype=np.int32))


def test_eval_masks_and_split():
    ds = tiny_dataset()
    m = eval_masks(ds)
    assert sorted(zip(*m["valid"].nonzero())) == [(0, 0), (0, 1), (1, 2), (2, 3)]  # buys only, views stay
    assert sorted(zip(*m["test"].nonzero())) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    users, h, mask = eval_split(ds, "valid")
    assert users.tolist() == [0, 1]
    assert mask is not None and h[0, 2] == 1 and h[0, 5] == 0  # the test item is not masked at valid
    assert mask[0, 5] == 0
    users, h, mask = eval_split(ds, "test")
    assert users.tolist() == [0, 1, 2]
    assert heldout_sets(ds)["test"][2, 0] == 1
    with pytest.raises(ValueError):
        eval_split(ds, "train")


def test_sums_to_metrics_keys():
    m = sums_to_metrics(torch.tensor([1.0, 0.5, 2.0, 1.0, 4.0], dtype=torch.float64))
    assert m == {"recall@10": 0.25, "ndcg@10": 0.125, "recall@50": 0.5, "ndcg@50": 0.25, "n_users": 4}


def test_extra_mask_is_union():
    scores, held, mask = random_case(11)
    shape = scores.shape
    rng = np.random.default_rng(1)
    extra = {u: set(rng.choice(shape[1], 4, replace=False).tolist()) - held.get(u, set()) for u in range(shape[0])}
    union = {u: mask.get(u, set()) | extra[u] for u in range(shape[0])}
    users = np.arange(shape[0])
    a = evaluate(score_fn_of(scores), users, to_csr(held, shape), to_csr(mask, shape), extra_mask=to_csr(extra, shape))
    b = evaluate(score_fn_of(scores), users, to_csr(held, shape), to_csr(union, shape))
    assert a == pytest.approx(b)
    c = evaluate(score_fn_of(scores), users, to_csr(held, shape), None, extra_mask=to_csr(extra, shape))
    ref, _ = brute_force(scores, users, held, extra, (10, 50))
    for k, v in ref.items():
        assert c[k] == pytest.approx(v)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("multi", [False, True])
def test_blocked_ranking_equals_unblocked(seed, multi):
    """The blocked ranking (bounded score blocks, sparse mask subtraction) gives sums identical
    to the dense evaluator it replaced, for blocks from 1 entry (narrower than one row) up to
    the whole batch, with ties, -inf scores, masked held-out items and a held-out matrix
    narrower than the scores; one held-out item per user (score rows read in place) or several."""
    from .oracles import evaluate_sums_unblocked

    scores, held, mask = random_case(seed, n_users=23, n_items=17, n_levels=4, multi=multi)
    scores[2, :5] = -np.inf
    scores[4, :] = -np.inf
    shape = scores.shape
    mask[5] = mask.get(5, set()) | held.get(5, set())  # overlap: held-out items stay candidates
    H, M = to_csr(held, shape), to_csr(mask, shape)
    extra = to_csr({u: {(u * 3) % shape[1]} for u in range(0, shape[0], 2)}, shape)
    narrow = H[:, :int(H.indices.max()) + 1]  # fewer columns than the scores
    users = np.arange(shape[0])
    n = shape[1]
    for bs in (1, 4, 1000):
        for H_, M_, X_ in ((H, M, None), (H, M, extra), (narrow, None, None), (H, None, extra)):
            ref = evaluate_sums_unblocked(score_fn_of(scores), users, H_, M_, ks=(1, 3, 10, 50), batch_size=bs,
                                          extra_mask=X_)
            for block in (1, 2, 5, n - 1, n, n + 1, 3 * n, 2 ** 23):
                got = evaluate_sums(score_fn_of(scores), users, H_, M_, ks=(1, 3, 10, 50), batch_size=bs,
                                    extra_mask=X_, block_elems=block)
                assert torch.equal(got, ref), (bs, block)


def test_blocked_score_calls_are_bounded():
    """score_fn sees at most max(1, block // n_items) users (and batch_size); timing adds up."""
    scores, held, mask = random_case(3, n_users=40, n_items=30)
    shape = scores.shape
    H, M = to_csr(held, shape), to_csr(mask, shape)
    for block, bs, want in ((1, 16, 1), (29, 16, 1), (30, 16, 1), (95, 16, 3), (10 ** 6, 16, 16)):
        seen = []

        def fn(u):
            seen.append(len(u))
            return torch.from_numpy(scores)[u]

        timing = {}
        evaluate_sums(fn, np.arange(shape[0]), H, M, batch_size=bs, block_elems=block, timing=timing)
        assert max(seen) == want, (block, bs, seen)
        assert timing["score_s"] >= 0 and timing["rank_s"] > 0
    with pytest.raises(ValueError, match="block_elems"):
        evaluate_sums(score_fn_of(scores), [0], H, M, block_elems=0)
