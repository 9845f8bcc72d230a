"""Checkpoints and resume, against the oracle of an uninterrupted run: a run stopped and
resumed (same or different number of ranks, at an epoch boundary or mid-epoch, after kill -9
of a worker under torchrun --max-restarts) ends with the same metrics.jsonl and final.json;
damaged checkpoints are named or skipped, never silently ignored; a checkpoint of another
config is refused; records say FAILED / KILLED when a run fails or is killed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbssl_dist.train import main

SMALL = ["data.synthetic_users=300", "data.synthetic_items=200", "data.synthetic_clusters=4",
         "model.dim=16", "model.n_layers=2", "train.batch_size=64", "train.lr=0.05", "train.threads=1",
         "swing.topn=20", "swing.workers=1", "loss.fn_users=5", "loss.fn_items=5", "loss.decay=0.01",
         "loss.lambdas=[0.1, 0.3, 0.6]", "run.progress=false", "train.patience=0"]
REPO = Path(__file__).resolve().parents[1]


def args_for(tmp: Path, name: str, extra: list[str], mlflow: bool = False) -> list[str]:
    args = ["--set", f'data.cache_dir="{tmp / "cache"}"', "--set", f'run.output_dir="{tmp / "runs"}"',
            "--set", f'run.name="{name}"', "--set", f"run.mlflow={'true' if mlflow else 'false'}",
            "--set", f'run.tracking_uri="sqlite:///{tmp / "mlflow.db"}"']
    for x in SMALL + extra:
        args += ["--set", x]
    return args


def run(tmp: Path, name: str, extra: list[str], mlflow: bool = False) -> tuple[int, Path]:
    try:
        rc = main(args_for(tmp, name, extra, mlflow))
    except SystemExit as e:
        rc = e.code
    return rc, tmp / "runs" / name


def torchrun_cmd(tmp: Path, name: str, extra: list[str], nproc: int, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--max-restarts", str(restarts), "-m", "mbssl_dist.train", *args_for(tmp, name, extra)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def torchrun(tmp: Path, name: str, extra: list[str], nproc: int = 2) -> Path:
    p = subprocess.run(torchrun_cmd(tmp, name, extra, nproc), cwd=tmp, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "runs" / name


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def final(out: Path) -> dict:
    return json.loads((out / "final.json").read_text())


def assert_same_run(a: Path, b: Path, rtol: float) -> None:
    """metrics.jsonl and final.json metrics of two runs agree to ``rtol`` (relative)."""
    ra, rb = records(a), records(b)
    assert [(r["kind"], r["epoch"]) for r in ra] == [(r["kind"], r["epoch"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys(), (x.keys(), y.keys())
        for k in x:
            if isinstance(x[k], float):
                assert y[k] == pytest.approx(x[k], rel=rtol, abs=1e-9), (x["kind"], x["epoch"], k, x[k], y[k])
            else:
                assert x[k] == y[k], k
    fa, fb = final(a), final(b)
    assert fa["status"] == fb["status"] == "FINISHED"
    assert fa["best_epoch"] == fb["best_epoch"] and fa["steps"] == fb["steps"]
    for ph in ("valid", "test"):
        for k, v in fa[ph].items():
            assert fb[ph][k] == pytest.approx(v, rel=rtol, abs=1e-9), (ph, k)


# ------------------------------------------------------------------ one process


def test_resume_at_epoch_boundary_and_mid_epoch_equals_uninterrupted(tmp_path):
    rc, full = run(tmp_path, "full", ["train.epochs=4"])
    assert rc == 0
    # stopped after 2 epochs, then continued to 4 (train.epochs may grow on resume)
    assert run(tmp_path, "split", ["train.epochs=2"])[0] == 0
    rc, split = run(tmp_path, "split", ["train.epochs=4"])
    assert rc == 0
    assert (split / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    assert_same_run(full, split, rtol=0)
    # mid-epoch: checkpoints every 3 steps (5 steps per epoch); resume from one inside epoch 2
    rc, mid = run(tmp_path, "mid", ["train.epochs=4", "checkpoint.every_steps=3", "checkpoint.keep=50"])
    assert rc == 0
    assert_same_run(full, mid, rtol=0)
    ckpts = sorted((mid / "checkpoints").glob("step-*"))
    inside = [c for c in ckpts if json.loads((c / "trainer.json").read_text())["batch"] > 0
              and json.loads((c / "trainer.json").read_text())["epoch"] == 2]
    assert inside, [c.name for c in ckpts]
    for later in ckpts:
        if later.name > inside[0].name:
            import shutil
            shutil.rmtree(later)
    (mid / "final.json").unlink()
    rc, mid = run(tmp_path, "mid", ["train.epochs=4", "checkpoint.every_steps=3", "checkpoint.keep=50"])
    assert rc == 0
    assert (mid / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_a_lowered_learning_rate_survives_resume(tmp_path):
    """train.lr_decay: the rate lowered on a plateau before the stop is the rate after the resume
    (it is not among the optimizer tensors a checkpoint holds, so it has its own record)."""
    decay = ["train.lr_decay=0.5", "train.lr_patience=1"]
    rc, full = run(tmp_path, "full", ["train.epochs=6"] + decay)
    assert rc == 0
    rates = [r["lr"] for r in records(full) if r["kind"] == "epoch"]
    assert rates[0] == 0.05 and rates[3] < rates[0], rates  # lowered before epoch 3 (not vacuous)
    assert run(tmp_path, "split", ["train.epochs=3"] + decay)[0] == 0
    rc, split = run(tmp_path, "split", ["train.epochs=6"] + decay)
    assert rc == 0
    assert (split / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()


def test_checkpoints_are_pruned_to_keep_and_written_whole(tmp_path):
    rc, out = run(tmp_path, "k", ["train.epochs=4", "checkpoint.keep=2"])
    assert rc == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000000015", "step-000000020"]  # 5 steps per epoch, the last two epochs
    doc = json.loads((out / "checkpoints" / names[-1] / "trainer.json").read_text())
    assert doc["epoch"] == 4 and doc["batch"] == 0 and doc["step"] == 20
    assert set(doc["files"]) == {p.name for p in (out / "checkpoints" / names[-1]).iterdir()} - {"trainer.json"}


def test_damaged_checkpoints_fall_back_or_fail_naming_the_file(tmp_path, capsys):
    rc, full = run(tmp_path, "full", ["train.epochs=3"])
    assert rc == 0
    assert run(tmp_path, "d", ["train.epochs=2"])[0] == 0
    ck = sorted((tmp_path / "runs" / "d" / "checkpoints").glob("step-*"))
    assert len(ck) == 2
    # truncate the newest checkpoint's data file: resume skips it (warning names it) and uses the older one
    data = next(ck[-1].glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    rc, out = run(tmp_path, "d", ["train.epochs=3"])
    assert rc == 0
    assert (out / "metrics.jsonl").read_text() == (full / "metrics.jsonl").read_text()
    # every checkpoint damaged: a one-line error naming the file, exit 2, no silent restart
    for c in sorted((out / "checkpoints").glob("step-*")):
        f = next(c.glob("*.distcp"))
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF  # same size, one flipped byte
        f.write_bytes(bytes(b))
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    rc, out = run(tmp_path, "d", ["train.epochs=4"])
    assert rc == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("checkpoint error: ") and ".distcp" in last and "corrupted" in last, last
    assert "Traceback" not in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing overwritten


def test_resume_refuses_another_config_and_never_starts_over(tmp_path, capsys):
    assert run(tmp_path, "c", ["train.epochs=1"])[0] == 0
    capsys.readouterr()
    rc, _ = run(tmp_path, "c", ["train.epochs=2", "train.lr=0.01", "model.dim=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.lr (0.05 in the checkpoint, 0.01 now)" in err and "model.dim (16" in err
    # resume = "never": starts fresh, the old checkpoints and outputs are gone
    rc, out = run(tmp_path, "c", ["train.epochs=1", "train.lr=0.01", "model.dim=8", 'run.resume="never"'])
    assert rc == 0
    doc = json.loads((sorted((out / "checkpoints").glob("step-*"))[-1] / "trainer.json").read_text())
    assert doc["config"]["train"]["lr"] == 0.01
    # resume = "require" without checkpoints is an error
    capsys.readouterr()
    rc, _ = run(tmp_path, "fresh", ["train.epochs=1", 'run.resume="require"'])
    assert rc == 2 and "holds no complete checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------ records


def _mlflow_status(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    return [r[0] for r in con.execute("select status from runs order by start_time")]


def test_a_run_that_raises_is_failed_everywhere(tmp_path, monkeypatch):
    from mbssl_dist.training import TrainStep

    orig = TrainStep.__call__
    calls = {"n": 0}

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk on fire")
        return orig(self, *a, **k)

    monkeypatch.setattr(TrainStep, "__call__", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(args_for(tmp_path, "f", ["train.epochs=3"], mlflow=True))
    out = tmp_path / "runs" / "f"
    fin = final(out)
    assert fin["status"] == "FAILED" and "disk on fire" in fin["error"]
    assert json.loads((out / "run.json").read_text())["status"] == "FAILED"
    assert _mlflow_status(tmp_path / "mlflow.db") == ["FAILED"]
    monkeypatch.setattr(TrainStep, "__call__", orig)
    # the rerun resumes from the epoch-0 checkpoint, the same MLflow run ends FINISHED, and
    # the failed attempt's final.json is gone before the new one is written
    rc = main(args_for(tmp_path, "f", ["train.epochs=3"], mlflow=True))
    assert rc == 0 and final(out)["status"] == "FINISHED"
    assert _mlflow_status(tmp_path / "mlflow.db") == ["FINISHED"]


def test_a_signal_while_the_model_is_logged_is_killed_not_finished(tmp_path, monkeypatch):
    """The final phase (test report, the model logged to MLflow) is inside the signal guard: a
    SIGTERM there is recorded KILLED (exit 143), not swallowed as a failed model upload and
    then FINISHED, and the default handler is back once train() returns."""
    import mbssl_dist.mlflow_model as mm

    def preempted(_model_dir):
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler raises RunInterrupted here

    monkeypatch.setattr(mm, "log_model_to_mlflow", preempted)
    before = signal.getsignal(signal.SIGTERM)
    assert main(args_for(tmp_path, "k", ["train.epochs=1"], mlflow=True)) == 128 + signal.SIGTERM
    out = tmp_path / "runs" / "k"
    assert final(out)["status"] == "KILLED" and final(out)["exit_code"] == 143
    assert json.loads((out / "run.json").read_text())["status"] == "KILLED"
    assert _mlflow_status(tmp_path / "mlflow.db") == ["KILLED"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_while_the_finished_run_is_recorded_leaves_it_finished(tmp_path, monkeypatch, capfd):
    """A SIGTERM while the FINISHED record is being written (here: during its first MLflow
    artifact upload) neither cuts the recording short (MLflow ends FINISHED with every
    artifact, final.json is complete) nor is swallowed silently: it is noted in the log."""
    import mlflow

    orig, calls = mlflow.log_artifact, []

    def preempted(path, *a, **k):
        calls.append(Path(path).name)
        if calls[-1] == "final.json":
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(path, *a, **k)

    monkeypatch.setattr(mlflow, "log_artifact", preempted)
    assert main(args_for(tmp_path, "g", ["train.epochs=1"], mlflow=True)) == 0
    out = tmp_path / "runs" / "g"
    assert final(out)["status"] == "FINISHED" and final(out)["test"] is not None
    assert _mlflow_status(tmp_path / "mlflow.db") == ["FINISHED"]
    assert calls[1:4] == ["final.json", "metrics.jsonl", "timings.jsonl"]  # after the start's config.toml
    assert "SIGTERM arrived while the finished run was being recorded" in capfd.readouterr().err


def _sigterm_on_upload_of(monkeypatch, name: str) -> list[str]:
    """Patch mlflow.log_artifact to send this process a SIGTERM when ``name`` is uploaded."""
    import mlflow

    orig, calls = mlflow.log_artifact, []

    def preempted(path, *a, **k):
        calls.append(Path(path).name)
        if calls[-1] == name:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(path, *a, **k)

    monkeypatch.setattr(mlflow, "log_artifact", preempted)
    return calls


def test_a_signal_while_a_failed_run_is_recorded_leaves_it_failed(tmp_path, monkeypatch, capfd):
    """The FAILED record of a run that raised, and of one stopped by a non-finite loss, is
    written whole when a SIGTERM arrives meanwhile: MLflow ends FAILED (not left RUNNING),
    the exception or exit 3 stays what the caller gets, and the signal is noted in the log."""
    from mbssl_dist.training import TrainStep
    from mbssl_dist.training.step import NonFiniteLossError

    orig = TrainStep.__call__
    for name, exc in (("f", RuntimeError("disk on fire")), ("n", NonFiniteLossError("rec", float("nan")))):
        calls = {"n": 0}

        def boom(self, *a, _exc=exc, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise _exc
            return orig(self, *a, **k)

        monkeypatch.setattr(TrainStep, "__call__", boom)
        uploads = _sigterm_on_upload_of(monkeypatch, "final.json")
        args = args_for(tmp_path / name, name, ["train.epochs=2"], mlflow=True)
        if name == "f":
            with pytest.raises(RuntimeError, match="disk on fire"):
                main(args)
        else:
            assert main(args) == 3
        out = tmp_path / name / "runs" / name
        assert final(out)["status"] == "FAILED" and final(out)["exit_code"] == (1 if name == "f" else 3)
        assert json.loads((out / "run.json").read_text())["status"] == "FAILED"
        assert _mlflow_status(tmp_path / name / "mlflow.db") == ["FAILED"]
        assert uploads[-3:] == ["final.json", "metrics.jsonl", "timings.jsonl"]
        assert "SIGTERM arrived while the failed run was being recorded; recorded FAILED" in capfd.readouterr().err
        monkeypatch.undo()


def test_a_signal_while_the_run_starts_is_recorded_killed(tmp_path, monkeypatch):
    """A SIGTERM while the run's record is opened (here: during the upload of its config) is
    held until run.json and the MLflow run exist, then recorded KILLED (exit 143), not a
    process dead with an MLflow run left RUNNING."""

    class Escaped(Exception):
        pass

    def outside(signum, frame):  # reached only if the trainer left the signal to the caller's handler
        raise Escaped()

    _sigterm_on_upload_of(monkeypatch, "config.toml")
    prev = signal.signal(signal.SIGTERM, outside)
    try:
        rc = main(args_for(tmp_path, "s", ["train.epochs=2"], mlflow=True))
    finally:
        signal.signal(signal.SIGTERM, prev)
    assert rc == 128 + signal.SIGTERM
    out = tmp_path / "runs" / "s"
    assert final(out)["status"] == "KILLED" and final(out)["evaluations"] == []
    assert json.loads((out / "run.json").read_text())["status"] == "KILLED"
    assert _mlflow_status(tmp_path / "mlflow.db") == ["KILLED"]
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))


def test_a_resumed_mlflow_run_holds_each_redone_epoch_once(tmp_path, monkeypatch):
    """Killed after epoch 2 with the newest checkpoint after epoch 1: the rerun redoes epoch 2
    in the same MLflow run; its points must not appear twice (MLflow cannot delete a point)."""
    from mbssl_dist.training import TrainStep

    orig = TrainStep.__call__
    calls = {"n": 0}

    def boom(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 18:  # inside epoch 3 (5 steps per epoch)
            raise RuntimeError("node lost")
        return orig(self, *a, **k)

    extra = ["train.epochs=4", "checkpoint.every_epochs=2"]
    monkeypatch.setattr(TrainStep, "__call__", boom)
    with pytest.raises(RuntimeError, match="node lost"):
        main(args_for(tmp_path, "m", extra, mlflow=True))
    monkeypatch.setattr(TrainStep, "__call__", orig)
    assert main(args_for(tmp_path, "m", extra, mlflow=True)) == 0
    con = sqlite3.connect(tmp_path / "mlflow.db")
    dup = con.execute("select key, step, count(*) from metrics group by run_uuid, key, step having count(*) > 1").fetchall()
    assert dup == []
    hist = con.execute("select step, value from metrics where key = 'valid/recall_10' order by step").fetchall()
    jl = [(r["epoch"], r["recall@10"]) for r in records(tmp_path / "runs" / "m") if r["kind"] == "valid"]
    assert len(hist) == len(jl) == 4 and [h[0] for h in hist] == [e for e, _ in jl]
    assert [h[1] for h in hist] == pytest.approx([v for _, v in jl], rel=1e-12)


def test_sigterm_is_killed_and_sigkill_is_marked_on_the_next_start(tmp_path):
    cmd = [sys.executable, "-m", "mbssl_dist.train",
           *args_for(tmp_path, "s", ["train.epochs=400", "checkpoint.every_epochs=1"], mlflow=True)]
    out = tmp_path / "runs" / "s"

    def start_and_wait_for_checkpoint():
        p = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.time()
        while not list((out / "checkpoints").glob("step-*/trainer.json")):
            assert p.poll() is None and time.time() - t0 < 120
            time.sleep(0.1)
        return p

    p = start_and_wait_for_checkpoint()
    p.send_signal(signal.SIGTERM)
    log, _ = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, log[-2000:]
    assert final(out)["status"] == "KILLED" and final(out)["exit_code"] == 143
    assert _mlflow_status(tmp_path / "mlflow.db") == ["KILLED"]
    # SIGKILL records nothing; a fresh start in that directory marks the dead run KILLED
    for c in (out / "checkpoints").glob("*"):
        import shutil
        shutil.rmtree(c)
    p = start_and_wait_for_checkpoint()
    p.kill()
    p.communicate(timeout=60)
    assert _mlflow_status(tmp_path / "mlflow.db")[-1] == "RUNNING"  # what SIGKILL leaves behind
    rc = main(args_for(tmp_path, "s", ["train.epochs=1", 'run.resume="never"'], mlflow=True))
    assert rc == 0
    assert _mlflow_status(tmp_path / "mlflow.db") == ["KILLED", "KILLED", "FINISHED"]


# ------------------------------------------------------------------ several processes


MULTI = ["train.epochs=4", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def p2_runs(tmp_path_factory):
    """One uninterrupted 2-rank run (the oracle) and one stopped after 2 of its 4 epochs."""
    tmp = tmp_path_factory.mktemp("p2")
    full = torchrun(tmp, "p2full", MULTI)
    half = torchrun(tmp, "p2half", ["train.epochs=2", "checkpoint.every_steps=2"])
    return tmp, full, half


def test_checkpoint_at_two_ranks_resumes_at_one_and_three(p2_runs):
    import shutil

    tmp, full, half = p2_runs
    for name in ("to1", "to3"):
        shutil.copytree(half, tmp / "runs" / name)
    rc, to1 = run(tmp, "to1", MULTI)
    assert rc == 0
    assert_same_run(full, to1, rtol=1e-5)
    to3 = torchrun(tmp, "to3", MULTI, nproc=3)
    assert_same_run(full, to3, rtol=1e-5)
    assert final(to1)["world_size"] == 1 and final(to3)["world_size"] == 3


def test_two_ranks_skip_a_damaged_checkpoint_the_main_rank_verified(p2_runs):
    """At P = 2 only the main rank hashes the files (CheckpointManager.latest_usable); both
    ranks must still agree on the older checkpoint and continue to the uninterrupted result."""
    import shutil

    tmp, full, half = p2_runs
    shutil.copytree(half, tmp / "runs" / "dmg")
    newest = sorted((tmp / "runs" / "dmg" / "checkpoints").glob("step-*"))[-1]
    f = sorted(newest.glob("*.distcp"))[-1]  # the file the second rank wrote
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    p = subprocess.run(torchrun_cmd(tmp, "dmg", MULTI, 2), cwd=tmp, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipping damaged checkpoint" in p.stderr and f.name in p.stderr
    assert_same_run(full, tmp / "runs" / "dmg", rtol=1e-5)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(out)


def test_kill_9_of_a_worker_under_torchrun_restarts_resumes_and_matches(p2_runs):
    """The restarted workers must rendezvous again (parallel.dist.elastic_attempt_store) and
    continue from the newest complete checkpoint."""
    tmp, full, _ = p2_runs
    out = tmp / "runs" / "killed"
    p = subprocess.Popen(torchrun_cmd(tmp, "killed", MULTI, 2, restarts=1), cwd=tmp, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not any(json.loads(c.read_text())["step"] >= 12 for c in (out / "checkpoints").glob("step-*/trainer.json")
                  if c.is_file()):
        assert p.poll() is None and time.time() - t0 < 180, "run ended before the kill"
        time.sleep(0.05)
    workers = _children(p.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # in the middle of epoch 2 (5 steps per epoch)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    assert "resuming from" in log and "exitcode: -9" in log, log[-3000:]
    assert_same_run(full, out, rtol=1e-6)


def test_diverged_parameters_at_evaluation_are_exit_3_not_a_traceback(tmp_path):
    """A step can keep a finite loss yet leave NaN parameters; the evaluation then scores NaN.
    That is the non-finite-loss failure (exit 3, FAILED, message), not an uncaught ValueError."""
    rc, out = run(tmp_path, "div", ["train.epochs=3", "train.lr=1e30", "train.max_steps_per_epoch=1",
                                    "loss.use_inter=false"])
    assert rc == 3
    fin = final(out)
    assert fin["status"] == "FAILED" and fin["exit_code"] == 3 and "non-finite" in fin["error"], fin
