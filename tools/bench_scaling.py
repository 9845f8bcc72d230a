"""Epoch cost vs graph size, exact vs sampled InfoNCE negatives (issue #14 item 3).

    .venv/bin/python tools/bench_scaling.py [--users 20000 40000 80000 160000] [--batch-size 1024 | 0] \
        [--steps 2] [--threads 1] [--set loss.n_negatives=4096 ...]

``--batch-size 0`` sizes each graph's batch like ``train.batch_size = 0`` (the built-in default:
ceil(|U| / 16) rounded to 128, within 128-4096), so an epoch has ~16 steps until the 4096 cap
(65,536 users) and the batch grows with |U|.

Data: the synthetic generator (``mbssl_dist/data/synthetic.py``) at ``--base-users`` users
(items = 0.75 x users, one cluster per 2,000 users, ``noise = 0``), then each size is that
graph tiled as |U| / base disjoint copies (user and item ids offset per copy): the same
density per node (degree distribution) at every size, prepared in linear time (the generator
itself costs ~75 s per 20k users here). Prepared once under ``--cache``.

Per (size, mode), interleaved (exact, sampled, exact, sampled ... over the sizes), a fresh
subprocess builds the trainer pieces like ``tools/bench_train.py`` (random false-negative tables
of 10 per node), runs 1 untimed step and ``--steps`` timed steps and reports the mean step
time, the part of it spent in the InfoNCE losses (their forward, plus the autograd of all task losses
from TrainStep.timings, where the small rec part is included), the epoch time EXTRAPOLATED as
views + ceil(|U| / batch) x mean step, and peak RSS. Printed: a table and the least-squares
growth exponent of each column in |U| (time ~ |U|^k). Note: every step also runs one
full-graph propagation, O(|E|) = O(|U|) per step at a fixed degree, so at a fixed batch size
the epoch is O(|U|^2) in either mode; the sampled mode removes the O(|U|) InfoNCE term per step
(its SSL time per step is flat at a fixed batch). With ``--batch-size 0`` the steps per epoch
stay ~16, so the propagation costs O(|U|) per epoch, and what grows faster is the loss: exact
O(batch x (|U| + |I|)) per step, sampled O(batch x (N + batch)) (the in-batch candidates), and
``sampled-own`` (``loss.in_batch_negatives = false``: each anchor's own positive plus the N
sampled) O(batch x N).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SSL_PHASES = ("loss/intra", "loss/inter_0", "loss/inter_1", "loss/inter_2", "bwd/losses")
MODES = {"all": ("all", "true"), "sampled": ("sampled", "true"), "sampled-own": ("sampled", "false")}
"""--modes: (loss.negatives, loss.in_batch_negatives)."""


def base_dataset(cache: Path, n_users: int) -> Path:
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    out = cache / f"syn-{n_users}"
    if not (out / "manifest.json").exists():
        spec = SyntheticSpec(n_users=n_users, n_items=n_users * 3 // 4, n_clusters=max(1, n_users // 2000),
                             noise=0.0, seed=1)
        t0 = time.perf_counter()
        prepare_synthetic(out, spec, overwrite=True)
        print(f"generated {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def prepare(cache: Path, base: Path, n_users: int) -> Path:
    """``n_users / base users`` disjoint copies of the base synthetic graph (ids offset per copy):
    the same degree distribution at every size, in linear time."""
    import dataclasses

    import numpy as np

    from mbssl_dist.data import load_prepared
    from mbssl_dist.data.dataset import write_prepared

    b = load_prepared(base)
    if n_users == b.n_users:
        return base
    c = n_users // b.n_users
    if c * b.n_users != n_users:
        raise SystemExit(f"--users {n_users}: must be a multiple of --base-users {b.n_users}")
    out = cache / f"tile-{b.n_users}x{c}"
    if (out / "manifest.json").exists():
        return out

    def tile(x, n):
        return np.concatenate([x + r * n for r in range(c)]).astype(x.dtype)

    ds = dataclasses.replace(
        b, n_users=b.n_users * c, n_items=b.n_items * c, train_user=tile(b.train_user, b.n_users),
        train_item=tile(b.train_item, b.n_items), train_behavior=np.tile(b.train_behavior, c),
        valid_user=tile(b.valid_user, b.n_users), valid_item=tile(b.valid_item, b.n_items),
        test_user=tile(b.test_user, b.n_users), test_item=tile(b.test_item, b.n_items),
        manifest=dict(b.manifest, tiled={"base": str(base), "copies": c}), path=None)
    out.mkdir(parents=True, exist_ok=True)
    write_prepared(out, ds)
    return out


def child(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    from profile_step import build
    from mbssl_dist.parallel.comm import LocalComm
    from mbssl_dist.parallel.layout import target_views

    negatives, in_batch = MODES[args.mode]
    sets = list(args.set) + [f'loss.negatives="{negatives}"', f"loss.in_batch_negatives={in_batch}"]
    cfg, ds, part, model, step, adjs, views, batch = build(args.data, args.batch_size, sets, "random", 10,
                                                           args.threads)
    t0 = time.perf_counter()
    if cfg.loss.use_intra:
        views = target_views(part, cfg.loss.intra_view, cfg.loss.intra_dropout, cfg.train.seed, 1, LocalComm(),
                             cfg.model.norm, torch.float32, "cpu")
    t_views = time.perf_counter() - t0
    step(batch(0), adjs, views)
    times, ssl, phases = [], [], {}
    for s in range(args.steps):
        step.timings = {}
        t0 = time.perf_counter()
        step(batch(1 + s), adjs, views)
        times.append(time.perf_counter() - t0)
        ssl.append(sum(v for k, v in step.timings.items() if k in SSL_PHASES))
        for k, v in step.timings.items():
            phases[k] = phases.get(k, 0.0) + v / args.steps
    n_batches = math.ceil(ds.n_users / args.batch_size)  # the parent resolved --batch-size 0
    mean = sum(times) / len(times)
    print(json.dumps({"users": ds.n_users, "items": ds.n_items, "edges": int(len(ds.train_user)),
                      "batch": args.batch_size, "steps_per_epoch": n_batches, "step_s": mean,
                      "ssl_s": sum(ssl) / len(ssl),
                      "epoch_s": t_views + n_batches * mean, "phases": {k: round(v, 3) for k, v in phases.items()},
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def slope(xs, ys) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", nargs="+", type=int, default=[20000, 40000, 80000, 160000])
    ap.add_argument("--base-users", type=int, default=20000, help="users of the generated graph that is tiled")
    ap.add_argument("--batch-size", type=int, default=1024, help="0: per size, the train.batch_size = 0 rule")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration (extrapolated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["all", "sampled"], choices=list(MODES),
                    help="sampled-own: sampled without in-batch candidates (loss.in_batch_negatives = false)")
    ap.add_argument("--cache", default="/tmp/mbssl_scaling")
    ap.add_argument("--exact-max-users", type=int, default=0,
                    help="skip the exact mode above this many users (its step grows with |U|); 0 = never")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--from-log", help="only print the summary of the table rows of a previous run's output")
    args = ap.parse_args(argv)
    if args.from_log:
        summarize(from_log(args.from_log))
        return 0
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, str(ROOT))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if args.batch_size < 0:
        ap.error(f"--batch-size must be >= 0 (0 = auto), got {args.batch_size}")
    from mbssl_dist.config import auto_batch_size

    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, batch {args.batch_size or 'auto'}, "
          f"threads {args.threads}, sets {args.set}", flush=True)
    base = base_dataset(cache, args.base_users)
    data = {u: prepare(cache, base, u) for u in args.users}
    res: dict[str, list[dict]] = {m: [] for m in args.modes}
    print(f"{'users':>8s} {'items':>8s} {'edges':>9s} {'mode':>8s} {'s/step':>8s} {'SSL s/step':>10s} "
          f"{'s/epoch':>9s} {'peak RSS':>9s} load", flush=True)
    for u in args.users:
        for mode in args.modes:  # interleaved per size
            if mode == "all" and args.exact_max_users and u > args.exact_max_users:
                print(f"{u:>8d} {'':>8s} {'':>9s} {mode:>8s} skipped (--exact-max-users {args.exact_max_users})")
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data[u]), "--mode", mode,
                   "--batch-size", str(auto_batch_size(args.batch_size, u)), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            for s in args.set:
                cmd += ["--set", s]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                print(f"{u:>8d} {mode:>8s} FAILED rc={r.returncode}\n{r.stderr[-2000:]}", flush=True)
                continue
            x = json.loads(r.stdout.strip().splitlines()[-1])
            res[mode].append(x)
            print(f"{x['users']:>8d} {x['items']:>8d} {x['edges']:>9d} {mode:>8s} {x['step_s']:>8.2f} "
                  f"{x['ssl_s']:>10.2f} {x['epoch_s']:>9.1f} {x['maxrss_mib']:>7.0f}MB {os.getloadavg()[0]:.2f} "
                  f"batch={x['batch']}x{x['steps_per_epoch']}  phases/step {x['phases']}", flush=True)
    summarize(res)
    print(f"load average {os.getloadavg()}")
    return 0


def from_log(path: str) -> dict[str, list[dict]]:
    """The rows a previous run printed (its table lines), for --from-log."""
    import ast

    res: dict[str, list[dict]] = {}
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) > 9 and f[3] in MODES and "phases/step" in line:
            ph = ast.literal_eval(line.split("phases/step ", 1)[1])
            u = int(f[0])
            b = next((int(t[6:].split("x")[0]) for t in f if t.startswith("batch=")), 1024)  # older logs: 1024
            res.setdefault(f[3], []).append({"users": u, "step_s": float(f[4]), "ssl_s": float(f[5]),
                                             "epoch_s": float(f[6]), "maxrss_mib": float(f[7][:-2]), "phases": ph,
                                             "batch": b, "steps_per_epoch": math.ceil(u / b)})
    return res


def summarize(res: dict[str, list[dict]]) -> None:
    for mode, rows in res.items():
        if len(rows) >= 2:
            us = [x["users"] for x in rows]
            fwd = [sum(v for k, v in x["phases"].items() if k.startswith("loss/") and k != "loss/rec") for x in rows]
            print(f"growth exponent ({mode}): InfoNCE forward per step ~ |U|^{slope(us, fwd):.2f} "
                  f"({' '.join(f'{v:.3f}s' for v in fwd)})")
    for mode, rows in res.items():
        if len(rows) >= 2:
            us = [x["users"] for x in rows]
            print(f"growth exponent ({mode}): epoch ~ |U|^{slope(us, [x['epoch_s'] for x in rows]):.2f}, "
                  f"step ~ |U|^{slope(us, [x['step_s'] for x in rows]):.2f}, "
                  f"SSL per step ~ |U|^{slope(us, [x['ssl_s'] for x in rows]):.2f}, "
                  f"SSL per epoch ~ |U|^{slope(us, [x['ssl_s'] * x['steps_per_epoch'] for x in rows]):.2f}, "
                  f"peak RSS ~ |U|^{slope(us, [x['maxrss_mib'] for x in rows]):.2f}")
    names = list(res)
    for i, ma in enumerate(names):
        for mb in names[i + 1:]:
            for a, b in zip(res[ma], res[mb]):  # the sizes both modes ran
                print(f"|U| = {a['users']}: {ma} / {mb} epoch time {a['epoch_s'] / b['epoch_s']:.2f}x, "
                      f"SSL per step {a['ssl_s'] / b['ssl_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
