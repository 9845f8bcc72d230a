"""Training throughput benchmark: seconds per epoch and peak RSS of the MBSSL training step.

    .venv/bin/python tools/bench_train.py            # pv-less Beibei + Taobao_MBCGCN, batch 256/2048/4096, 1 thread
    .venv/bin/python tools/bench_train.py --data /tmp/prep/Beibei --batch-size 256 4096 --steps 4 \
        [--threads 1] [--full-epoch] [--set loss.use_inter=false ...]

Every (dataset, batch size) runs in a fresh subprocess (so ``ru_maxrss`` is that
configuration's own peak). A child builds the trainer pieces like ``mbssl_dist.train`` (single
process; random false-negative tables of 10 per node stand in for swing's), draws the epoch's
two views (timed), runs ``--warmup`` untimed steps, then ``--steps`` timed steps over
consecutive batches of the epoch's permutation (batch construction included). Unless
``--full-epoch`` is given, seconds/epoch is EXTRAPOLATED: views + ceil(n_users / batch) x mean
step time. Note the load average: other processes share the machine (with load > 1 use one
torch thread; compare variants within one run).

Against the authors' code: no fixed reference figure (their epoch took 437-1221 s on one machine
and 555 s on another); ``tools/bench_vs_authors.py`` runs this benchmark and their loop
interleaved in one session. Its run of 2026-12-02 (pv-less Beibei, 1 thread, 1 warm-up + 4
timed steps per side, both extrapolated, load 1.4-5.6, README "Speed"): equal model and batch
(L=2, 256) 4.0-6.1x; equal model at our batch 2048 21.1-22.6x; our recipe (L=2, 2048, HMG r=1)
vs their default (L=4, 256) 37.8-56.0x; peak RSS 1.4-1.5 GB vs 9.4-10.5 GB.

What one epoch does: ceil(n_users / batch) steps over a permutation of all users; every step
is a complete MBSSL step of the reference model (K-behavior propagation with CDM and message
dropout, non-sampling rec loss, intra- and inter-behavior InfoNCE with false-negative removal,
HMG over the per-task gradients, Adam). Why it is cheaper than the authors' code:

* one full-graph propagation per step, shared by all tasks; the per-task gradients
  (rec, intra, inter_k, plus the decay term) come from ONE hand-written batched reverse pass
  (``model/propagation.py``) with the task cotangents stacked as [K, N, T, d]: each SpMM runs once over
  T·d columns and each matmul once over N·T rows (the authors back-propagate the graph once per
  task), with all large stacks in a reused workspace (no page faults) and the SpMMs writing
  straight into it (scipy's kernel accumulating onto the readout cotangent);
* intra views propagate the target behavior only (the auxiliary h_j and their attention
  logits come from the main propagation; ``loss.view_propagation = "target"``), the authors
  propagate all behaviors twice more;
* InfoNCE over unique anchors with multiplicity weights (the authors repeat a user once per
  purchased item: P x n_users logits instead of B x n_users), in row chunks (no A x C matrix
  is kept), and where the candidates are held locally the log-denominator and its gradient are
  ONE sweep (per chunk: logits, exp, row sum, two matmuls; nothing recomputed in the backward);
* the non-sampling loss in its O((B + |I|)·d²) Gram form; batch size is a legitimate lever
  since the per-step cost is dominated by full-graph work (the epoch's InfoNCE work is about
  batch-independent), so large batches cut the number of full propagations per epoch.
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


def child(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    from profile_step import build
    from mbssl_dist.parallel.comm import LocalComm
    from mbssl_dist.parallel.layout import target_views

    cfg, ds, part, model, step, adjs, views, batch = build(args.data, args.batch_size, args.set, "random", 10,
                                                           args.threads)
    if args.autograd:
        from tests.autograd_model import autograd_step

        step = autograd_step(step)
    t0 = time.perf_counter()
    if cfg.loss.use_intra:
        views = target_views(part, cfg.loss.intra_view, cfg.loss.intra_dropout, cfg.train.seed, 1, LocalComm(),
                             cfg.model.norm, torch.float32, "cpu")
    t_views = time.perf_counter() - t0
    n_batches = math.ceil(ds.n_users / args.batch_size)
    for s in range(args.warmup):
        step(batch(s), adjs, views)
    n = n_batches if args.full_epoch else args.steps
    times = []
    for s in range(n):
        t0 = time.perf_counter()
        step(batch(args.warmup + s), adjs, views)
        times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    epoch = t_views + (sum(times) if args.full_epoch else n_batches * mean)
    print(json.dumps({"users": ds.n_users, "items": ds.n_items, "behaviors": ds.behaviors, "steps_per_epoch": n_batches,
                      "timed_steps": n, "step_mean_s": mean, "step_min_s": min(times), "views_s": t_views,
                      "epoch_s": epoch, "extrapolated": not args.full_epoch, "threads": torch.get_num_threads(),
                      "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["/tmp/prep/Beibei", "/tmp/prep/Taobao_MBCGCN"],
                    help="prepared dataset directories")
    ap.add_argument("--batch-size", nargs="+", type=int, default=[256, 2048, 4096])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration (extrapolated)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--full-epoch", action="store_true", help="time a whole epoch instead of extrapolating")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--autograd", action="store_true", help="reference path: one autograd backward per task")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.data = args.data[0]
        args.batch_size = args.batch_size[0]
        child(args)
        return 0
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs")
    print(f"{'dataset':<16s} {'batch':>6s} {'steps/ep':>8s} {'s/step':>8s} {'s/epoch':>9s} {'peak RSS':>9s}")
    for data in args.data:
        for bs in args.batch_size:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", data, "--batch-size", str(bs),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            cmd += ["--full-epoch"] if args.full_epoch else []
            cmd += ["--autograd"] if args.autograd else []
            for s in args.set:
                cmd += ["--set", s]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                print(f"{Path(data).name:<16s} {bs:>6d}  FAILED rc={r.returncode}\n{r.stderr[-2000:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            name = Path(data).name
            label = "extrapolated" if res["extrapolated"] else "full epoch"
            print(f"{name:<16s} {bs:>6d} {res['steps_per_epoch']:>8d} {res['step_mean_s']:>8.2f} "
                  f"{res['epoch_s']:>9.1f} {res['maxrss_mib']:>7.0f}MB  {label}, views {res['views_s']:.2f}s, "
                  f"threads {res['threads']}, load {os.getloadavg()[0]:.2f}")
            sys.stdout.flush()
    print(f"load average {os.getloadavg()}; against the authors' code: tools/bench_vs_authors.py (same session)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
