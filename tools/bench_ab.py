"""A/B speed of two checkouts of this repository, interleaved in one session (A, B, A, B, ...).

    .venv/bin/python tools/bench_ab.py --a /path/to/old/checkout --b . --data cache/<prepared dir> \
        [--rounds 3] [--batch-size 1024] [--steps 3] [--ranks 2]

Per round and checkout it runs that checkout's own ``tools/bench_train.py`` child (one process,
one thread: seconds per training step, batch construction included) and its own
``tools/bench_dist.py`` worker under ``torch.distributed.run`` with ``--ranks`` processes of one
thread (seconds per step and per propagation forward + reverse), each with ``PYTHONPATH`` set to
that checkout so it imports its own package. Prints every measurement with the load average and
the median ratio B / A per figure (< 1: B is faster). Machines differ; only the ratio from one
run means something.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _last_json(text: str) -> dict:
    return json.loads([x for x in text.splitlines() if x.startswith("{")][-1])


def run_train(tree: Path, args) -> dict:
    cmd = [sys.executable, str(tree / "tools" / "bench_train.py"), "--child", "--data", args.data, "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--warmup", "1", "--threads", "1"]
    for s in args.set:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench_train in {tree} failed:\n{r.stderr[-3000:]}")
    return {"train_step_s": _last_json(r.stdout)["step_mean_s"]}


def run_dist(tree: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as td:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks),
               "--log-dir", td, str(tree / "tools" / "bench_dist.py"), "--worker", "--data", args.data,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--collectives", "auto",
               "--partition", "edge-balanced"]
        r = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench_dist in {tree} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    res = _last_json(r.stdout)
    return {f"dist{args.ranks}_step_s": res["step_s"], f"dist{args.ranks}_prop_s": res["prop_s"]}


def _env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, type=Path, help="checkout A (e.g. a git worktree of the old commit)")
    ap.add_argument("--b", required=True, type=Path, help="checkout B")
    ap.add_argument("--data", required=True, help="prepared dataset directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2, help="processes of the bench_dist run (0: skip it)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = ap.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    print(f"A = {trees['A']}\nB = {trees['B']}\ndata {args.data}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{args.rounds} interleaved rounds, {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for rnd in range(args.rounds):
        for name, tree in trees.items():
            res = run_train(tree, args)
            if args.ranks:
                res.update(run_dist(tree, args))
            res["load"] = os.getloadavg()[0]
            results[name].append(res)
            print(f"round {rnd} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    print(f"{'figure':<16} {'A median':>9} {'B median':>9} {'B / A':>7}")
    for k in results["A"][0]:
        if k == "load":
            continue
        a = statistics.median(r[k] for r in results["A"])
        b = statistics.median(r[k] for r in results["B"])
        print(f"{k:<16} {a:>9.3f} {b:>9.3f} {b / a:>7.3f}")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
