"""Time the exact SSL losses (intra + every inter task, forward and backward) per training step of
two checkouts, interleaved in one session (A, B, A, B, ...).

    .venv/bin/python tools/bench_ssl.py --a /tmp/nce-old --b . --data cache/beibei \\
        [--data cache/taobao_mbcgcn] [--rounds 3] [--batch-size 2048] [--steps 3] \\
        [--set model.n_layers=2 ...]

Per round, dataset and checkout it runs a child process of one thread with ``PYTHONPATH`` set to
that checkout (so it imports its own ``mbssl_dist``). The child builds the trainer pieces the way
``tools/profile_step.py`` does (random false-negative tables included), runs one propagation
forward per batch to get the loss inputs, then times, per step, exactly the SSL calls of
``TrainStep.losses`` (``intra_loss`` and ``inter_loss`` per auxiliary behavior, with the batch's
anchors and false negatives) plus one ``torch.autograd.grad`` per task into the propagation
outputs (what ``TrainStep.task_grads`` does for them). The first step is warm-up. Prints every
measurement with the load average, the median ratio A / B per dataset (> 1: B is faster) and the
largest relative difference of the SSL loss values between the checkouts (same inputs).

``--floor`` (one checkout, ``--b``; no ``--a``) instead sets the SSL step beside its floor on this
CPU: the same step's InfoNCE sweeps, recorded by shape (anchors A x candidates C x d), timed as
bare float32 operations that any exact implementation must do: one A x C logits GEMM, one exp
over them, and the two GEMMs of the gradient (E @ zc and Eᵀ @ za). Prints the SSL step, the floor
and their ratio (1.0 = nothing left but those operations), with the GEMMs' GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    import torch

    sys.path.insert(0, str(Path(args.tree) / "tools"))
    from profile_step import build

    torch.set_num_threads(1)
    cfg, ds, part, model, step, adjs, views, batch = build(args.data[0], args.batch_size, args.set, "random", 10, 1)
    m, lo = step.model, step.loss
    K, n_u = m.n_behaviors, m.n_users
    shapes: list[tuple[int, int, int]] = []
    timing = [False]  # record the sweeps of the timed SSL calls only (not those inside step.forward)
    if args.floor:
        from mbssl_dist.training import losses as L

        for cls in (L._LogDenSum, L._ExpSum):
            def rec(*a, _orig=cls.apply):
                if timing[0]:
                    shapes.append((a[0].shape[0], a[1].shape[0], a[0].shape[1]))
                return _orig(*a)
            cls.apply = rec
    times, losses = [], []
    for s in range(1 + args.steps):
        b = batch(s)
        _, fw = step.forward(b, adjs, views, torch.Generator().manual_seed(s))
        users, items, vs = fw.users, fw.items, fw.view_out
        leaves = [users, items] + list(vs)
        t0 = time.perf_counter()
        timing[0] = s == 1
        tasks = []
        if lo.use_intra:
            v1, v2 = vs
            tasks.append(step.intra_loss(v1[:n_u], v2[:n_u], b.user_anchors, v1[n_u:], v2[n_u:], b.item_anchors,
                                         step.comm, m.user_ids, lo.intra_weight))
        if lo.use_inter:
            for k in range(K - 1):
                tasks.append(step.inter_loss(users[:, K - 1], users[:, k], b.user_anchors, items[:, K - 1],
                                             items[:, k], b.item_anchors, step.comm, m.user_ids, lo.inter_weight))
        for i, t in enumerate(tasks):
            torch.autograd.grad(t, leaves, retain_graph=i < len(tasks) - 1, allow_unused=True)
        dt = time.perf_counter() - t0
        timing[0] = False
        if s >= 1:
            times.append(dt)
            losses.append([float(t) for t in tasks])
    out = {"ssl_step_s": statistics.mean(times), "min_s": min(times), "losses": losses,
           "threads": torch.get_num_threads()}
    if args.floor:
        out.update(floor(shapes))
    print(json.dumps(out))


def floor(shapes: list[tuple[int, int, int]]) -> dict:
    """Seconds of the bare float32 operations of the recorded InfoNCE sweeps (best of 3 each)."""
    import torch

    def best(f) -> float:
        f()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    total = gemm = flops = 0.0
    for A, C, d in shapes:
        za, zc = torch.randn(A, d), torch.randn(C, d)
        E = torch.empty(A, C)
        t_fwd = best(lambda: torch.mm(za, zc.T, out=E))
        t_exp = best(lambda: torch.mm(za, zc.T, out=E).mul_(1e-3).exp_()) - t_fwd
        ga, gc = torch.empty(A, d), torch.empty(C, d)
        t_bwd = best(lambda: (torch.mm(E, zc, out=ga), torch.mm(E.T, za, out=gc)))
        total += t_fwd + t_exp + t_bwd
        gemm += t_fwd + t_bwd
        flops += 3 * 2.0 * A * C * d
    return {"floor_s": total, "gemm_gflops": flops / max(gemm, 1e-12) / 1e9,
            "sweeps": [list(x) for x in shapes]}


def run_child(tree: str, data: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", tree, "--data", data,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps)] + (["--floor"] if args.floor else [])
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child in {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", help="checkout A (e.g. a worktree of main)")
    ap.add_argument("--b", default=".", help="checkout B (default: this one)")
    ap.add_argument("--data", action="append", required=True, help="prepared dataset directory (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--floor", action="store_true", help="one checkout (--b): the SSL step beside its float32 floor")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    from mbssl_dist.data.dataset import MANIFEST

    for d in args.data:  # before any child starts: a wrong path is one line, exit 2
        if not (Path(d) / MANIFEST).is_file():
            ap.error(f"--data {d}: not a prepared dataset directory (no {MANIFEST}); "
                     f"run `python -m mbssl_dist.data prepare` first")
    if args.floor:
        return floor_main(args)
    if not args.a:
        ap.error("--a is required (or --floor)")
    trees = {"A": str(Path(args.a).resolve()), "B": str(Path(args.b).resolve())}
    data = [str(Path(d).resolve()) for d in args.data]
    print(f"A = {trees['A']}\nB = {trees['B']}\nbatch {args.batch_size}, sets {args.set}, 1 thread, "
          f"{args.steps} timed steps per child")
    res: dict = {(d, k): [] for d in data for k in trees}
    for r in range(args.rounds):
        for d in data:
            for k in ("A", "B"):
                out = run_child(trees[k], d, args)
                res[(d, k)].append(out)
                print(f"round {r} {Path(d).name:16s} {k}: SSL {out['ssl_step_s']:.3f} s/step "
                      f"(min {out['min_s']:.3f})  load {os.getloadavg()[0]:.2f}", flush=True)
    print()
    for d in data:
        a = [x["ssl_step_s"] for x in res[(d, "A")]]
        b = [x["ssl_step_s"] for x in res[(d, "B")]]
        ratios = [x / y for x, y in zip(a, b)]
        la, lb = res[(d, "A")][0]["losses"], res[(d, "B")][0]["losses"]
        rel = max(abs(x - y) / max(abs(x), 1e-30) for ra, rb in zip(la, lb) for x, y in zip(ra, rb))
        print(f"{Path(d).name}: A {statistics.median(a):.3f} s, B {statistics.median(b):.3f} s, "
              f"A/B per round {' '.join(f'{x:.2f}' for x in ratios)}, median {statistics.median(ratios):.2f}x; "
              f"max rel. loss difference {rel:.2e}")
    print(f"load average: {os.getloadavg()}")
    return 0


def floor_main(args) -> int:
    tree = str(Path(args.b).resolve())
    print(f"tree {tree}, batch {args.batch_size}, sets {args.set}, 1 thread, {args.steps} timed steps per child")
    for r in range(args.rounds):
        for d in args.data:
            out = run_child(tree, str(Path(d).resolve()), args)
            print(f"round {r} {Path(d).name:16s}: SSL {out['ssl_step_s']:.3f} s/step, floor {out['floor_s']:.3f} s "
                  f"({len(out['sweeps'])} sweeps {out['sweeps']}), SSL / floor {out['ssl_step_s'] / out['floor_s']:.2f}, "
                  f"GEMMs {out['gemm_gflops']:.1f} GFLOP/s, load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
