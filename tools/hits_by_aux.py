"""Where a model's test hits come from, beside the aux-popularity rule (issue #13: "the model must
add to it, not reproduce it: reorder within the user's viewed/carted items and rank items outside
them").

    .venv/bin/python -m mbssl_dist.recommend --run runs/NAME --k 10 --out recs.parquet
    .venv/bin/python tools/hits_by_aux.py --data cache/<prepared> --recs recs.parquet [--k 10]

Splits the test pairs into those the user had in an auxiliary behavior (view/cart/...) and those
outside every auxiliary behavior, and prints per group the share of test pairs hit in the top K
by the model (``--recs``, the recommend command's lists: its known-item mask and tie rule are the
evaluator's) and by aux-popularity (``baselines.AuxPopularityScorer``, ranked here with the same
mask and the evaluator's tie rule: ascending item id), how many both / only one of them hit, and
the in-aux group again by the user's number of auxiliary candidates (aux items that are not
known purchases). With more than K auxiliary candidates an "aux items first" ranking can only
win by ordering them; an item outside them is reached only by ranking it above some of them.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch


def aux_pop_topk(ds, known: sp.csr_matrix, users: np.ndarray, k: int) -> np.ndarray:
    """[len(users), k] aux-popularity top-K item ids, known items masked, ties by ascending id."""
    from mbssl_dist.baselines import AuxPopularityScorer

    score = AuxPopularityScorer(ds)
    out = np.empty((len(users), k), dtype=np.int64)
    for s in range(0, len(users), 1024):
        ub = users[s:s + 1024]
        S = score(torch.from_numpy(ub))
        S[torch.from_numpy(known[ub].toarray() > 0)] = -np.inf
        out[s:s + len(ub)] = torch.sort(S, dim=1, descending=True, stable=True).indices[:, :k].numpy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the prepared dataset the run was trained on")
    ap.add_argument("--recs", required=True, help="Parquet of `python -m mbssl_dist.recommend --k K` (dense ids)")
    ap.add_argument("--k", type=int, default=10)
    a = ap.parse_args(argv)
    from mbssl_dist.data import DataError, load_prepared
    from mbssl_dist.data.split import pair_keys
    from mbssl_dist.evaluate import eval_masks

    torch.set_num_threads(1)
    try:  # a wrong path or file: one line, exit 2
        ds = load_prepared(a.data)
    except DataError as e:
        print(f"hits_by_aux: {e}", file=sys.stderr)
        return 2
    try:
        recs = pd.read_parquet(a.recs, columns=["user", "item", "rank"])
    except (OSError, ValueError, KeyError) as e:
        print(f"hits_by_aux: {a.recs}: not a Parquet file of recommend's lists (user, item, rank): "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    n, K = ds.n_items, ds.n_behaviors
    recs = recs[recs["rank"] <= a.k]
    if recs.empty or int(recs.groupby("user").size().max()) < a.k:
        print(f"hits_by_aux: {a.recs} holds fewer than --k {a.k} items per user", file=sys.stderr)
        return 2
    tu, ti = ds.test_user.astype(np.int64), ds.test_item.astype(np.int64)

    def key(u, i):  # the evaluator's (user, item) pair keys
        return pair_keys(np.asarray(u), np.asarray(i), n)

    aux = np.unique(np.concatenate([key(*ds.pairs(k)) for k in range(K - 1)])) if K > 1 else np.zeros(0, np.int64)
    known = eval_masks(ds)["test"]  # the evaluator's (and recommend's) known purchases: train + validation
    in_aux = np.isin(key(tu, ti), aux)
    hit_model = np.isin(key(tu, ti), key(recs["user"].to_numpy(), recs["item"].to_numpy()))
    users = np.unique(tu)
    top = aux_pop_topk(ds, known, users, a.k)
    row = np.searchsorted(users, tu)
    hit_pop = (top[row] == ti[:, None]).any(1)
    # auxiliary candidates per user: aux items that are not known purchases
    au = aux // n
    not_known = np.asarray(known[au, aux % n]).ravel() == 0
    n_cand = np.bincount(au[not_known], minlength=ds.n_users)[tu]
    # per-user recall weights, as the evaluator averages over users
    per_user = np.bincount(tu, minlength=ds.n_users)[tu].astype(np.float64)
    w = 1.0 / per_user / len(users)

    print(f"{a.data}: {len(tu)} test pairs of {len(users)} users, K = {a.k}; recall@{a.k} contributions "
          f"(sum over a group = that group's part of the overall recall)")
    print(f"| test pairs | share | model | aux-popularity | both | model only | aux-popularity only |")
    print("|---|---|---|---|---|---|---|")
    groups = [("in an auxiliary behavior", in_aux), ("in no auxiliary behavior", ~in_aux),
              ("all", np.ones_like(in_aux))]
    for lo, hi in [(0, a.k), (a.k + 1, 2 * a.k), (2 * a.k + 1, 5 * a.k), (5 * a.k + 1, None)]:
        sel = in_aux & (n_cand >= lo) & ((n_cand <= hi) if hi is not None else True)
        span = f"<= {hi}" if lo == 0 else f"{lo}-{hi}" if hi is not None else f"> {lo - 1}"
        groups.append((f"  in aux, {span} aux candidates", sel))
    for name, g in groups:
        c = lambda m: float((w * (m & g)).sum())  # noqa: E731
        print(f"| {name} | {float(w[g].sum()):.3f} | {c(hit_model):.4f} | {c(hit_pop):.4f} | "
              f"{c(hit_model & hit_pop):.4f} | {c(hit_model & ~hit_pop):.4f} | {c(~hit_model & hit_pop):.4f} |")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
