"""The launchers: ``python -m mbssl_dist.launch`` (torchrun keeping the workers' exit codes)
and ``launch/run_local.sh`` (a crash on a rank whose console output is filtered out still
shows that rank's traceback). Real 2-process torchrun runs on a tiny synthetic set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic_users=120", "data.synthetic_items=80", "data.synthetic_clusters=4", "model.dim=8",
        "model.n_layers=1", "train.batch_size=64", "train.threads=1", "swing.topn=10", "swing.workers=1",
        "loss.fn_users=3", "loss.fn_items=3", "run.progress=false", "run.mlflow=false", "train.epochs=2"]


def train_args(tmp: Path, name: str, extra: list[str] = ()) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "synthetic.toml")]
    for x in [f'data.cache_dir="{tmp / "cache"}"', f'run.output_dir="{tmp / "runs"}"', f'run.name="{name}"',
              f'run.tracking_uri="sqlite:///{tmp / "mlflow.db"}"'] + TINY + list(extra):
        args += ["--set", x]
    return args


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    e.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1", **extra)
    return e


def launch(tmp: Path, name: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mbssl_dist.launch", "--standalone", "--nproc_per_node", "2",
           "-m", "mbssl_dist.train"] + train_args(tmp, name, extra)
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def test_launcher_exit_codes_0_2_3(tmp_path):
    ok = launch(tmp_path, "ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    final = json.loads((tmp_path / "runs" / "ok" / "final.json").read_text())
    assert final["world_size"] == 2 and final["test"]

    bad = launch(tmp_path, "bad", ["train.epochz=3"])
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "unknown field train.epochz" in bad.stderr
    assert "failed with exit code 2" in bad.stderr
    assert "recorded no traceback" in bad.stderr  # an exit by itself is not reported as a crash

    nan = launch(tmp_path, "nan", ["train.lr=1e30", "loss.use_inter=false", "train.epochs=3"])
    assert nan.returncode == 3, nan.stderr[-3000:]
    assert "failed with exit code 3" in nan.stderr
    assert "non-finite loss" in json.loads((tmp_path / "runs" / "nan" / "final.json").read_text())["error"]


def test_launcher_exit_code_of_a_signal():
    from types import SimpleNamespace

    from mbssl_dist.launch import exit_code_of

    assert exit_code_of(SimpleNamespace(exitcode=-9)) == 137
    assert exit_code_of(SimpleNamespace(exitcode=3)) == 3


def test_crash_on_rank_1_shows_its_traceback(tmp_path):
    """Rank 1 raises right after the process group is up (hidden hook); the console shows
    only rank 0 (LOG_RANK=0), yet its traceback, rank and error file are printed."""
    cmd = ["bash", str(ROOT / "launch" / "run_local.sh")] + train_args(tmp_path, "crash")[2:]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env(NPROC_PER_NODE="2", LOG_RANK="0", LOG_DIR=str(tmp_path / "logs"),
                               MBSSL_TEST_RAISE_ON_RANK="1", PY=sys.executable))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "rank 1 (local rank 1" in out and "failed first with exit code 1" in out, out[-3000:]
    assert "Traceback (most recent call last)" in out
    assert "RuntimeError: MBSSL_TEST_RAISE_ON_RANK=1: test failure on rank 1" in out
    # every rank's output is kept under LOG_DIR
    logs = list((tmp_path / "logs").rglob("stderr.log"))
    assert len(logs) >= 2
    assert any("test failure on rank 1" in p.read_text() for p in logs)


def test_log_lines_carry_the_real_rank(monkeypatch, caplog):
    import logging

    from mbssl_dist.train import setup_logging

    monkeypatch.setenv("RANK", "3")
    setup_logging()
    fmt = logging.getLogger().handlers[0].formatter._fmt
    assert "[rank 3]" in fmt
    assert logging.getLogger().level == logging.WARNING
    setup_logging(0)
