"""Print a Markdown table of finished runs from their ``final.json`` files.

    .venv/bin/python tools/report_runs.py runs/ab_*            # one row per run directory

Columns: test Recall/NDCG at the validation-selected epoch, that epoch, and the epochs run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    print("| run | R@10 | NDCG@10 | R@50 | NDCG@50 | best epoch | epochs | ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for d in argv:
        f = Path(d) / "final.json"
        if not f.is_file():
            print(f"| {Path(d).name} | (no final.json) | | | | | | |")
            continue
        r = json.loads(f.read_text())
        t = r.get("test") or {}
        cells = [f"{t.get(k, float('nan')):.4f}" for k in ("recall@10", "ndcg@10", "recall@50", "ndcg@50")]
        print(f"| {Path(d).name} | " + " | ".join(cells) +
              f" | {r.get('best_epoch')} | {r.get('epochs_run')} | {r.get('world_size')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
