"""Experiment grids (mbssl_dist.experiments) and their report (mbssl_dist.report), on tiny
synthetic data through the real trainer in subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from mbssl_dist import experiments as E
from mbssl_dist import report as R

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic_users=120", "data.synthetic_items=80", "data.synthetic_clusters=4", "model.dim=8",
        "model.n_layers=1", "train.batch_size=64", "train.lr=0.05", "train.threads=1", "swing.topn=10",
        "swing.workers=1", "loss.fn_users=3", "loss.fn_items=3", "run.progress=false", "train.patience=0",
        "train.eval_batch_size=256",
        # the paper's model and HMG (the built-in recipe's score term makes the tiny grid's points tie)
        "model.interaction_scoring=false", "model.item_bias=false", "hmg.relax=0.7", "hmg.aux_budget=0", "hmg.aux_budget_rows=false",
        "loss.decay=10.0"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def base_sets(tmp: Path, mlflow: bool) -> list[str]:
    return TINY + [f'data.cache_dir="{tmp / "cache"}"', f"run.mlflow={'true' if mlflow else 'false'}",
                   f'run.tracking_uri="sqlite:///{tmp / "mlflow.db"}"', 'run.experiment="exp-test"']


def starts(log: Path) -> int:
    """How many times the experiment runner started this run (one header line per start)."""
    return log.read_text().count("\n=== ") if log.is_file() else 0


def finals(d: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted(d.glob("*/seed*/final.json")):
        out.setdefault(f.parent.parent.name, []).append(json.loads(f.read_text()))
    return out


def test_grid_runs_resumes_a_killed_point_and_reports_its_finals(env):
    tmp = env
    exp = E.Experiment("grid", None, base_sets(tmp, mlflow=True), seeds=2, processes=1, out=tmp / "exps", epochs=2)
    points = [E.Point("a"), E.Point("b", ["loss.use_intra=false"])]
    assert E.run_grid(exp, points) == 0
    d = tmp / "exps" / "grid"
    runs = {(p, s): d / p / f"seed{s}" for p in "ab" for s in (0, 1)}
    for r in runs.values():
        assert json.loads((r / "final.json").read_text())["status"] == "FINISHED"
    # seeds differ, so the two seeds of a point are two different runs
    fa = finals(d)["a"]
    assert fa[0]["test"] != fa[1]["test"]
    logs = {k: d / "logs" / f"{k[0]}_seed{k[1]}.log" for k in runs}
    assert all(starts(lg) == 1 for lg in logs.values())

    # MLflow: one parent, four children nested under it, tagged with their point
    meta = json.loads((d / "experiment.json").read_text())
    parent = meta["mlflow_parent_run_id"]
    con = sqlite3.connect(tmp / "mlflow.db")
    kids = con.execute("select run_uuid from tags where key='mlflow.parentRunId' and value=?", (parent,)).fetchall()
    assert len(kids) == 4
    pts = sorted(v for (v,) in con.execute(
        "select value from tags where key='mbssl.point' and run_uuid in (select run_uuid from tags where "
        "key='mlflow.parentRunId' and value=?)", (parent,)))
    assert pts == ["a", "a", "b", "b"]
    con.close()

    # make (b, seed1) look killed after its first epoch: no final.json, only the epoch-1 checkpoint
    killed = runs[("b", 1)]
    (killed / "final.json").unlink()
    ck = sorted((killed / "checkpoints").glob("step-*"))
    assert len(ck) == 2
    shutil.rmtree(ck[-1])
    mtimes = {k: (r / "final.json").stat().st_mtime_ns for k, r in runs.items() if k != ("b", 1)}
    assert E.run_grid(exp, points) == 0
    for k, r in runs.items():
        assert json.loads((r / "final.json").read_text())["status"] == "FINISHED"
        if k != ("b", 1):
            assert (r / "final.json").stat().st_mtime_ns == mtimes[k], k
            assert starts(logs[k]) == 1, k
    assert starts(logs[("b", 1)]) == 2
    assert "resuming from" in logs[("b", 1)].read_text()
    assert json.loads((killed / "final.json").read_text())["epochs_run"] == 2

    # the report's table equals mean/std of the final.json test metrics, computed here
    rep = R.write_report([str(d)], tmp / "report")
    md = rep.read_text()
    summary = json.loads((tmp / "report" / "summary.json").read_text())
    for point, fs in finals(d).items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {point} |"))
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        header = next(line for line in md.splitlines() if line.startswith("| point |"))
        cols = [c.strip() for c in header.strip("|").split("|")]
        for m in ("recall@10", "ndcg@10", "recall@50", "ndcg@50"):
            xs = [f["test"][m] for f in fs]
            mu, sd = statistics.mean(xs), statistics.stdev(xs)
            assert summary["test"][point][m][:2] == pytest.approx([mu, sd], rel=1e-12, abs=1e-15)
            assert cells[cols.index(m)] == f"{mu:.4f} ± {sd:.4f}"
    # the best mean of each column is bold, and only that one
    for m in ("recall@10", "ndcg@50"):
        means = {p: statistics.mean(f["test"][m] for f in fs) for p, fs in finals(d).items()}
        best = max(means, key=means.get)
        col = cols.index(m)
        for p in means:
            row = next(line for line in md.splitlines() if line.startswith(f"| {p} |"))
            assert row.strip("|").split("|")[col].strip().startswith("**") == (p == best)
    for png in ("valid_curves.png", "loss_curves.png"):
        assert (tmp / "report" / png).stat().st_size > 1000
    assert "hmg_norm_ratio.png" in md  # the HMG statistics of metrics.jsonl
    arts = list((tmp / "mlartifacts").rglob("report/report.md"))
    assert len(arts) == 1  # logged to the parent run


def test_changed_grid_under_same_out_is_refused(env):
    tmp = env
    sets = base_sets(tmp, mlflow=False)
    exp = E.Experiment("g", None, sets, seeds=1, processes=1, out=tmp / "exps", epochs=1)
    assert E.run_grid(exp, [E.Point("a")]) == 0
    exp2 = E.Experiment("g", None, sets + ["model.dim=4"], seeds=1, processes=1, out=tmp / "exps", epochs=1)
    with pytest.raises(E.ConfigError, match="model.dim"):
        E.run_grid(exp2, [E.Point("a")])


def test_points_trains_only_the_named_points_and_the_record_keeps_the_grid(env):
    tmp = env
    exp = E.Experiment("g", None, base_sets(tmp, mlflow=False), seeds=1, processes=1, out=tmp / "exps", epochs=1)
    points = [E.Point("a"), E.Point("b", ["loss.use_intra=false"])]
    with pytest.raises(E.ConfigError, match="no point named c"):
        E.run_grid(exp, points, ["b", "c"])
    assert not (tmp / "exps" / "g" / "b").exists()  # refused before anything trained
    assert E.run_grid(exp, points, ["b"]) == 0
    d = tmp / "exps" / "g"
    assert json.loads((d / "b" / "seed0" / "final.json").read_text())["status"] == "FINISHED"
    assert not (d / "a").exists()
    assert [p["name"] for p in json.loads((d / "experiment.json").read_text())["points"]] == ["a", "b"]
    assert E.run_grid(exp, points) == 0  # the rest of the grid: a trains, b is skipped
    assert starts(d / "logs" / "a_seed0.log") == 1 and starts(d / "logs" / "b_seed0.log") == 1
    assert sorted(finals(d)) == ["a", "b"]


def test_grids_name_real_config_fields():
    """Every override of every named grid is a valid config (fields and values exist)."""
    from mbssl_dist.config import load_config

    for name in ("ablation", "hmg", "relax-sweep", "fn-sweep", "compare"):
        for p in E.grid(name):
            load_config(None, p.overrides)
    assert [p.value for p in E.grid("relax-sweep")] == pytest.approx([i / 10 for i in range(11)])
    assert {p.overrides[0] for p in E.grid("hmg")} == {f'hmg.strategy="{s}"' for s in ("hmg", "A", "B", "C", "none")}


@pytest.mark.parametrize("config", [None, "configs/taobao_mbcgcn.toml", "configs/retailrocket.toml"])
def test_compare_defaults_point_keeps_the_data_and_nothing_else(tmp_path, config):
    """compare's "defaults" point: the config's data/run/hardware settings, the built-in recipe."""
    from mbssl_dist.config import load_config

    cfg_path = str(Path(__file__).resolve().parents[1] / config) if config else None
    exp = E.Experiment("compare", cfg_path, ["train.threads=1", "model.dim=8"], seeds=2, processes=1,
                       out=tmp_path, epochs=3)
    base = exp.resolved(list(exp.base_sets))
    pt = next(p for p in E.grid("compare") if p.kind == "defaults")
    got = exp.resolved(exp.defaults_sets(pt, 1, base), pt).to_dict()
    ref = load_config(None).to_dict()
    assert got["data"] == base.to_dict()["data"] and got["dist"] == base.to_dict()["dist"]
    for sec in ("model", "loss", "hmg", "swing"):
        assert got[sec] == ref[sec], sec
    assert got["train"] == {**ref["train"], "threads": 1, "epochs": 3, "seed": ref["train"]["seed"] + 1}
    assert got["run"]["name"] == "mbssl_defaults/seed1" and got["run"]["output_dir"] == str(tmp_path / "compare")


def test_cli_bad_input_is_one_line_exit_2(env, tmp_path):
    space = tmp_path / "space.toml"
    space.write_text('[space]\n"train.nope" = {low = 1, high = 2}\n')
    cmd = [sys.executable, "-m", "mbssl_dist.experiments", "search", "--data", "synthetic", "--space", str(space),
           "--out", str(tmp_path / "x")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "train.nope" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "mbssl_dist.experiments", "ablation", "--data", str(tmp_path / "no.toml")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no.toml" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "mbssl_dist.experiments", "hmg", "--data", "synthetic", "--points",
                        "hmg_A,hmg_Z", "--out", str(tmp_path / "x"), "--set", "run.mlflow=false"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "hmg_Z" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1
    # a config whose data is missing: found when the grid first looks at a run directory
    cfg = tmp_path / "gone.toml"
    cfg.write_text(f'[data]\nformat = "text"\npath = "{tmp_path / "no_such_data"}"\n')
    (tmp_path / "x" / "ablation" / "full" / "seed0").mkdir(parents=True)
    (tmp_path / "x" / "ablation" / "full" / "seed0" / "config.toml").write_text("[train]\nepochs = 1\n")
    p = subprocess.run([sys.executable, "-m", "mbssl_dist.experiments", "ablation", "--data", str(cfg), "--out",
                        str(tmp_path / "x"), "--set", "run.mlflow=false"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no_such_data" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_sigterm_to_the_runner_stops_the_point_and_records_killed(env):
    """kill (or a Slurm preemption) of the runner: the training child is stopped, not orphaned,
    its run and the parent MLflow run say KILLED, and the runner exits 128 + 15."""
    import signal
    import time

    tmp = env
    cmd = [sys.executable, "-m", "mbssl_dist.experiments", "ablation", "--data", "synthetic", "--seeds", "1",
           "--epochs", "200", "--out", str(tmp / "exps")]
    for x in base_sets(tmp, mlflow=True):
        cmd += ["--set", x]
    runner = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp / "exps" / "ablation" / "full" / "seed0"
    deadline = time.time() + 240
    while not list((run_dir / "checkpoints").glob("step-*")) and time.time() < deadline and runner.poll() is None:
        time.sleep(0.5)
    assert runner.poll() is None, runner.stderr.read()[-2000:]
    child_pid = json.loads((run_dir / "run.json").read_text())["pid"]
    runner.send_signal(signal.SIGTERM)
    err = runner.communicate(timeout=120)[1]
    assert runner.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "interrupted by SIGTERM" in err
    assert json.loads((run_dir / "final.json").read_text())["status"] == "KILLED"
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
    parent = json.loads((tmp / "exps" / "ablation" / "experiment.json").read_text())["mlflow_parent_run_id"]
    con = sqlite3.connect(tmp / "mlflow.db")
    assert con.execute("select status from runs where run_uuid=?", (parent,)).fetchone()[0] == "KILLED"
    con.close()


SLOW_TO_STOP = """
import signal, sys, time
def on_term(*_):
    time.sleep(1.5)  # a trainer recording itself KILLED
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(120)
"""


def _slow_child() -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", SLOW_TO_STOP], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _send_later(*delays_and_signals) -> None:
    import threading

    for delay, sig in delays_and_signals:
        threading.Timer(delay, os.kill, (os.getpid(), sig)).start()


def test_repeated_signals_while_the_runner_stops_a_point_are_held(caplog):
    """A second SIGTERM and a Ctrl-C while ``stop`` waits for the child (which takes 1.5 s to
    record itself) do not cut the wait short; they are logged after it. Outside ``stop`` a
    signal still unwinds, and a stop that no signal caused (a pruned trial) raises the held
    Ctrl-C once the child is down."""
    import signal
    import time

    with E.StopSignals():
        child = _slow_child()
        _send_later((0.3, signal.SIGTERM), (0.6, signal.SIGINT))
        t0 = time.time()
        try:
            raise E.Terminated(signal.SIGTERM)  # the first signal
        except E.Terminated:
            E.stop(child)
        assert child.returncode == 143 and time.time() - t0 >= 1.4
        assert "SIGTERM, SIGINT while the running point stopped" in caplog.text

        child = _slow_child()
        _send_later((0.3, signal.SIGINT))
        with pytest.raises(KeyboardInterrupt):
            E.stop(child)
        assert child.returncode == 143

        with pytest.raises(E.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)


def test_a_point_stopped_during_its_start_up_says_it_left_no_record(env, monkeypatch, caplog):
    """A SIGTERM that kills the child before the trainer installs its handlers (it dies of the
    signal, no run directory) is named in the runner's log, not passed over in silence."""
    import signal

    def no_trainer_yet(*_a, **_k):  # a child still importing: the default SIGTERM action kills it
        _send_later((0.5, signal.SIGTERM))  # to the runner, once the child is there
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)

    monkeypatch.setattr(E, "start_training", no_trainer_yet)
    exp = E.Experiment("ablation", None, base_sets(env, mlflow=False), seeds=1, processes=1, out=env / "exps")
    with E.StopSignals():
        with pytest.raises(E.Terminated):
            E.run_grid(exp, [E.Point("full", [])])
    assert "full/seed0: stopped by SIGTERM during its start-up" in caplog.text
    assert not (env / "exps" / "ablation" / "full" / "seed0" / "final.json").exists()


def test_optuna_search_resumes_from_its_sqlite_study(env):
    import optuna

    tmp = env
    space = tmp / "space.toml"
    space.write_text('[space]\n"train.lr" = {low = 1e-3, high = 1e-1, log = true}\n"model.dim" = {choices = [4, 8]}\n')
    exp = E.Experiment("search", None, base_sets(tmp, mlflow=False), seeds=1, processes=1, out=tmp / "exps", epochs=2)
    assert E.run_search(exp, str(space), 2) == 0
    d = tmp / "exps" / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{d / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    first = {t.number: t.value for t in study.trials}
    assert E.run_search(exp, str(space), 3) == 0
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{d / 'study.db'}")
    assert len(study.trials) == 3
    assert {t.number: t.value for t in study.trials[:2]} == first
    assert [starts(d / "logs" / f"trial{i:04d}.log") for i in range(3)] == [1, 1, 1]
    # each trial's value is its run's validation metric, and per-epoch values were reported;
    # a pruned trial's training was stopped (SIGTERM: recorded KILLED by the trainer)
    for t in study.trials:
        if t.state == optuna.trial.TrialState.PRUNED:
            f = json.loads((d / f"trial{t.number:04d}" / "seed0" / "final.json").read_text())
            # KILLED when the SIGTERM arrived while it trained; FINISHED when its last epoch was
            # already done by then (a race on an idle machine: 2 epochs of a tiny model)
            assert f["status"] in ("KILLED", "FINISHED") and len(t.intermediate_values) >= 1
        f = json.loads((d / f"trial{t.number:04d}" / "seed0" / "final.json").read_text()) \
            if t.state == optuna.trial.TrialState.COMPLETE else None
        if f:
            assert t.value == f["valid"]["recall@10"]
            assert set(t.intermediate_values) == {0, 1}
            cfg = (d / f"trial{t.number:04d}" / "seed0" / "config.toml").read_text()
            assert re.search(rf"^lr = {re.escape(repr(t.params['train.lr']))}$", cfg, re.M)


def test_sparsity_groups_equal_brute_force():
    import numpy as np

    rng = np.random.default_rng(0)
    for trial in range(50):
        counts = rng.integers(0, rng.integers(1, 30), size=rng.integers(1, 60))
        users = np.flatnonzero(rng.random(len(counts)) < 0.7)
        groups = E.sparsity_groups(counts, users, 5)
        if len(users) == 0:
            assert groups == []
            continue
        # brute force: every test user in exactly one range; ranges ordered, contiguous, cover min..max
        for u in users:
            assert sum(lo <= counts[u] <= hi for lo, hi in groups) == 1
        assert groups[0][0] == counts[users].min() and groups[-1][1] == counts[users].max()
        assert all(a[1] + 1 == b[0] for a, b in zip(groups, groups[1:]))
        assert 1 <= len(groups) <= 5
        # with distinct counts and n divisible by 5 the groups have equal size
    counts = np.arange(100)
    groups = E.sparsity_groups(counts, np.arange(100), 5)
    assert groups == [(0, 19), (20, 39), (40, 59), (60, 79), (80, 99)]


def test_sparsity_metrics_of_the_trained_model(env):
    """Per-group metrics of the saved model: all-users equals final.json's test (the model is
    the best-validation one), each group equals the mean of its users evaluated one by one, and
    the groups are the brute-force purchase-count groups. Without model/ the last checkpoint
    is used and all-users equals the trainer's last test record."""
    import numpy as np

    from mbssl_dist.config import load_config
    from mbssl_dist.data import load_prepared
    from mbssl_dist.data.cache import prepared_dir_for
    from mbssl_dist.evaluate import eval_masks, evaluate, heldout_sets

    tmp = env
    exp = E.Experiment("sparsity", None, base_sets(tmp, mlflow=False), seeds=1, processes=1, out=tmp / "exps",
                       epochs=2)
    assert E.run_grid(exp, E.grid("sparsity")) == 0
    run_dir = tmp / "exps" / "sparsity" / "mbssl" / "seed0"
    res = E.sparsity_metrics(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    assert res["source"] == "model" and res["epoch"] == final["best_epoch"]
    for k, v in final["test"].items():
        assert res["all"][k] == pytest.approx(v, rel=1e-9), k
    cfg = load_config(run_dir / "config.toml")
    ds = load_prepared(prepared_dir_for(cfg.data))
    u_t, _ = ds.pairs(ds.n_behaviors - 1)
    counts = {}
    for u in u_t.tolist():
        counts[u] = counts.get(u, 0) + 1
    held = heldout_sets(ds)["test"]
    test_users = [u for u in range(ds.n_users) if held.indptr[u + 1] > held.indptr[u]]
    assert sum(g["n_users"] for g in res["groups"]) == len(test_users)
    _, _, score, _ = E.trained_scorer(run_dir)
    mask = eval_masks(ds)["test"]
    for g in res["groups"]:
        members = [u for u in test_users if g["lo"] <= counts.get(u, 0) <= g["hi"]]
        assert len(members) == g["n_users"]
        per_user = [evaluate(score, np.array([u]), held, mask, ks=cfg.train.ks)["ndcg@50"] for u in members]
        assert g["test"]["ndcg@50"] == pytest.approx(float(np.mean(per_user)), rel=1e-9)
    rep = R.write_report([str(tmp / "exps" / "sparsity")], tmp / "rep")
    assert "## Per user group" in rep.read_text() and (tmp / "rep" / "sparsity.png").is_file()
    assert f"mbssl/seed0: best-validation model, epoch {final['best_epoch']}" in rep.read_text()  # each run's model is named

    shutil.rmtree(run_dir / "model")
    res = E.sparsity_metrics(run_dir)
    last_test = [r for r in R.read_records(run_dir) if r["kind"] == "test"][-1]
    assert res["source"] == "checkpoint" and res["epoch"] == last_test["epoch"] == 1
    for k, v in res["all"].items():
        assert v == pytest.approx(last_test[k], rel=1e-9), k


def test_compare_baseline_points_are_recorded_like_runs(env):
    """A baseline grid point (no subprocess) writes final.json with the evaluator's metrics,
    an MLflow child run under the parent, and is skipped when rerun."""
    from mbssl_dist.baselines import run_baselines
    from mbssl_dist.config import load_config
    from mbssl_dist.data import load_prepared
    from mbssl_dist.data.cache import prepared_dir_for

    tmp = env
    exp = E.Experiment("compare", None, base_sets(tmp, mlflow=True), seeds=1, processes=1, out=tmp / "exps")
    pts = [p for p in E.grid("compare") if p.name in ("popularity", "aux_popularity")]
    assert E.run_grid(exp, pts) == 0
    d = tmp / "exps" / "compare"
    ds = load_prepared(prepared_dir_for(load_config(None, base_sets(tmp, True)).data))
    direct = run_baselines(ds, ["popularity", "aux_popularity"], ks=[10, 50])
    for name in ("popularity", "aux_popularity"):
        f = json.loads((d / name / "seed0" / "final.json").read_text())
        assert f["status"] == "FINISHED"
        assert f["test"] == {k: v for k, v in direct[name]["test"].items() if k != "n_users"}
    mtime = (d / "popularity" / "seed0" / "final.json").stat().st_mtime_ns
    assert E.run_grid(exp, pts) == 0
    assert (d / "popularity" / "seed0" / "final.json").stat().st_mtime_ns == mtime
    parent = json.loads((d / "experiment.json").read_text())["mlflow_parent_run_id"]
    con = sqlite3.connect(tmp / "mlflow.db")
    n = con.execute("select count(*) from tags where key='mlflow.parentRunId' and value=?", (parent,)).fetchone()[0]
    assert n == 2


def test_processes_runs_each_point_under_torchrun(env):
    tmp = env
    exp = E.Experiment("tr", None, base_sets(tmp, mlflow=False) + ['dist.collectives="gloo"'], seeds=1, processes=2,
                       out=tmp / "exps", epochs=1)
    assert E.run_grid(exp, [E.Point("a")]) == 0
    f = json.loads((tmp / "exps" / "tr" / "a" / "seed0" / "final.json").read_text())
    assert f["status"] == "FINISHED" and f["world_size"] == 2


def test_a_finished_run_of_the_defaults_is_reused(tmp_path):
    """The defaults point runs with ``interaction_scoring = "auto"``; its run records what that
    became on the data, and the grid still recognises the finished run as its own."""
    from mbssl_dist.config import load_config, resolve_against_data
    from mbssl_dist.data.cache import ensure_prepared
    from mbssl_dist.data.dataset import MANIFEST
    from mbssl_dist.tracking import to_toml

    sets = TINY[:3] + [f'data.cache_dir="{tmp_path / "cache"}"']
    cfg = load_config(None, sets)
    assert cfg.model.interaction_scoring == "auto"
    ran = load_config(None, sets)
    manifest = json.loads((ensure_prepared(ran.data) / MANIFEST).read_text())
    resolve_against_data(ran, manifest, manifest["behaviors"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(ran.to_dict()))
    (run / "final.json").write_text(json.dumps({"status": "FINISHED"}))
    assert E.check_reusable(run, cfg)
    assert cfg.model.interaction_scoring == "auto"  # the grid's config is not changed by the check
    (run / "config.toml").write_text(to_toml(load_config(None, sets + ["model.dim=16"]).to_dict()))
    with pytest.raises(E.ConfigError, match="model.dim"):
        E.check_reusable(run, cfg)


def test_data_names_a_config_a_dataset_directory_or_synthetic(env):
    """--data DIR runs the built-in default recipe on the dataset there (prepared or text)."""
    import tomllib

    from mbssl_dist.config import load_config
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    tmp = env
    assert E.data_source("synthetic") == (None, [], "synthetic")
    assert E.data_source("configs/beibei.toml") == ("configs/beibei.toml", [], "configs/beibei.toml")
    (tmp / "text").mkdir()
    assert E.data_source(str(tmp / "text"))[1] == ['data.format="text"', f'data.path="{tmp / "text"}"']
    prepare_synthetic(tmp / "syn", SyntheticSpec(n_users=150, n_items=90, n_clusters=4))
    cmd = [sys.executable, "-m", "mbssl_dist.experiments", "sparsity", "--data", str(tmp / "syn"), "--seeds", "1",
           "--epochs", "1", "--out", str(tmp / "exps"), "--set", "run.mlflow=false", "--set", "train.threads=1",
           "--set", "swing.workers=1", "--set", "run.progress=false", "--set", f'data.cache_dir="{tmp / "cache"}"']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp / "exps" / "sparsity" / "mbssl" / "seed0"
    assert json.loads((run / "final.json").read_text())["status"] == "FINISHED"
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["data"]["format"] == "prepared" and saved["data"]["path"] == str(tmp / "syn")
    ref = load_config(None).to_dict()
    assert {k: v for k, v in saved["loss"].items()} == ref["loss"] and saved["hmg"] == ref["hmg"]
    assert json.loads((tmp / "exps" / "sparsity" / "experiment.json").read_text())["data"] == str(tmp / "syn")
    assert (run / "sparsity.json").is_file()
