"""Do the validation and test pairs come from the same distribution? (issue #13: "where it cannot,
say by how much and why").

    .venv/bin/python tools/split_shift.py --data cache/<prepared> [--k 10]

The shared datasets have no timestamps, so the validation set is carved at random, one training
purchase per user (``data.split.carve_validation``), while the test set is the authors' hold-out.
A model is selected on validation; if the held-out items differ between the two, what
validation rewards need not carry over to test. This prints, per held-out set:

* the share of pairs whose item the user had in the closest auxiliary behavior (cart);
* the held-out items' training target count (their buy popularity), median and mean log1p;
* their conversion in the closest auxiliary behavior: of the users who had the item there, the
  share who also bought it in training, smoothed toward the global rate with weight
  ``--prior`` (mean over pairs; and over the pairs in that behavior only);

and Recall@K / NDCG@K (the evaluator, its masks) of four rules that differ only in how they
order: popularity; aux-popularity (``baselines.AuxPopularityScorer``: the user's auxiliary items
first, closest behavior first, each level by buy popularity, then the rest by popularity);
aux-conversion (the same, with each auxiliary level ordered by that conversion instead; the rest
still by popularity); and aux-closest-count (each auxiliary level ordered by how many users have
the item in the closest auxiliary behavior, e.g. cart popularity instead of buy popularity; equal
counts by item id, so on a view level most items tie at 0). If aux-conversion wins on validation
and loses on test, model selection on validation favors an ordering of the user's auxiliary
items that the test set punishes.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import scipy.sparse as sp
import torch


def closest_aux_count(ds) -> np.ndarray:
    """Per item: the number of users who have it in the closest auxiliary behavior."""
    aux = ds.behavior_csr(ds.n_behaviors - 2, dtype=np.float64) > 0
    return np.asarray(aux.sum(0), dtype=np.float64).ravel()


def conversion(ds, prior: float) -> np.ndarray:
    """Per item: (#users with it in the closest aux behavior who bought it in training + prior *
    global rate) / (#users with it in that behavior + prior)."""
    K = ds.n_behaviors
    aux = (ds.behavior_csr(K - 2, dtype=np.float64) > 0).astype(np.float64)
    buy = (ds.behavior_csr(K - 1, dtype=np.float64) > 0).astype(np.float64)
    n_aux = closest_aux_count(ds)
    n_both = np.asarray(aux.multiply(buy).sum(0)).ravel()
    rate = n_both.sum() / max(n_aux.sum(), 1.0)
    return (n_both + prior * rate) / (n_aux + prior)


def shift_stats(ds, conv: np.ndarray) -> dict[str, dict[str, float]]:
    """Per held-out set ('valid', 'test'): the item statistics the module docstring lists
    (``conv``: ``conversion(ds, prior)``)."""
    from mbssl_dist.baselines import item_popularity
    from mbssl_dist.evaluate import heldout_sets

    K = ds.n_behaviors
    pop = item_popularity(ds).astype(np.float64)
    aux = ds.behavior_csr(K - 2, dtype=np.float64).tocsr()
    out = {}
    for ph, h in heldout_sets(ds).items():
        h = sp.coo_matrix(h)
        u, i = h.row.astype(np.int64), h.col.astype(np.int64)
        in_aux = np.asarray(aux[u, i]).ravel() > 0
        out[ph] = {"pairs": float(len(i)), "in_closest_aux": float(in_aux.mean()) if len(i) else float("nan"),
                   "median_buys": float(np.median(pop[i])) if len(i) else float("nan"),
                   "mean_log1p_buys": float(np.log1p(pop[i]).mean()) if len(i) else float("nan"),
                   "conversion": float(conv[i].mean()) if len(i) else float("nan"),
                   "conversion_in_aux": float(conv[i[in_aux]].mean()) if in_aux.any() else float("nan")}
    return out


def rule_metrics(ds, k: int, conv: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """{rule: {phase: evaluator metrics}} for popularity, aux-popularity, aux-conversion (each
    auxiliary level ordered by ``conv``) and aux-closest-count."""
    from mbssl_dist.baselines import AuxPopularityScorer, PopularityScorer
    from mbssl_dist.evaluate import eval_masks, eval_split, evaluate, heldout_sets

    rules = {"popularity": PopularityScorer(ds), "aux-popularity": AuxPopularityScorer(ds),
             "aux-conversion": AuxPopularityScorer(ds, within=conv),
             "aux-closest-count": AuxPopularityScorer(ds, within=closest_aux_count(ds))}
    held, masks = heldout_sets(ds), eval_masks(ds)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, score in rules.items():
        for ph in held:
            users, h, mask = eval_split(ds, ph, masks, held)
            out.setdefault(name, {})[ph] = evaluate(score, torch.from_numpy(users.astype(np.int64)), h, mask, ks=(k,))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared dataset directory")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--prior", type=float, default=5.0, help="smoothing weight of the conversion rate")
    a = ap.parse_args(argv)
    if a.k < 1 or not a.prior > 0:
        ap.error(f"--k must be >= 1 and --prior > 0 (got --k {a.k}, --prior {a.prior})")
    from mbssl_dist.data import DataError, load_prepared

    torch.set_num_threads(1)
    try:
        ds = load_prepared(a.data)
    except DataError as e:
        print(f"split_shift: {e}", file=sys.stderr)
        return 2
    if ds.n_behaviors < 2:
        print(f"split_shift: {a.data}: no auxiliary behavior", file=sys.stderr)
        return 2
    conv = conversion(ds, a.prior)
    st = shift_stats(ds, conv)
    print(f"{a.data}: {ds.n_users} users x {ds.n_items} items; behaviors {', '.join(ds.behaviors)}; "
          f"closest auxiliary behavior: {ds.behaviors[-2]}\n")
    print("| held-out set | pairs | in closest aux | median buys of the item | mean log1p buys | "
          "conversion | conversion, pairs in aux |\n|---|---|---|---|---|---|---|")
    for ph, s in st.items():
        print(f"| {ph} | {s['pairs']:.0f} | {s['in_closest_aux']:.3f} | {s['median_buys']:.0f} | "
              f"{s['mean_log1p_buys']:.3f} | {s['conversion']:.4f} | {s['conversion_in_aux']:.4f} |")
    rm = rule_metrics(ds, a.k, conv)
    r, n = f"recall@{a.k}", f"ndcg@{a.k}"
    print(f"\n| rule | valid R@{a.k} | valid N@{a.k} | test R@{a.k} | test N@{a.k} |\n|---|---|---|---|---|")
    for name, m in rm.items():
        print(f"| {name} | {m['valid'][r]:.4f} | {m['valid'][n]:.4f} | {m['test'][r]:.4f} | {m['test'][n]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
