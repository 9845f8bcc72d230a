"""The trained model as an artifact (issue 10, items 3-5): runs/NAME/model, recommend, evaluate,
the MLflow logged model. Oracles: brute-force top-K of dense scores computed here from the
loaded embeddings, Recall@10 recomputed from the exported lists, final.json, 1 rank vs 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mbssl_dist.data import load_prepared
from mbssl_dist.evaluate import main as evaluate_main
from mbssl_dist.export import load_model, read_model_dir
from mbssl_dist.recommend import main as recommend_main
from mbssl_dist.recommend import topk_block

from .test_train import run

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
ISR = ["train.epochs=3", "train.patience=0", "model.interaction_scoring=true", "model.interaction_per_item=true",
       "loss.use_inter=false"]


@pytest.fixture(scope="module")
def isr(tmp_path_factory):
    """A tiny synthetic run with interaction-aware scoring (per item), logged to MLflow."""
    tmp = tmp_path_factory.mktemp("export")
    rc, out = run(tmp, "isr", ISR, mlflow=True)
    assert rc == 0
    return tmp, out


def read_recs(path: Path) -> dict:
    t = pq.read_table(path).to_pydict()
    out: dict = {}
    for u, r, i, s in zip(t["user"], t["rank"], t["item"], t["score"]):
        out.setdefault(u, []).append((r, i, s))
    for u, rows in out.items():
        assert [r for r, _, _ in rows] == list(range(1, len(rows) + 1)), f"ranks of user {u}"
    return out


def dense_scores(model_dir: Path) -> tuple[np.ndarray, object]:
    """[U, I] eval-mode scores written out from the loaded parameters (not model.score):
    <e_u, e_i * r> + b_i + sum over auxiliary behaviors k of 1[(u,i) in E_k] (w_k + v_k,i)."""
    from mbssl_dist.parallel.comm import LocalComm
    from mbssl_dist.parallel.layout import shard_users

    art = read_model_dir(model_dir)
    ds = load_prepared(art.meta["dataset"])
    model = load_model(art)
    part = shard_users(ds, LocalComm())
    adjs = [part.graph.adjacency(k, art.cfg.model.norm) for k in range(ds.n_behaviors)]
    with torch.no_grad():
        prop = model(adjs, LocalComm())
        s = prop.users[:, -1] @ (prop.items[:, -1] * prop.relations[-1]).T
        if model.use_item_bias:
            s = s + model.item_bias[None, :]
        if model.interaction_scoring:
            for k in range(ds.n_behaviors - 1):
                x = torch.from_numpy(ds.behavior_csr(k).toarray())
                w = model.behavior_weight[k] + (model.behavior_item_weight[k] if model.interaction_per_item else 0.0)
                s = s + x * w
    return s.numpy(), ds


def seen_pairs(ds) -> set:
    tu, ti = ds.pairs(ds.n_behaviors - 1)
    return set(zip(tu.tolist(), ti.tolist())) | set(zip(ds.valid_user.tolist(), ds.valid_item.tolist()))


def brute_topk(s: np.ndarray, k: int, excluded: set) -> dict:
    out = {}
    for u in range(s.shape[0]):
        cand = [(-float(s[u, i]), i) for i in range(s.shape[1]) if (u, i) not in excluded]
        out[u] = [(i, -ns) for ns, i in sorted(cand)[:k]]
    return out


def assert_same_lists(recs: dict, oracle: dict) -> None:
    assert set(recs) == set(oracle)
    for u, rows in oracle.items():
        got = recs[u]
        assert [i for _, i, _ in got] == [i for i, _ in rows], f"user {u}"
        np.testing.assert_allclose([s for _, _, s in got], [s for _, s in rows], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ the artifact


def test_model_dir_is_complete_and_loads_without_training_state(isr):
    _, out = isr
    d = out / "model"
    state = torch.load(d / "weights.pt", weights_only=True)
    meta = json.loads((d / "model.json").read_text())
    final = json.loads((out / "final.json").read_text())
    assert state["user_embedding"].shape == (300, 16) and "item_bias" in state and "behavior_item_weight" in state
    assert meta["best_epoch"] == final["best_epoch"] and meta["test"] == final["test"]
    assert meta["valid"] == final["valid"] and meta["dataset_sha256"] == final["dataset_sha256"]
    assert meta["id_maps"] is None and Path(meta["dataset"]).is_dir()
    assert "interaction_scoring = true" in (d / "config.toml").read_text()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model")]  # no temp dirs left
    m = load_model(d)
    assert not m.training and m.n_users == 300
    assert torch.equal(m.user_embedding.detach(), state["user_embedding"])


def test_topk_block_tie_rule_and_exclusions():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ex = torch.tensor([[False, False, True, False, False], [True, True, True, True, False]])
    r, c = torch.nonzero(ex, as_tuple=True)
    items, vals, counts = topk_block(s, 3, r, c)
    assert items[0].tolist() == [1, 4, 3] and counts.tolist() == [3, 1]
    assert items[1, :1].tolist() == [4] and vals[1, 1:].tolist() == [float("-inf")] * 2
    items, _, _ = topk_block(s, 2)  # ties at the cut: smallest item ids
    assert items.tolist() == [[1, 2], [0, 1]]
    # against sorted() on random blocks with many ties and exclusions
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.randint(0, 4, (7, 13), generator=g).float()
        ex = torch.rand(7, 13, generator=g) < 0.3
        r, c = torch.nonzero(ex, as_tuple=True)
        k = int(torch.randint(1, 15, (1,), generator=g))
        items, vals, counts = topk_block(s, k, r, c)
        for b in range(7):
            want = sorted((-float(s[b, i]), i) for i in range(13) if not ex[b, i])[:k]
            n = int(counts[b])
            assert n == len(want) and items[b, :n].tolist() == [i for _, i in want]
            assert vals[b, :n].tolist() == [-x for x, _ in want]


# ------------------------------------------------------------------------------ recommend


def test_recommend_equals_brute_force_and_excludes_known_purchases(isr, tmp_path):
    _, out = isr
    s, ds = dense_scores(out / "model")
    seen = seen_pairs(ds)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert recommend_main(["--run", str(out), "--k", "10", "--out", str(a), "--batch-size", "37"]) == 0
    recs = read_recs(a)
    assert_same_lists(recs, brute_topk(s, 10, seen))
    assert not {(u, i) for u, rows in recs.items() for _, i, _ in rows} & seen
    assert recommend_main(["--run", str(out), "--k", "10", "--out", str(b), "--include-seen"]) == 0
    recs_all = read_recs(b)
    assert_same_lists(recs_all, brute_topk(s, 10, set()))
    assert {(u, i) for u, rows in recs_all.items() for _, i, _ in rows} & seen  # seen items do come back
    # valid items specifically are excluded too (not only training purchases)
    vu, vi = ds.valid_user.tolist(), ds.valid_item.tolist()
    assert any(i in [x for _, x, _ in recs_all[u]] for u, i in zip(vu, vi))
    assert not any(i in [x for _, x, _ in recs[u]] for u, i in zip(vu, vi))


def test_item_bias_alone_is_saved_loaded_and_recommended(tmp_path):
    """The recipe's item bias without the interaction term (what ``auto`` gives on a split whose
    test items were never in an auxiliary behavior): trained, saved, and scored by recommend as
    <e_u, e_i * r> + b_i, the same lists as the evaluator's Recall@10."""
    rc, out = run(tmp_path, "bias", ["train.epochs=2", "train.patience=0", "model.interaction_scoring=false",
                                     "loss.use_inter=false"])
    assert rc == 0
    model = load_model(out / "model")
    assert model.use_item_bias and not model.interaction_scoring and model.item_bias.abs().sum() > 0
    s, ds = dense_scores(out / "model")
    f = tmp_path / "r.parquet"
    assert recommend_main(["--run", str(out), "--k", "5", "--out", str(f)]) == 0
    recs = read_recs(f)
    assert_same_lists(recs, brute_topk(s, 5, seen_pairs(ds)))
    assert recommend_main(["--run", str(out), "--k", "10", "--out", str(tmp_path / "r10.parquet")]) == 0
    r10 = read_recs(tmp_path / "r10.parquet")
    hits = [int(i in {x for _, x, _ in r10[u]}) for u, i in zip(ds.test_user.tolist(), ds.test_item.tolist())]
    assert sum(hits) / len(hits) == json.loads((out / "final.json").read_text())["test"]["recall@10"]


def test_recall_at_10_from_the_lists_equals_final_json(isr, tmp_path):
    _, out = isr
    f = tmp_path / "r.parquet"
    assert recommend_main(["--run", str(out), "--k", "10", "--out", str(f)]) == 0
    recs = read_recs(f)
    ds = load_prepared(json.loads((out / "model" / "model.json").read_text())["dataset"])
    hits = [int(i in {x for _, x, _ in recs[u]}) for u, i in zip(ds.test_user.tolist(), ds.test_item.tolist())]
    final = json.loads((out / "final.json").read_text())
    assert sum(hits) / len(hits) == final["test"]["recall@10"]


def test_users_subset_keeps_file_order(isr, tmp_path):
    _, out = isr
    users = tmp_path / "users.txt"
    users.write_text("17\n3\n250\n")
    f = tmp_path / "sub.parquet"
    assert recommend_main(["--run", str(out), "--k", "4", "--users", str(users), "--out", str(f)]) == 0
    t = pq.read_table(f).to_pydict()
    assert t["user"] == [17] * 4 + [3] * 4 + [250] * 4 and t["rank"] == [1, 2, 3, 4] * 3
    pq.write_table(pq.read_table(f).select(["user"]).slice(0, 1), tmp_path / "u.parquet")  # a Parquet column
    g = tmp_path / "sub2.parquet"
    assert recommend_main(["--run", str(out), "--k", "4", "--users", str(tmp_path / "u.parquet"), "--out", str(g)]) == 0
    assert pq.read_table(g).to_pydict() == {k: v[:4] for k, v in t.items()}


def test_bad_input_is_one_line_exit_2_and_inputs_are_never_overwritten(isr, tmp_path, capsys):
    _, out = isr
    users = tmp_path / "users.txt"
    users.write_text("1\n2\n999\n")
    f = tmp_path / "x.parquet"

    def err(args):
        rc = recommend_main(args)
        e = capsys.readouterr().err.strip()
        assert rc == 2 and len(e.splitlines()) == 1, e
        return e

    assert f"{users}:3: unknown user id 999" in err(["--run", str(out), "--users", str(users), "--out", str(f)])
    users.write_text("1\nabc\n")
    assert f"{users}:2:" in err(["--run", str(out), "--users", str(users), "--out", str(f)])
    users.write_text("1\n2\n1\n")
    assert f"{users}:3: user '1' listed twice" in err(["--run", str(out), "--users", str(users), "--out", str(f)])
    assert "no such run directory" in err(["--run", str(tmp_path / "nope"), "--out", str(f)])
    (tmp_path / "empty_run").mkdir()
    assert "no saved model" in err(["--run", str(tmp_path / "empty_run"), "--out", str(f)])
    assert not f.exists()
    users.write_text("1\n")
    before = users.read_bytes()
    assert "would overwrite an input" in err(["--run", str(out), "--users", str(users), "--out", str(users),
                                              "--overwrite"])
    assert users.read_bytes() == before
    ds_dir = json.loads((out / "model" / "model.json").read_text())["dataset"]
    assert "would overwrite an input" in err(["--run", str(out), "--out", f"{ds_dir}/train.parquet", "--overwrite"])
    assert "would overwrite an input" in err(["--run", str(out), "--out", str(out / "model" / "weights.pt"),
                                              "--overwrite"])
    assert recommend_main(["--run", str(out), "--k", "2", "--out", str(f)]) == 0
    capsys.readouterr()
    assert "already exists" in err(["--run", str(out), "--k", "3", "--out", str(f)])
    assert recommend_main(["--run", str(out), "--k", "3", "--out", str(f), "--overwrite"]) == 0
    assert max(pq.read_table(f)["rank"].to_pylist()) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------ evaluate


def test_evaluate_reproduces_final_json(isr, capsys):
    _, out = isr
    final = json.loads((out / "final.json").read_text())
    # the fixture's validation peaks before the last epoch: the saved model is the best, not the last
    assert final["best_epoch"] < final["epochs_run"] - 1, final
    assert evaluate_main(["--run", str(out), "--check"]) == 0
    res = json.loads(capsys.readouterr().out)
    for ph in ("valid", "test"):
        assert {k: v for k, v in res[ph].items() if k != "n_users"} == final[ph]
    assert evaluate_main(["--run", str(out), "--split", "test"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "valid" not in res and {k: v for k, v in res["test"].items() if k != "n_users"} == final["test"]


# ------------------------------------------------------------------------------ MLflow


def test_mlflow_logged_model_predicts_like_recommend(isr, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    tmp, out = isr
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("mbssl")
    (r,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'isr'")
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{r.info.run_id}'")
    assert len(models) == 1
    lm = models[0]
    assert lm.source_run_id == r.info.run_id
    best = json.loads((out / "final.json").read_text())
    assert {m.key: m.value for m in lm.metrics}["best/test/recall_10"] == best["test"]["recall@10"]
    pyf = mlflow.pyfunc.load_model(lm.model_uri)
    import pandas as pd

    got = pyf.predict(pd.DataFrame({"user": [5, 0, 299]}), params={"k": 7})
    f = tmp_path / "u.txt"
    f.write_text("5\n0\n299\n")
    ref = tmp_path / "ref.parquet"
    assert recommend_main(["--run", str(out), "--k", "7", "--users", str(f), "--out", str(ref)]) == 0
    pd.testing.assert_frame_equal(got.reset_index(drop=True), pq.read_table(ref).to_pandas())


def test_baselines_log_to_the_same_experiment(isr):
    import mlflow
    from mlflow import MlflowClient

    from mbssl_dist.baselines import main as baselines_main

    tmp, out = isr
    data = json.loads((out / "model" / "model.json").read_text())["dataset"]
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert baselines_main(["--data", data, "--out", str(tmp / "base.json"), "--which", "popularity,lightgcn",
                           "--epochs", "2", "--dim", "8", "--layers", "1", "--eval-every", "1",
                           "--tracking-uri", uri, "--experiment", "mbssl"]) == 0
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("mbssl")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"isr", "popularity", "lightgcn"} <= set(runs)
    res = json.loads((tmp / "base.json").read_text())["results"]
    for name in ("popularity", "lightgcn"):
        m = runs[name].data.metrics
        assert m["final/test/recall_10"] == res[name]["test"]["recall@10"]
        assert set(runs["isr"].data.metrics) & set(m) >= {"final/test/recall_10", "final/test/ndcg_50",
                                                           "test/recall_10", "valid/recall_10"}
        assert runs[name].data.tags["kind"] == "baseline" and runs[name].data.params["baseline"] == name
    assert len(client.get_metric_history(runs["lightgcn"].info.run_id, "valid/recall_10")) == 2


# ------------------------------------------------------------------------------ table data


def test_table_dataset_gives_original_ids(tmp_path, capsys):
    from mbssl_dist.data.__main__ import main as data_main

    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,behavior,timestamp"]
    t = 0
    for u in range(40):
        for _ in range(12):
            t += 1
            lines.append(f"cust-{u:03d},sku-{rng.integers(30):02d}x,{rng.choice(['view', 'view', 'cart', 'buy'])},{t}")
        for _ in range(3):
            t += 1
            lines.append(f"cust-{u:03d},sku-{rng.integers(30):02d}x,buy,{t}")
    csv = tmp_path / "events.csv"
    csv.write_text("\n".join(lines) + "\n")
    prep = tmp_path / "prep"
    assert data_main(["prepare", "--format", "table", "--input", str(csv), "--out", str(prep)]) == 0
    rc, out = run(tmp_path, "tab", ["data.format=\"prepared\"", f'data.path="{prep}"', "train.epochs=2",
                                    "loss.use_inter=false"])
    assert rc == 0
    meta = json.loads((out / "model" / "model.json").read_text())
    assert meta["id_maps"] == {"user": str((prep / "user_map.parquet").resolve()),
                               "item": str((prep / "item_map.parquet").resolve())}
    f = tmp_path / "recs.parquet"
    assert recommend_main(["--run", str(out), "--k", "5", "--out", str(f)]) == 0
    tab = pq.read_table(f)
    assert str(tab.schema.field("user").type) == "string" and str(tab.schema.field("item").type) == "string"
    umap = pq.read_table(prep / "user_map.parquet").to_pydict()
    imap = pq.read_table(prep / "item_map.parquet").to_pydict()
    recs = read_recs(f)
    # the same lists as the dense brute force, mapped through the id maps
    s, ds = dense_scores(out / "model")
    oracle = brute_topk(s, 5, seen_pairs(ds))
    mapped = {umap["id"][u]: [(imap["id"][i], v) for i, v in rows] for u, rows in oracle.items()}
    assert_same_lists(recs, mapped)
    assert all(u.startswith("cust-") for u in recs) and len(recs) == 40
    # --users in original ids; an unknown one names the file and line
    users = tmp_path / "users.txt"
    users.write_text("cust-007\ncust-001\n")
    g = tmp_path / "two.parquet"
    assert recommend_main(["--run", str(out), "--k", "5", "--users", str(users), "--out", str(g)]) == 0
    assert pq.read_table(g)["user"].to_pylist() == ["cust-007"] * 5 + ["cust-001"] * 5
    users.write_text("cust-007\n7\n")
    assert recommend_main(["--run", str(out), "--users", str(users), "--out", str(tmp_path / "z.parquet")]) == 2
    assert f"{users}:2: unknown user id '7'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 2 ranks


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_ranks_save_evaluate_and_recommend_like_one(tmp_path, capsys):
    """Trained at P=2 under torchrun: weights.pt holds the users in global order (= the P=1
    run's to 1e-5), evaluate at P=2 reproduces final.json exactly, and 2-rank recommend equals
    1-rank recommend (one file, the same lists)."""
    from .test_train import SMALL

    extra = ["train.epochs=2", "train.patience=0", "model.interaction_scoring=true", "loss.use_inter=false"]
    rc, one = run(tmp_path, "one", extra)
    assert rc == 0
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    sets = [f'data.cache_dir="{tmp_path / "cache"}"', f'run.output_dir="{tmp_path / "runs"}"', 'run.name="two"',
            "run.mlflow=false"] + SMALL + extra
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "mbssl_dist.train"]
    for x in sets:
        cmd += ["--set", x]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "runs" / "two"
    w1 = torch.load(one / "model" / "weights.pt", weights_only=True)
    w2 = torch.load(two / "model" / "weights.pt", weights_only=True)
    assert json.loads((two / "model" / "model.json").read_text())["trained_world_size"] == 2
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)

    def torchrun(module: str, args: list[str]):
        r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", module] + args,
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    res = json.loads(torchrun("mbssl_dist.evaluate", ["--run-dir", str(two), "--check"]))
    final = json.loads((two / "final.json").read_text())
    for ph in ("valid", "test"):
        assert {k: v for k, v in res[ph].items() if k != "n_users"} == final[ph]
    assert res["rtol"] == 0.0 and res["max_relative_difference"] == 0.0
    # one process re-evaluating the 2-process model: --check within its 1e-4 default tolerance
    capsys.readouterr()
    assert evaluate_main(["--run", str(two), "--check"]) == 0
    res1 = json.loads(capsys.readouterr().out)
    assert res1["rtol"] == 1e-4 and res1["max_relative_difference"] <= 1e-4
    f1, f2 = tmp_path / "r1.parquet", tmp_path / "r2.parquet"
    assert recommend_main(["--run", str(two), "--k", "10", "--out", str(f1)]) == 0
    torchrun("mbssl_dist.recommend", ["--run-dir", str(two), "--k", "10", "--out", str(f2), "--batch-size", "50"])
    a, b = pq.read_table(f1).to_pydict(), pq.read_table(f2).to_pydict()
    assert a["user"] == b["user"] and a["rank"] == b["rank"] and a["item"] == b["item"]
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_save_model_takes_an_eval_history_row(isr, tmp_path):
    """save_model also takes the row shape of training.history.EvalHistory ({"epoch", "valid", "test"})."""
    from types import SimpleNamespace

    from mbssl_dist.export import save_model
    from mbssl_dist.parallel.comm import LocalComm

    _, out = isr
    art = read_model_dir(out / "model")
    ds = load_prepared(art.meta["dataset"])
    run_ = SimpleNamespace(model=load_model(art), part=SimpleNamespace(users=np.arange(ds.n_users)))
    row = {"epoch": 4, "valid": {"recall@10": 0.5}, "test": {"recall@10": 0.25}}
    d = save_model(tmp_path / "model", run_, art.cfg, ds, LocalComm(), row)
    meta = json.loads((d / "model.json").read_text())
    assert (meta["best_epoch"], meta["valid"], meta["test"]) == (4, row["valid"], row["test"])
    w = torch.load(d / "weights.pt", weights_only=True)
    assert all(torch.equal(w[k], art.state[k]) for k in art.state)
