"""End-to-end trainer: learns the planted synthetic structure, is deterministic, stops on a
non-finite loss with a message naming task/epoch/step, validates its config, logs to MLflow."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from mbssl_dist.train import main

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


def test_non_finite_loss_stops_with_task_epoch_step(tmp_path, caplog):
    rc, out = run(tmp_path, "nan", ["train.epochs=3", "train.lr=1e30", "loss.use_inter=false"])
    assert rc == 3
    final = json.loads((out / "final.json").read_text())
    assert "non-finite loss in task" in final["error"] and "at epoch" in final["error"] and "step" in final["error"]
    err = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"error"' in x]
    assert err and err[0]["task"] in ("rec", "intra", "reg")


@pytest.mark.parametrize("bad, expect", [
    ("train.epochz=3", "unknown field train.epochz"),
    ("model.norm=\"mean\"", "expected one of ['sym', 'row']"),
    ("loss.fn_users=900", "exceed swing.topn"),
    ("loss.lambdas=[1.0, 2.0]", "loss.lambdas has 2 values; the data has 3 behaviors"),
    ("model.interaction_per_item=true", "needs model.interaction_scoring = true"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas = [0.9, 1.0]: need two numbers in [0, 1)"),
])
def test_config_errors_name_the_field(tmp_path, capsys, bad, expect):
    rc, _ = run(tmp_path, "bad", [bad, "train.epochs=1"])
    assert rc == 2
    assert expect in capsys.readouterr().err


def test_mlflow_logging(tmp_path):
    rc, out = run(tmp_path, "ml", ["train.epochs=2", "loss.use_inter=false"], mlflow=True)
    assert rc == 0
    con = sqlite3.connect(tmp_path / "mlflow.db")
    keys = {r[0] for r in con.execute("select key from metrics")}
    params = {r[0] for r in con.execute("select key from params")}
    tags = {r[0]: r[1] for r in con.execute("select key, value from tags")}
    assert {"epoch/loss/rec", "valid/recall_10", "test/ndcg_50", "final/test/recall_10", "epoch/time/seconds"} <= keys
    assert {"train.lr", "model.dim", "loss.tau"} <= params
    assert "git_commit" in tags and len(tags["dataset_sha256"]) == 64
    arts = {p.name for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
    assert {"final.json", "metrics.jsonl", "curves.png", "config.toml"} <= arts


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
    """Every config in configs/ parses and passes validation (data-independent checks)."""
    from mbssl_dist.config import load_config

    cfg = load_config(str(path), [])
    assert cfg.run.name


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
    from mbssl_dist.model import MBSSL, TrainStep
    from mbssl_dist.train import step_config

    cfg = Config()
    cfg.train.adam_betas = [0.8, 0.95]
    model = MBSSL(5, 4, 2, dim=4, n_layers=1, att_dim=2)
    ts = TrainStep(model, step_config(cfg, 2))
    assert ts.state.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
