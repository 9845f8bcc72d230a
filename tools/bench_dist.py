"""Per-step time and communication vs number of ranks (CPU, gloo).

    .venv/bin/python tools/bench_dist.py --data cache/<prepared dir> [--ranks 1,2,3,4] [--steps 4]

For each P it launches ``torch.distributed.run`` with P processes of one thread each and
measures, on rank 0, after one warm-up step:
  * seconds per training step (forward, all task backwards, HMG, Adam);
  * seconds of the propagation alone: the training step's own propagation (``Propagation``:
    forward + one reverse pass for one task) over all K behaviors;
  * bytes per step that rank 0 puts on the wire (``DistComm.bytes_sent``, counted for ring
    algorithms: all-reduce of n bytes 2(P-1)/P·n, reduce-scatter / all-gather (P-1)/P·n);
  * the analytic minimum for this algorithm, on the same ring model: every propagation layer
    must sum the item partials of all ranks and hand every rank the items of the others,
    |I|·K·d floats per layer (|I|·d per layer per intra view), i.e. 2(P-1)/P·|I|·K·d on the
    wire, forward and in the reverse pass (the main pass once per task, the views once for
    the intra task); plus one flat gradient bucket of the replicated parameters per task, plus
    the batch terms (user Gram K·d² forward and backward).
P above the number of cores is oversubscribed and labelled so. Strong-scaling efficiency of
the propagation = T_prop(1) / (P · T_prop(P)), against P = 1 with one thread.

The machine's own ceiling (``--ceiling``, default on): P independent single-process copies of
the P = 1 propagation run at the same time, with no communication at all. Their slowdown
against one copy alone is what the cores and the memory bus lose when P processes run side
by side; 1 / slowdown bounds the efficiency any layout can reach on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from mbssl_dist.config import load_config
    from mbssl_dist.data import load_prepared
    from mbssl_dist.model import Propagation
    from mbssl_dist.parallel.dist import init_distributed, shutdown
    from mbssl_dist.parallel.layout import shard_users, target_views
    from mbssl_dist.train import build_model, epoch_permutation
    from mbssl_dist.utils.seeding import make_generator

    comm, device = init_distributed("cpu", args.collectives)
    cfg = load_config(None, [f"train.batch_size={args.batch_size}", "loss.fn_users=0", "loss.fn_items=0"])
    ds = load_prepared(args.data)
    part = shard_users(ds, comm, args.partition)
    run = build_model(cfg, ds, part, comm, device)
    perm = epoch_permutation(ds.n_users, cfg.train.seed, 0)
    views = target_views(part, cfg.loss.intra_view, cfg.loss.intra_dropout, cfg.train.seed, 0, comm, cfg.model.norm)
    B = cfg.train.batch_size

    def sent():
        return getattr(comm, "bytes_sent", 0)

    t_step = bytes_step = float("nan")
    if not args.prop_only:
        run.step(run.batch(perm[:B]), run.adjs, views)  # warm-up
        comm.barrier()
        b0, t0 = sent(), time.perf_counter()
        for s in range(1, args.steps + 1):
            run.step(run.batch(perm[s * B:(s + 1) * B]), run.adjs, views)
        comm.barrier()
        t_step = (time.perf_counter() - t0) / args.steps
        bytes_step = (sent() - b0) / args.steps
    # propagation alone: the step's propagation, forward + one reverse pass (T = 1)
    model = run.model
    model.train()
    L = cfg.model.n_layers
    times = []
    for s in range(-1 if args.prop_only else 0, args.steps):  # (solo copies warm up here)
        comm.barrier()
        t1 = time.perf_counter()
        with torch.no_grad():
            rel = model.relation_layers()
            ego0 = torch.cat([model.user_embedding, model.item_embedding], 0)
            prop = Propagation(model, run.adjs, comm)
            out = prop.forward(rel[:L], ego0, make_generator(cfg.train.seed, 0, s, "dropout"))
            prop.backward(torch.ones_like(out).unsqueeze(2))
        comm.barrier()
        if s >= 0:
            times.append(time.perf_counter() - t1)
    K, d, L, I = ds.n_behaviors, cfg.model.dim, cfg.model.n_layers, ds.n_items
    n_tasks = len(run.step.tasks) + 1  # + reg
    replicated = sum(p.numel() for p, s in zip(run.step.params, run.step.sharded) if not s)
    main, views = L * I * K * d, 2 * L * I * d  # floats all-reduced by one forward pass
    # main pass: forward + one backward per task; views: forward + the intra task's backward
    P = comm.world_size
    ring = 2 * (P - 1) / P
    analytic = ring * 4 * (main * (1 + n_tasks) + views * 2 + n_tasks * replicated + 2 * K * d * d)
    if comm.rank == 0:
        print(json.dumps({"P": comm.world_size, "comm": type(comm).__name__, "step_s": t_step, "prop_s": float(np.median(times)),
                          "bytes_per_step": bytes_step, "analytic_bytes": analytic if comm.world_size > 1 else 0,
                          "users_per_rank": part.n_local, "n_items": I}), flush=True)
    shutdown(comm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared dataset directory")
    ap.add_argument("--ranks", default="1,2,3,4")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--collectives", default="auto",
                    help="comma list of dist.collectives settings to compare (auto, gloo, shm)")
    ap.add_argument("--partition", default="edge-balanced", help="user assignment (edge-balanced, range, metis)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the concurrent-copies ceiling")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole list this many times, interleaved, and report medians (2 cores are noisy)")
    ap.add_argument("--prop-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count() or 1
    rows = []
    colls = args.collectives.split(",")
    # one transport suffices at P = 1 (no collectives run)
    runs = [(P, c) for P in [int(x) for x in args.ranks.split(",")] for c in colls
            if P > 1 or c == colls[0]] * max(1, args.repeat)
    for P, coll in runs:
        env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
        with tempfile.TemporaryDirectory() as td:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(P),
                   "--log-dir", td, str(Path(__file__).resolve()), "--worker", "--data", args.data,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--collectives", coll, "--partition", args.partition]
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"P={P} failed")
        line = [x for x in r.stdout.splitlines() if x.startswith("{")][-1]
        rows.append(json.loads(line))
    # medians over the repetitions of each (P, transport)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["P"], r["comm"]), []).append(r)
    rows = []
    for g in groups.values():
        med = dict(g[0])
        for k in ("step_s", "prop_s", "bytes_per_step"):
            med[k] = float(np.median([r[k] for r in g]))
        med["n"] = len(g)
        rows.append(med)
    ceiling = {}
    if not args.no_ceiling:
        for P in sorted({r["P"] for r in rows if 1 < r["P"] <= cores}):
            env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
            env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--prop-only", "--data", args.data,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(P)]
            outs = [p.communicate() for p in procs]
            if any(p.returncode for p in procs):
                print(outs[0][1][-3000:], file=sys.stderr)
                raise SystemExit(f"ceiling run with {P} copies failed")
            ceiling[P] = max(json.loads([x for x in o.splitlines() if x.startswith("{")][-1])["prop_s"]
                             for o, _ in outs)
    base = rows[0]["prop_s"] if rows and rows[0]["P"] == 1 else None
    print(f"dataset {args.data}, partition {args.partition}, batch {args.batch_size}, {args.steps} timed steps, 1 thread per rank, {cores} cores, "
          f"medians of {max(1, args.repeat)} interleaved repetition(s)")
    print(f"{'P':>3} {'note':<16} {'comm':<9} {'users/rank':>10} {'s/step':>8} {'prop s':>8} {'MB/step':>9} "
          f"{'analytic MB':>11} {'ratio':>6} {'prop eff':>8}")
    for r in rows:
        note = "oversubscribed" if r["P"] > cores else ""
        eff = base / (r["P"] * r["prop_s"]) if base else float("nan")
        ratio = r["bytes_per_step"] / r["analytic_bytes"] if r["analytic_bytes"] else float("nan")
        print(f"{r['P']:>3} {note:<16} {r['comm']:<9} {r['users_per_rank']:>10} {r['step_s']:>8.3f} {r['prop_s']:>8.3f} "
              f"{r['bytes_per_step'] / 1e6:>9.2f} {r['analytic_bytes'] / 1e6:>11.2f} {ratio:>6.2f} {eff:>8.2f}")
    for P, t in ceiling.items():
        if base:
            print(f"machine ceiling at P={P}: {P} concurrent single-process copies take {t:.3f} s per propagation "
                  f"(alone {base:.3f} s): slowdown {t / base:.2f}x, efficiency bound {base / t:.2f}")


if __name__ == "__main__":
    main()
