"""Per-epoch test (and valid) metric of several runs side by side, from runs/NAME/metrics.jsonl,
with each run's relative difference to the first (the reference).

    .venv/bin/python tools/quality_curves.py runs/q_exact runs/q_sampled_u2048 [--metric recall@10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def curve(run: Path, kind: str, metric: str) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == kind and metric in r:
            out[int(r["epoch"])] = float(r[metric])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    ap.add_argument("--metric", default="recall@10")
    ap.add_argument("--kind", default="test", choices=["test", "valid"])
    args = ap.parse_args(argv)
    for r in args.runs:
        if not (r / "metrics.jsonl").is_file():
            print(f"error: {r}/metrics.jsonl not found", file=sys.stderr)
            return 2
    curves = [curve(r, args.kind, args.metric) for r in args.runs]
    epochs = sorted(set().union(*curves))
    print(f"{args.kind} {args.metric} per epoch; (x%) = relative to {args.runs[0].name}")
    print("epoch  " + "  ".join(f"{r.name:>24s}" for r in args.runs))
    for e in epochs:
        ref = curves[0].get(e)
        cells = []
        for c in curves:
            v = c.get(e)
            if v is None:
                cells.append(f"{'-':>24s}")
            elif ref and c is not curves[0]:
                cells.append(f"{v:.4f} ({100 * (v / ref - 1):+6.1f}%)".rjust(24))
            else:
                cells.append(f"{v:>24.4f}")
        print(f"{e:>5d}  " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
