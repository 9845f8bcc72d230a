"""What the measurement tools share: a fresh output folder, and one trainer run per
measurement in a child process (1 thread, no MLflow), read back from its run directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_out(path: str, tool: str) -> Path:
    """``path`` resolved; exit 2 when it holds anything (its runs would be resumed, not rerun)."""
    out = Path(path).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"{tool}: {out} is not empty: give a new --out (its runs would be resumed, not rerun)", file=sys.stderr)
        sys.exit(2)
    return out


def train(out: Path, name: str, sets: list[str], config: str | None = None) -> tuple[list[dict], dict]:
    """Train ``run.name = name`` under ``out`` at 1 thread; returns (metrics.jsonl records, final.json).
    A failed run stops the tool with the trainer's last error line."""
    cmd = [sys.executable, "-m", "mbssl_dist.train"] + (["--config", config] if config else [])
    for s in ["train.threads=1", "run.mlflow=false", "run.progress=false", f'run.output_dir="{out}"',
              f'run.name="{name}"'] + sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode:
        sys.exit(f"{name}: the trainer exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    recs = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return recs, json.loads((out / name / "final.json").read_text())
