"""Per-phase time breakdown of one MBSSL training step on a prepared dataset.

    .venv/bin/python tools/profile_step.py --data /tmp/prep/Beibei [--batch-size 256] [--steps 3]
        [--set loss.use_inter=false ...] [--fn random|none] [--threads N]

Builds the trainer pieces the way ``mbssl_dist.train`` does (single process, ``LocalComm``):
prepared data -> local part -> normalized adjacencies -> MBSSL -> TrainStep, the epoch's two
target views, and batches of random users. False negatives: ``random`` (default) attaches a
random table of ``--fn-n`` (10) neighbors per user and item, so their cost is included (the
real ones come from swing); ``none`` leaves them out.

Phases are recorded by ``TrainStep.timings`` (fwd/main, fwd/views, loss/*, bwd/*, hmg, adam);
the first ``--warmup`` steps are not counted. Prints the per-step mean of every phase and the
load average (other processes share this machine: compare variants within one run).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_fn_table(n_rows: int, n_cand: int, per_row: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    indptr = torch.arange(n_rows + 1, dtype=torch.int64) * per_row
    indices = torch.randint(0, n_cand, (n_rows * per_row,), generator=g, dtype=torch.int64)
    return indptr, indices


def build(data: str, batch_size: int, sets: list[str], fn: str = "random", fn_n: int = 10, threads: int = 0,
          seed: int = 2020):
    """Everything one training step needs: (cfg, ds, part, model, step, adjs, views, batches)."""
    from mbssl_dist.config import load_config
    from mbssl_dist.data import load_prepared
    from mbssl_dist.model import MBSSL
    from mbssl_dist.parallel.comm import LocalComm
    from mbssl_dist.parallel.layout import shard_users, target_views
    from mbssl_dist.training import TrainStep, build_batch
    from mbssl_dist.utils.seeding import make_generator

    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(None, [f"train.batch_size={batch_size}", f"train.seed={seed}"] + list(sets))
    if cfg.train.keep_freed_memory:  # as the trainer does
        from mbssl_dist.utils.allocator import keep_freed_memory

        keep_freed_memory()
    comm = LocalComm()
    ds = load_prepared(data)
    K = ds.n_behaviors
    part = shard_users(ds, comm, "edge-balanced", "", seed)
    dtype = torch.float32
    adjs = [part.graph.adjacency(k, cfg.model.norm, dtype, "cpu") for k in range(K)]
    csr = [(g.indptr, g.indices) for g in part.graph.graphs]
    m = cfg.model
    model = MBSSL(part.n_local, ds.n_items, K, dim=m.dim, n_layers=m.n_layers, att_dim=m.att_dim,
                  dropout=m.dropout, use_cdm=m.use_cdm, interaction_scoring=m.interaction_scoring,
                  n_users_global=ds.n_users, user_ids=torch.from_numpy(part.users),
                  init_generator=make_generator(seed, 0, 0, "init"))
    step = TrainStep(model, cfg.loss, cfg.hmg, cfg.train, comm)
    views = None
    if cfg.loss.use_intra:
        views = target_views(part, cfg.loss.intra_view, cfg.loss.intra_dropout, seed, 0, comm, m.norm, dtype, "cpu")
    user_fn = item_fn = None
    if fn == "random" and cfg.loss.use_inter:
        user_fn = random_fn_table(part.n_local, ds.n_users, fn_n, 1)
        item_fn = random_fn_table(ds.n_items, ds.n_items, fn_n, 2)
    perm = torch.randperm(ds.n_users, generator=make_generator(seed, 0, -1, "batches")).numpy()
    user_ids = torch.from_numpy(part.users)

    def batch(b: int):
        gb = perm[(b * batch_size) % ds.n_users:][:batch_size]
        local = part.global_to_local[gb]
        rows = torch.from_numpy(np.sort(local[local >= 0]))
        return build_batch(csr, rows, ds.n_items, user_ids=user_ids, user_fn=user_fn, item_fn=item_fn,
                           interaction=m.interaction_scoring)

    return cfg, ds, part, model, step, adjs, views, batch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--fn", choices=["random", "none"], default="random")
    ap.add_argument("--fn-n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--autograd", action="store_true",
                    help="the test oracle: one autograd backward per task (tests/autograd_model.py)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg, ds, part, model, step, adjs, views, batch = build(args.data, args.batch_size, args.set, args.fn, args.fn_n,
                                                           args.threads)
    t_setup = time.perf_counter() - t0
    if args.autograd:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.autograd_model import autograd_step

        step = autograd_step(step)
    print(f"data {args.data}: {ds.n_users} users x {ds.n_items} items, behaviors {ds.behaviors}, "
          f"train {ds.counts()}; setup {t_setup:.1f}s; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, tasks {step.tasks}, "
          f"path {'autograd per task' if args.autograd else 'batched reverse pass'}")
    print(f"load average before: {os.getloadavg()}")
    totals: dict[str, float] = {}
    walls = []
    t_batch = 0.0
    for s in range(args.warmup + args.steps):
        tb = time.perf_counter()
        b = batch(s)
        tb = time.perf_counter() - tb
        step.timings = {}
        tw = time.perf_counter()
        res = step(b, adjs, views)
        tw = time.perf_counter() - tw
        if s >= args.warmup:
            walls.append(tw)
            t_batch += tb
            for k, v in step.timings.items():
                totals[k] = totals.get(k, 0.0) + v
        print(f"step {s}{' (warmup)' if s < args.warmup else ''}: {tw:.3f}s  losses "
              + " ".join(f"{k}={v:.5g}" for k, v in res.losses.items()))
    n = max(len(walls), 1)
    print(f"\nper-step mean over {len(walls)} steps (batch {args.batch_size}):")
    print(f"  {'build_batch':<14s} {t_batch / n:8.3f}s")
    for k, v in totals.items():
        print(f"  {k:<14s} {v / n:8.3f}s  {100 * v / max(sum(walls), 1e-12):5.1f}%")
    acc = sum(totals.values()) / n
    print(f"  {'(sum phases)':<14s} {acc:8.3f}s")
    print(f"  {'step wall':<14s} {sum(walls) / n:8.3f}s  (min {min(walls) if walls else 0:.3f}s)")
    steps_epoch = -(-ds.n_users // args.batch_size)
    print(f"  => {steps_epoch} steps/epoch, ~{steps_epoch * (sum(walls) / n + t_batch / n):.1f}s/epoch (extrapolated)")
    print(f"load average after: {os.getloadavg()}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
