"""The unseen-dataset check of the built-in defaults (issue #13): train each shared dataset with
no config file, only its ``data.*`` fields, and print the test R@10 / NDCG@10 of every epoch
beside the popularity baseline (same evaluator) and the ratio to it.

    .venv/bin/python tools/default_recipe_check.py --out runs/recipe_check [--datasets retailrocket ijcai]
        [--epochs 1] [--seeds 2020 2021] [--set train.patience=3 ...]

One process per run, 1 thread (deterministic); runs go to OUT/DATASET_sSEED (OUT must be new or
empty, so nothing is silently resumed). ``--epochs 20`` with the default patience trains to the
early stop; the row marked * is the epoch selected on validation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from trainer_runs import ROOT, fresh_out, train
SHARED = ROOT.parent / "shared" / "data"
# only what says where the data is and what it holds (pv-less splits need the declared sizes)
DATASETS = {
    "taobao_mbcgcn": ["data.format=\"text\"", "data.path=\"{d}/Taobao_MBCGCN\""],
    "retailrocket": ["data.format=\"text\"", "data.path=\"{d}/Retailrocket\""],
    "beibei": ["data.format=\"text\"", "data.path=\"{d}/incomplete/Beibei\"", 'data.behaviors=["cart","buy"]',
               "data.n_users=21716", "data.n_items=7977"],
    "taobao": ["data.format=\"text\"", "data.path=\"{d}/incomplete/Taobao\"", 'data.behaviors=["cart","buy"]',
               "data.n_users=48749", "data.n_items=39493"],
    "ijcai": ["data.format=\"text\"", "data.path=\"{d}/incomplete/IJCAI\"", 'data.behaviors=["fav","cart","buy"]',
              "data.n_users=17435", "data.n_items=35920"],
}


def popularity(prepared: Path) -> dict:
    """Test metrics of the popularity baseline on the dataset the trainer prepared."""
    from mbssl_dist.baselines import run_baselines
    from mbssl_dist.data import load_prepared

    return run_baselines(load_prepared(prepared), ["popularity"], ks=(10,))["popularity"]["test"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--data-root", default=str(SHARED), help="the shared data folder")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seeds", nargs="+", type=int, default=[2020])
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--out", required=True, help="a new (or empty) folder for the runs")
    a = ap.parse_args(argv)
    out = fresh_out(a.out, "default_recipe_check")
    print(f"load average {os.getloadavg()}; built-in defaults + data.* only, 1 thread, epochs {a.epochs}")
    print("| dataset | seed | epoch | test R@10 | test NDCG@10 | popularity R@10 / NDCG@10 | R@10 / popularity |")
    print("|---|---|---|---|---|---|---|")
    summary: dict[str, list[tuple[float, float]]] = {}
    for name in a.datasets:
        data_sets = [s.format(d=a.data_root) for s in DATASETS[name]]
        pop = None
        for seed in a.seeds:
            run = f"{name}_s{seed}"
            recs, final = train(out, run, data_sets + [f"train.epochs={a.epochs}", f"train.seed={seed}"] + a.set)
            pop = pop or popularity(ROOT / final["dataset"])  # the trainer's cache path (relative to ROOT)
            best = final.get("best_epoch")
            for r in (r for r in recs if r.get("kind") == "test"):
                mark = " *" if r["epoch"] == best else ""
                print(f"| {name} | {seed} | {r['epoch'] + 1}{mark} | {r['recall@10']:.4f} | {r['ndcg@10']:.4f} | "
                      f"{pop['recall@10']:.4f} / {pop['ndcg@10']:.4f} | {r['recall@10'] / max(pop['recall@10'], 1e-12):.1f}x |",
                      flush=True)
            summary.setdefault(name, []).append((final["test"]["recall@10"], final["test"]["ndcg@10"]))
    if len(a.seeds) > 1:
        print("\n| dataset | test R@10 at the selected epoch, mean ± std | NDCG@10 |\n|---|---|---|")
        for name, v in summary.items():
            r, n = [x[0] for x in v], [x[1] for x in v]
            print(f"| {name} | {statistics.mean(r):.4f} ± {statistics.stdev(r):.4f} | "
                  f"{statistics.mean(n):.4f} ± {statistics.stdev(n):.4f} |")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
