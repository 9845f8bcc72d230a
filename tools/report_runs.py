"""Print a Markdown table of finished runs from their ``final.json`` / ``metrics.jsonl`` files.

    .venv/bin/python tools/report_runs.py runs/ab_*                        # one row per run directory
    .venv/bin/python tools/report_runs.py --per-epoch recall@10 runs/bb_*  # test metric after each epoch

Default columns: test Recall/NDCG at the validation-selected epoch, that epoch, the epochs run
and the number of ranks. ``--per-epoch METRIC``: one row per run with the *test* METRIC after
every evaluated epoch (from ``metrics.jsonl``), plus the first epoch's auxiliary/target
gradient norm ratio of the intra-SSL task (HMG statistics; blank when the run had no SSL).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def final_table(dirs: list[str]) -> None:
    print("| run | R@10 | NDCG@10 | R@50 | NDCG@50 | best epoch | epochs | ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for d in dirs:
        f = Path(d) / "final.json"
        if not f.is_file():
            print(f"| {Path(d).name} | (no final.json) | | | | | | |")
            continue
        r = json.loads(f.read_text())
        t = r.get("test") or {}
        cells = [f"{t.get(k, float('nan')):.4f}" for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50")]
        print(f"| {Path(d).name} | " + " | ".join(cells) +
              f" | {r.get('best_epoch')} | {r.get('epochs_run')} | {r.get('world_size')} |")


def per_epoch_table(dirs: list[str], metric: str) -> None:
    rows = []
    for d in dirs:
        f = Path(d) / "metrics.jsonl"
        if not f.is_file():
            rows.append((Path(d).name, {}, ""))
            continue
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        test = {r["epoch"]: r[metric] for r in recs if r.get("kind") == "test" and metric in r}
        ratio = next((r["hmg/intra/norm_ratio"] for r in recs
                      if r.get("kind") == "epoch" and "hmg/intra/norm_ratio" in r), None)
        rows.append((Path(d).name, test, "" if ratio is None else f"{ratio:.3g}"))
    n = max((max(t) + 1 for _, t, _ in rows if t), default=0)
    print(f"| run | " + " | ".join(f"epoch {e + 1}" for e in range(n)) + " | intra/target grad ratio, epoch 1 |")
    print("|---|" + "---|" * n + "---|")
    for name, test, ratio in rows:
        cells = [f"{test[e]:.4f}" if e in test else "" for e in range(n)]
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    ap.add_argument("--per-epoch", metavar="METRIC", help="test METRIC (e.g. recall@10) after every epoch")
    a = ap.parse_args(argv)
    if a.per_epoch:
        per_epoch_table(a.runs, a.per_epoch)
    else:
        final_table(a.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
