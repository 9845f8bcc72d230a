"""End-to-end trainer: learns the planted synthetic structure, is deterministic, stops on a
non-finite loss with a message naming task/epoch/step, validates its config, logs to MLflow."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mbssl_dist.train import main

from .conftest import require_data

SMALL = ["data.synthetic_users=300", "data.synthetic_items=200", "data.synthetic_clusters=4",
         "model.dim=16", "model.n_layers=2", "train.batch_size=64", "train.lr=0.05", "train.threads=1",
         "swing.topn=20", "swing.workers=1", "loss.fn_users=5", "loss.fn_items=5", "loss.decay=0.01",
         "loss.lambdas=[0.1, 0.3, 0.6]", "run.progress=false"]


def run(tmp: Path, name: str, extra: list[str], mlflow: bool = False) -> tuple[int, Path]:
    args = ["--set", f'data.cache_dir="{tmp / "cache"}"', "--set", f'run.output_dir="{tmp / "runs"}"',
            "--set", f'run.name="{name}"', "--set", f"run.mlflow={'true' if mlflow else 'false'}",
            "--set", f'run.tracking_uri="sqlite:///{tmp / "mlflow.db"}"']
    for x in SMALL + extra:
        args += ["--set", x]
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, tmp / "runs" / name


def popularity_recall(prepared: Path) -> float:
    from mbssl_dist.baselines import run_baselines
    from mbssl_dist.data import load_prepared

    res = run_baselines(load_prepared(prepared), ["popularity"], ks=(10,))
    return res["popularity"]["test"]["recall@10"]


def test_learns_planted_structure_and_is_deterministic(tmp_path):
    rc, out = run(tmp_path, "a", ["train.epochs=12", "train.patience=0"])
    assert rc == 0
    final = json.loads((out / "final.json").read_text())
    prepared = next((tmp_path / "cache").glob("synthetic-*"))
    pop = popularity_recall(prepared)
    assert final["test"]["recall@10"] > pop + 0.2, (final["test"], pop)  # popularity: ~0.26
    assert final["reference_protocol_best_test_epoch"]["test"]["recall@10"] >= final["test"]["recall@10"]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in recs}
    assert {"epoch", "valid", "test"} <= kinds
    ep = [r for r in recs if r["kind"] == "epoch"]
    assert {"loss/rec", "loss/intra", "loss/inter_view", "loss/inter_cart"} <= set(ep[0])
    assert any(k.startswith("hmg/inter_view/") for k in ep[0])
    assert (out / "curves.png").stat().st_size > 1000 and (out / "config.toml").is_file()
    # same seed -> identical metrics.jsonl (the cached data and swing are reused)
    rc, out2 = run(tmp_path, "b", ["train.epochs=12", "train.patience=0"])
    assert rc == 0
    assert (out / "metrics.jsonl").read_text() == (out2 / "metrics.jsonl").read_text()


def test_seed_changes_the_run(tmp_path):
    _, a = run(tmp_path, "a", ["train.epochs=1", "loss.use_inter=false"])
    _, b = run(tmp_path, "b", ["train.epochs=1", "loss.use_inter=false", "train.seed=5"])
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()][0]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()][0]
    assert la["loss/rec"] != lb["loss/rec"]


# lr = 1e30: the first step's Adam update (~lr per entry) makes the second step's rec loss
# NaN; one step per epoch puts that step at epoch 1, step 0 (evaluation only at the end,
# so no evaluation sees the broken model first)
NAN_RUN = ["train.epochs=3", "train.lr=1e30", "loss.use_inter=false", "train.max_steps_per_epoch=1",
           "train.eval_every=10"]
NAN_MSG = "non-finite loss in task 'rec' at epoch 1, step 0 (global step 1)"


def test_non_finite_loss_stops_with_task_epoch_step(tmp_path, capsys):
    rc, out = run(tmp_path, "nan", NAN_RUN)
    assert rc == 3
    final = json.loads((out / "final.json").read_text())
    assert final["error"] == NAN_MSG
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["epoch", "error"]  # epoch 0 finished, then the stop
    assert recs[1] == {"kind": "error", "epoch": 1, "step": 0, "task": "rec", "message": NAN_MSG}
    assert NAN_MSG in capsys.readouterr().err  # the log line (the trainer sets up its own handler)


@pytest.mark.parametrize("bad, expect", [
    ("train.epochz=3", "unknown field train.epochz"),
    ("model.norm=\"mean\"", "expected one of ['sym', 'row']"),
    ("loss.fn_users=900", "exceed swing.topn"),
    ("loss.lambdas=[1.0, 2.0]", "loss.lambdas has 2 values; the data has 3 behaviors"),
    (["model.interaction_scoring=false", "model.interaction_per_item=true"], "needs model.interaction_scoring = true"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas = [0.9, 1.0]: need two numbers in [0, 1)"),
])
def test_config_errors_name_the_field(tmp_path, capsys, bad, expect):
    rc, _ = run(tmp_path, "bad", (bad if isinstance(bad, list) else [bad]) + ["train.epochs=1"])
    assert rc == 2
    assert expect in capsys.readouterr().err


def test_mlflow_logging(tmp_path):
    """The MLflow run holds the same numbers as metrics.jsonl / final.json, at the epoch as
    step, and ends FINISHED."""
    import mlflow
    from mlflow.tracking import MlflowClient

    rc, out = run(tmp_path, "ml", ["train.epochs=3", "loss.use_inter=false"], mlflow=True)
    assert rc == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "mbssl"]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.status == "FINISHED" and r.info.run_name == "ml"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    n_checked = 0
    for rec in recs:
        for k, v in rec.items():
            if k in ("kind", "epoch", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            hist = client.get_metric_history(r.info.run_id, f"{rec['kind']}/{k}".replace("@", "_"))
            at = [m for m in hist if m.step == rec["epoch"]]
            assert len(at) == 1, (rec["kind"], k, rec["epoch"], hist)
            assert at[0].value == pytest.approx(v, rel=1e-6, abs=1e-12), (rec["kind"], k, rec["epoch"])
            n_checked += 1
    kinds = [rec["kind"] for rec in recs]
    assert kinds.count("epoch") == 3 and kinds.count("valid") == 3 and n_checked > 30
    for name in ("epoch/loss/rec", "valid/recall_10", "test/ndcg_50"):
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, name)) == [0, 1, 2]
    final = json.loads((out / "final.json").read_text())
    assert r.data.metrics["final/test/recall_10"] == pytest.approx(final["test"]["recall@10"], rel=1e-6)
    assert r.data.metrics["final/best_epoch"] == final["best_epoch"]
    assert "epoch/time/seconds" in r.data.metrics  # wall time goes to MLflow, not metrics.jsonl
    assert "git_commit" in r.data.tags and len(r.data.tags["dataset_sha256"]) == 64
    arts = {p.name for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
    assert {"final.json", "metrics.jsonl", "curves.png", "config.toml"} <= arts
    del mlflow


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    """Every config in configs/ parses, passes validation, and fits its data: the data
    directory exists with a file per configured behavior and a test file, and the checks
    the trainer runs once the behaviors are known (lambdas / neg_weight per behavior, swing
    weight names) pass. Reads only directory listings, so it runs on every real dataset."""
    from mbssl_dist.config import load_config, validate_against_data
    from mbssl_dist.data.synthetic import SyntheticSpec
    from mbssl_dist.data.text import RESERVED, default_order, discover

    cfg = load_config(str(path), [])
    assert cfg.run.name
    if cfg.data.format == "synthetic":
        behaviors = list(cfg.data.behaviors) or SyntheticSpec().behaviors
    else:
        assert cfg.data.format == "text", "extend this test for other formats"
        data = require_data(Path(cfg.data.path))  # skips (or fails under MBSSL_REQUIRE_DATA=1)
        files = discover(data)
        assert "test" in files, f"{data}: no test.txt[.gz]"
        available = [n for n in files if n not in RESERVED]
        behaviors = list(cfg.data.behaviors) or default_order(available)
        missing = [b for b in behaviors if b not in files]
        assert not missing, f"{path.name}: data.behaviors {missing} have no file in {data} (found {available})"
        if cfg.data.target:
            assert behaviors[-1] == cfg.data.target
    validate_against_data(cfg, behaviors)


def test_run_dir_is_locked_while_a_run_writes_it(tmp_path):
    """Two live runs with the same run.name would interleave metrics.jsonl: the second one
    is refused with a config error naming run.name; after finish the directory is free."""
    from mbssl_dist.config import ConfigError
    from mbssl_dist.tracking import RunLogger

    a = RunLogger(tmp_path / "r", True, False)
    with pytest.raises(ConfigError, match="run.name"):
        RunLogger(tmp_path / "r", True, False)
    a.finish({"ok": 1})
    b = RunLogger(tmp_path / "r", True, False)  # free again
    b.release()


def test_adam_betas_reach_the_optimizer():
    from mbssl_dist.config import Config
    from mbssl_dist.model import MBSSL
    from mbssl_dist.training import TrainStep

    cfg = Config()
    cfg.train.adam_betas = [0.8, 0.95]
    model = MBSSL(5, 4, 2, dim=4, n_layers=1, att_dim=2)
    ts = TrainStep(model, cfg.loss, cfg.hmg, cfg.train)
    assert ts.state.optimizer.param_groups[0]["betas"] == (0.8, 0.95)


def test_built_in_defaults_learn_from_the_first_epoch_and_resume(tmp_path):
    """Only data.* set (the issue's unseen-dataset check, on synthetic data): test R@10 after
    epoch 1 >= 2x popularity; ``auto`` settings are recorded as what ran, so a rerun resumes."""
    args = ["--set", f'data.cache_dir="{tmp_path / "cache"}"', "--set", f'run.output_dir="{tmp_path / "runs"}"',
            "--set", "run.mlflow=false", "--set", "run.progress=false", "--set", "train.threads=1",
            "--set", "data.synthetic_users=300", "--set", "data.synthetic_items=200"]
    assert main(args + ["--set", "train.epochs=1"]) == 0
    out = tmp_path / "runs" / "run"
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    test1 = next(r for r in first if r["kind"] == "test")["recall@10"]
    pop = popularity_recall(next((tmp_path / "cache").glob("synthetic-*")))
    assert test1 >= 2 * pop, (test1, pop)
    import tomllib

    model = tomllib.loads((out / "config.toml").read_text())["model"]
    assert model["interaction_scoring"] is True and model["interaction_per_item"] is True
    assert main(args + ["--set", "train.epochs=2"]) == 0  # resumes: the recorded config matches
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs if r["kind"] == "epoch"] == [0, 1]
    assert recs[:len(first)] == first


def test_lr_decay_lowers_the_rate_after_lr_patience_evaluations_without_improvement():
    """Hand-worked: patience 2, factor 0.5; improvement is strict, as in model selection."""
    from mbssl_dist.config import Config
    from mbssl_dist.model import MBSSL
    from mbssl_dist.training import TrainStep

    cfg = Config()
    cfg.train.lr, cfg.train.lr_decay, cfg.train.lr_patience = 0.01, 0.5, 2
    ts = TrainStep(MBSSL(5, 4, 2, dim=4, n_layers=1, att_dim=2), cfg.loss, cfg.hmg, cfg.train)
    lowered, rates = [], []
    for m in [0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.25, 0.3, 0.31]:
        lowered.append(ts.state.after_evaluation(m))
        rates.append(ts.state.lr)
    assert lowered == [False, False, False, True, False, False, True, False, False]
    assert rates == [0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.0025, 0.0025, 0.0025]
    # the state goes through JSON (a checkpoint's trainer.json) and continues the same way
    import json
    other = TrainStep(MBSSL(5, 4, 2, dim=4, n_layers=1, att_dim=2), cfg.loss, cfg.hmg, cfg.train)
    other.state.load_lr_state(json.loads(json.dumps(ts.state.lr_state())))
    assert other.state.lr == 0.0025
    for m in [0.31, 0.31]:
        assert other.state.after_evaluation(m) == ts.state.after_evaluation(m)
    assert other.state.lr == ts.state.lr == 0.00125
    constant = TrainStep(MBSSL(5, 4, 2, dim=4, n_layers=1, att_dim=2), cfg.loss, cfg.hmg, Config().train)
    assert not any(constant.state.after_evaluation(0.1) for _ in range(5)) and constant.state.lr == Config().train.lr


def _connect(db: str) -> None:
    from mbssl_dist import tracking

    tracking.connect(f"sqlite:///{db}", "race")


def test_runs_started_at_once_on_a_fresh_mlflow_store_all_connect(tmp_path):
    """Two grids (or torchrun jobs) started together on a new SQLite store: MLflow's schema
    creation raced ("duplicate column name", "table ... already exists"): 3-4 of 4 processes
    failed before the first-touch lock."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_connect, args=(str(tmp_path / "mlflow.db"),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
