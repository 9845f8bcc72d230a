"""The real entry point, as users run it: ``python -m mbssl_dist.train`` in one process and
under ``python -m torch.distributed.run`` with 2 ranks, with gloo collectives and with
shared-memory ones, on the shipped synthetic config (shrunk by --set).

Oracle: the trainer is written so that P ranks compute what one process computes (global
batches, per-block dropout masks, all-reduced loss sums and evaluation counts), so the
2-rank runs' metrics.jsonl and final.json must equal the 1-process run's to float
rounding (1e-5 relative). Also: only rank 0 writes files and logs at INFO, --prepare-only
prepares the cache and trains nothing, and the exit codes 0 / 2 (config error) / 3
(non-finite loss, the message naming task, epoch and step) come out of the real process.

All runs start together in one module fixture (after the --prepare-only run has filled the
cache they share), so the whole file costs about one torchrun start-up of wall time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

CONFIG = REPO / "configs" / "synthetic.toml"
TINY = ["data.synthetic_users=300", "data.synthetic_items=200", "data.synthetic_clusters=4", "model.dim=16",
        "train.batch_size=64", "train.epochs=2", "train.max_steps_per_epoch=3", "train.threads=1",
        "train.patience=0", "run.mlflow=false", "run.progress=false"]
# lr = 1e30 makes the second step's rec loss NaN; one step per epoch puts it at epoch 1
NAN = ["train.epochs=3", "train.lr=1e30", "loss.use_inter=false", "train.max_steps_per_epoch=1",
       "train.eval_every=10"]
NAN_MSG = "non-finite loss in task 'rec' at epoch 1, step 0 (global step 1)"
RUN_FILES = {"config.toml", "metrics.jsonl", "timings.jsonl", "final.json", "curves.png", ".run.lock", "run.json", "model",
             "checkpoints"}
TOL = 1e-5


def command(tmp: Path, name: str, extra: list[str], nproc: int = 1, prepare_only: bool = False) -> list[str]:
    sets = [f'data.cache_dir="{tmp / "cache"}"', f'run.output_dir="{tmp / "runs"}"', f'run.name="{name}"']
    args = ["-m", "mbssl_dist.train", "--config", str(CONFIG)]
    for s in sets + TINY + extra:
        args += ["--set", s]
    if prepare_only:
        args.append("--prepare-only")
    if nproc == 1:
        return [sys.executable] + args
    # per-rank stdout/stderr files under logs/NAME (--redirects 3), so each rank's log is known
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--log-dir", str(tmp / "logs" / name), "--redirects", "3"] + args


def rank_stderr(tmp: Path, name: str, rank: int) -> str:
    (path,) = (tmp / "logs" / name).glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("entry")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")

    def start(name, extra, nproc=1, prepare_only=False):
        return subprocess.Popen(command(tmp, name, extra, nproc, prepare_only), cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p):
        out, err = p.communicate(timeout=600)
        return {"rc": p.returncode, "stdout": out, "stderr": err}

    res = {"tmp": tmp}
    bad = start("bad", ["train.epochz=3"])  # needs no data: runs beside the preparation
    res["prepare"] = finish(start("prepare", [], nproc=2, prepare_only=True))
    res["prepare"]["cache"] = sorted(p.name for p in (tmp / "cache").iterdir()) if (tmp / "cache").exists() else []
    res["prepare"]["runs_exist"] = (tmp / "runs").exists()
    procs = {"one": start("one", []),
             "gloo": start("gloo", ['dist.collectives="gloo"'], nproc=2),
             "shm": start("shm", ['dist.collectives="shm"'], nproc=2),
             "bad_config": bad,
             "nan": start("nan", NAN)}
    for k, p in procs.items():
        res[k] = finish(p)
    return res


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_records(a, b, where: str) -> None:
    """Same structure; every number within TOL relative (ints, e.g. counts, exactly)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_close_records(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_records(x, y, f"{where}[{i}]")
    elif isinstance(a, bool) or a is None or isinstance(a, str):
        assert a == b, f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, int) and isinstance(b, int):
        assert a == b, f"{where}: {a} vs {b}"
    else:
        assert abs(a - b) <= TOL * max(abs(a), abs(b), 1e-12), f"{where}: {a} vs {b}"


def test_prepare_only_fills_the_cache_and_trains_nothing(runs):
    r = runs["prepare"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert any(n.startswith("synthetic-") for n in r["cache"]) and any(n.startswith("swing-") for n in r["cache"])
    assert not r["runs_exist"]  # no run directory, no metrics
    assert "prepare-only: data and swing are cached" in rank_stderr(runs["tmp"], "prepare", 0)


def test_one_process_exit_0(runs):
    assert runs["one"]["rc"] == 0, runs["one"]["stderr"][-3000:]
    run_dir = runs["tmp"] / "runs" / "one"
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    kinds = [r["kind"] for r in records(run_dir)]
    assert kinds == ["epoch", "valid", "test"] * 2
    assert "Preparing" not in runs["one"]["stderr"] and "preparing" not in runs["one"]["stderr"]  # cache reused


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_two_ranks_equal_one_process(runs, transport):
    r = runs[transport]
    assert r["rc"] == 0, r["stderr"][-3000:] + rank_stderr(runs["tmp"], transport, 0)[-3000:]
    runs_dir = runs["tmp"] / "runs"
    one, two = records(runs_dir / "one"), records(runs_dir / transport)
    assert_close_records(one, two, f"{transport} metrics.jsonl")
    f1 = json.loads((runs_dir / "one" / "final.json").read_text())
    f2 = json.loads((runs_dir / transport / "final.json").read_text())
    assert f1["world_size"] == 1 and f2["world_size"] == 2
    for k in ("select_metric", "best_epoch", "valid", "test", "reference_protocol_best_test_epoch", "epochs_run",
              "steps", "dataset_sha256"):
        assert_close_records(f1[k], f2[k], f"{transport} final.json {k}")
    # the evaluation really covered every user once (counts summed over the ranks)
    ev = [x for x in two if x["kind"] == "test"]
    assert ev[0]["n_users"] == 300
    log0 = rank_stderr(runs["tmp"], transport, 0)
    assert ("through shared memory" in log0) == (transport == "shm")


@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_only_rank_0_writes(runs, transport):
    """One run directory with the run's files and nothing else anywhere under the output
    root (rank 1 has its own working directory: the same tmp dir, checked too)."""
    tmp = runs["tmp"]
    assert runs[transport]["rc"] == 0
    assert {p.name for p in (tmp / "runs" / transport).iterdir()} == RUN_FILES
    stray = {p.name for p in tmp.iterdir()} - {"cache", "runs", "logs"}
    assert not stray, stray  # e.g. no mlflow.db / mlruns from some rank
    assert rank_stderr(tmp, transport, 0).count(" INFO mbssl_dist.train: epoch ") >= 2


@pytest.mark.xfail(strict=True, reason="train.main logs with setup_logging(0) until the process group is "
                   "up, so rank 1's 'process group up' line is INFO; fix: setup_logging(int(os.environ.get("
                   "'RANK', '0'))) before init_distributed (train.py), then drop this marker")
@pytest.mark.parametrize("transport", ["gloo", "shm"])
def test_rank_1_logs_nothing_at_info(runs, transport):
    assert runs[transport]["rc"] == 0
    log1 = rank_stderr(runs["tmp"], transport, 1)
    info = [line for line in log1.splitlines() if " INFO " in line]
    assert not info, info[:5]


def test_exit_2_on_a_config_error(runs):
    r = runs["bad_config"]
    assert r["rc"] == 2
    assert "config error: unknown field train.epochz" in r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert not (runs["tmp"] / "runs" / "bad").exists()


def test_exit_3_on_a_non_finite_loss(runs):
    r = runs["nan"]
    assert r["rc"] == 3, r["stderr"][-3000:]
    assert NAN_MSG in r["stderr"] and "Traceback" not in r["stderr"]
    run_dir = runs["tmp"] / "runs" / "nan"
    assert json.loads((run_dir / "final.json").read_text())["error"] == NAN_MSG
    assert records(run_dir)[-1] == {"kind": "error", "epoch": 1, "step": 0, "task": "rec", "message": NAN_MSG}
