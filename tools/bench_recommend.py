"""``recommend`` throughput and peak memory: top-K for ALL users of a dataset.

    .venv/bin/python tools/bench_recommend.py [--config configs/taobao_mbcgcn.toml] [--k 50]

Trains a throw-away model first when ``runs/<name>/model`` is missing (1 epoch of 3 steps, no
inter-SSL so no swing to compute: the figures do not depend on the model's quality), then runs
``python -m mbssl_dist.recommend --run runs/<name> --k K --out <tmp>`` in a child process and
prints wall time, users/s (all users / wall time of the whole command: load, one propagation,
scoring, top-K, Parquet), the child's peak RSS, the rows written and the load average.
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

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "taobao_mbcgcn.toml"))
    p.add_argument("--name", default="bench_recommend", help="run.name of the throw-away model")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--set", action="append", default=[], help="extra training overrides")
    a = p.parse_args()
    py = sys.executable
    run_dir = REPO / "runs" / a.name
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    if not (run_dir / "model" / "model.json").is_file():
        cmd = [py, "-m", "mbssl_dist.train", "--config", a.config, "--set", "train.epochs=1",
               "--set", "train.max_steps_per_epoch=3", "--set", "loss.use_inter=false", "--set", f'run.name="{a.name}"', "--set", "run.mlflow=false",
               "--set", "run.progress=false", "--set", f"train.threads={a.threads}",
               "--set", f'data.cache_dir="{REPO / "cache"}"', "--set", f'run.output_dir="{REPO / "runs"}"']
        for s in a.set:
            cmd += ["--set", s]
        print("training a throw-away model:", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "recs.parquet"
        cmd = [py, "-m", "mbssl_dist.recommend", "--run", str(run_dir), "--k", str(a.k), "--out", str(out),
               "--threads", str(a.threads), "--batch-size", str(a.batch_size)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        _, status, ru = os.wait4(proc.pid, 0)  # this child's own rusage (not the training's)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"recommend failed with exit code {proc.returncode}")
        rss = ru.ru_maxrss / 1024
        import pyarrow.parquet as pq

        rows = pq.read_metadata(out).num_rows
        size = out.stat().st_size
    U, I = meta["n_users"], meta["n_items"]
    load = os.getloadavg()
    print(f"recommend: {U} users x {I} items, K={a.k}, {a.threads} thread(s), batch {a.batch_size}")
    print(f"  wall {wall:.2f} s (whole command), {U / wall:.0f} users/s, peak RSS {rss:.0f} MB, "
          f"{rows} rows, {size / 2**20:.1f} MiB Parquet")
    print(f"  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
