"""Checkpoint benchmark: size, save and load time, and the per-epoch overhead of
``checkpoint.every_epochs = 1``, at P = 1 and P = 2, with the real trainer.

    .venv/bin/python tools/bench_checkpoint.py [--config configs/taobao_mbcgcn.toml] [--ranks 1 2] [--steps 4]

For each P: one run of ``mbssl_dist.train`` with ``train.max_steps_per_epoch = STEPS`` and
2 epochs (a checkpoint after each), then a resumed run to 3 epochs (one load). Figures come
from the runs' own ``timings.jsonl`` (``kind = checkpoint / resume / epoch``). The overhead is
the checkpoint time over a FULL epoch's time, the latter EXTRAPOLATED as the truncated epoch's
seconds x ceil(n_users / batch) / STEPS (evaluation excluded). Prints the load average:
compare figures of one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict) -> None:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/taobao_mbcgcn.toml")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=4, help="training steps per (truncated) epoch")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()
    py = sys.executable
    out = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    rows = []
    try:
        for P in args.ranks:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // P))
            name = f"ckpt_p{P}"
            sets = ["run.mlflow=false", "run.progress=false", f'run.output_dir="{out}"', f'run.name="{name}"',
                    f"train.max_steps_per_epoch={args.steps}", "train.eval_every=100", *args.set]
            flags = [x for s in sets for x in ("--set", s)]
            launch = [py, "-m", "mbssl_dist.train"] if P == 1 else \
                [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(P), "-m", "mbssl_dist.train"]
            run(launch + ["--config", args.config, *flags, "--set", "train.epochs=2"], env)
            run(launch + ["--config", args.config, *flags, "--set", "train.epochs=3"], env)
            t = [json.loads(x) for x in (out / name / "timings.jsonl").read_text().splitlines()]
            cfg = (out / name / "config.toml").read_text()
            ck = [r for r in t if r["kind"] == "checkpoint"]
            ep = [r for r in t if r["kind"] == "epoch"]
            load = [r for r in t if r["kind"] == "resume"]
            final = json.loads((out / name / "final.json").read_text())
            manifest = json.loads((Path(final["dataset"]) / "manifest.json").read_text()) \
                if Path(final["dataset"]).is_absolute() else json.loads((ROOT / final["dataset"] / "manifest.json").read_text())
            batch = int(next(line.split("=")[1] for line in cfg.splitlines() if line.startswith("batch_size")))
            steps_full = math.ceil(manifest["n_users"] / batch)
            epoch_s = sorted(r["seconds"] for r in ep)[len(ep) // 2] * steps_full / args.steps
            save_s = sorted(r["seconds"] for r in ck)[len(ck) // 2]
            rows.append((P, ck[-1]["bytes"] / 1e6, save_s, load[0]["seconds"], epoch_s, 100 * save_s / epoch_s))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"config {args.config}; {args.steps} steps per truncated epoch")
    print(f"{'P':>2} {'size MB':>8} {'save s':>7} {'load s':>7} {'epoch s (extrap.)':>18} {'overhead %':>10}")
    for P, mb, s, l, e, o in rows:
        print(f"{P:>2} {mb:>8.1f} {s:>7.2f} {l:>7.2f} {e:>18.1f} {o:>10.2f}")


if __name__ == "__main__":
    main()
