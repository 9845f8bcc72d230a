"""Full-ranking evaluation cost: the blocked ranking vs the dense one it replaced, interleaved.

    .venv/bin/python tools/bench_eval.py --data cache/beibei [--threads 1] [--rounds 2] [--phase test]
        [--batch-size 1024] [--block-elems 8388608] [--dim 64]

Scores come from random embeddings (users x dim @ dim x items, float32; the model's forward is
not part of this: it is the same for both), masks and held-out items are the dataset's real
ones for ``--phase``. Each variant runs in a fresh process (so ``ru_maxrss`` is its own peak):
``blocked`` = ``mbssl_dist.evaluate.evaluate_sums`` (score blocks of at most ``--block-elems``
entries), ``dense`` = ``tests/oracles.evaluate_sums_unblocked`` (the evaluator before: a dense
[batch, n_items] candidate mask and comparison per chunk). Rounds run blocked, dense, blocked,
dense, ...; prints seconds (scoring and ranking), peak RSS, whether the sums are identical, the
ratio per round and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from mbssl_dist.data import load_prepared
    from mbssl_dist.evaluate import eval_split, evaluate_sums

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_prepared(args.data)
    users, held, mask = eval_split(ds, args.phase)
    g = torch.Generator().manual_seed(0)
    U = torch.randn(ds.n_users, args.dim, generator=g)
    V = torch.randn(ds.n_items, args.dim, generator=g)
    spent = {"score_s": 0.0}

    def score(u):
        t0 = time.perf_counter()
        s = U[u] @ V.T
        spent["score_s"] += time.perf_counter() - t0
        return s

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if args.variant == "blocked":
        sums = evaluate_sums(score, users, held, mask, batch_size=args.batch_size, block_elems=args.block_elems)
    else:
        from tests.oracles import evaluate_sums_unblocked

        sums = evaluate_sums_unblocked(score, users, held, mask, batch_size=args.batch_size)
    total = time.perf_counter() - t0
    print(json.dumps({"variant": args.variant, "users": int(len(users)), "items": ds.n_items, "seconds": total,
                      "score_s": spent["score_s"], "rank_s": total - spent["score_s"],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mib": base, "sums": sums.tolist(), "threads": torch.get_num_threads()}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "cache" / "beibei"), help="prepared dataset directory")
    ap.add_argument("--phase", choices=["valid", "test"], default="test")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1024, help="users per score call (train.eval_batch_size)")
    ap.add_argument("--block-elems", type=int, default=None, help="blocked variant's bound (default EVAL_BLOCK_ELEMS)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--variant", choices=["blocked", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not (Path(args.data) / "manifest.json").is_file():
        print(f"bench_eval: --data {args.data}: not a prepared dataset (no manifest.json)", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.batch_size < 1 or (args.block_elems is not None and args.block_elems < 1):
        print("bench_eval: --rounds, --batch-size and --block-elems must be >= 1", file=sys.stderr)
        return 2
    if args.variant:
        child(args)
        return 0
    print(f"bench_eval: {args.data} phase {args.phase}, {args.threads} thread(s), batch {args.batch_size}; "
          f"load average {os.getloadavg()}")
    res = []
    for rd in range(args.rounds):
        pair = {}
        for variant in ("blocked", "dense"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--data", args.data,
                   "--phase", args.phase, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                   "--dim", str(args.dim)]
            if args.block_elems is not None:
                cmd += ["--block-elems", str(args.block_elems)]
            load = os.getloadavg()[0]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                print(f"bench_eval: {variant} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                return 2
            x = json.loads(r.stdout.strip().splitlines()[-1])
            pair[variant] = x
            print(f"round {rd + 1} {variant:<7s} users={x['users']} items={x['items']} {x['seconds']:.2f}s "
                  f"(scoring {x['score_s']:.2f}s, ranking {x['rank_s']:.2f}s) peakRSS={x['peak_rss_mib']:.0f}MiB "
                  f"(after set-up {x['rss_before_mib']:.0f}MiB) load {load:.2f}->{os.getloadavg()[0]:.2f}")
            sys.stdout.flush()
        same = pair["blocked"]["sums"] == pair["dense"]["sums"]
        ratio = pair["dense"]["rank_s"] / pair["blocked"]["rank_s"]
        res.append(ratio)
        print(f"round {rd + 1}: sums identical: {same}; ranking dense/blocked = {ratio:.2f}x; "
              f"peak RSS dense - blocked = {pair['dense']['peak_rss_mib'] - pair['blocked']['peak_rss_mib']:.0f}MiB")
        if not same:
            return 1
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
