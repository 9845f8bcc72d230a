"""mbssl_dist.report reads run directories the way the trainer writes them (it replaced
tools/report_runs.py); tools/bench_vs_authors.py's schedule, ratios and JSON on a fake run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mbssl_dist.report", *args], capture_output=True, text=True,
                          check=True, cwd=ROOT).stdout


def test_report_per_epoch(tmp_path):
    d = tmp_path / "r1"
    d.mkdir()
    recs = [{"epoch": 0, "kind": "epoch", "hmg/intra/norm_ratio": 1234.5},
            {"epoch": 0, "kind": "valid", "recall@10": 0.9},
            {"epoch": 0, "kind": "test", "recall@10": 0.0125},
            {"epoch": 1, "kind": "epoch", "hmg/intra/norm_ratio": 3.0},
            {"epoch": 1, "kind": "test", "recall@10": 0.25}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = _report("--per-epoch", "recall@10", str(d), str(tmp_path / "missing")).strip().splitlines()
    assert lines[0].startswith("| run | epoch 1 | epoch 2 |")
    assert lines[2] == "| r1 | 0.0125 | 0.2500 | 1.23e+03 |"
    assert lines[3] == "| missing |  |  |  |"


def test_report_final_table_of_run_dirs(tmp_path):
    for name, r10, status in (("x", 0.125, "FINISHED"), ("y", 0.5, "FINISHED"), ("z", 0.9, "KILLED")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final.json").write_text(json.dumps(
            {"status": status, "test": {"recall@10": r10, "ndcg@10": 1 - r10, "n_users": 5}}))
    out = _report(str(tmp_path / "x"), str(tmp_path / "y"), str(tmp_path / "z"), str(tmp_path / "nope"))
    lines = out.strip().splitlines()
    assert lines[0] == "| point | recall@10 | ndcg@10 | seeds |"
    assert lines[2] == "| x | 0.1250 | **0.8750** | 1 |"
    assert lines[3] == "| y | **0.5000** | 0.5000 | 1 |"
    assert lines[4] == "| z |  |  | 0 |"
    assert "z/- (status KILLED)" in out and "nope/- (no final.json)" in out


def _load_bench_vs_authors():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vs_authors", ROOT / "tools" / "bench_vs_authors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_refbench(layers, batch, mean):
    return "REFBENCH " + json.dumps({
        "users": 21716, "items": 7977, "behs": ["cart", "train"], "batch_size": batch, "layers": layers,
        "batches_per_epoch": 21716 // batch, "warmup": 1, "timed_batches": 2, "batch_mean_s": mean,
        "batch_min_s": mean * 0.9, "batch_max_s": mean * 1.1, "aug_views_s": 0.5,
        "epoch_s_extrapolated": 0.5 + (21716 // batch) * mean, "threads": 1, "maxrss_mib": 9000.0,
        "rss_now_mib": 7000.0, "load1": 1.0})


def test_bench_vs_authors_schedule_summary_and_json(tmp_path, monkeypatch, capsys):
    """Argument checks, the interleaved schedule, ratios and the JSON, on a fake run: our side
    and the authors' loop are replaced by stubs (the real authors' code needs a fetch of
    Scofield666/MBSSL and ~10 GB: not run in CI). The authors' side still goes through a
    subprocess: a fake run_ref_bench.sh that prints REFBENCH lines."""
    bva = _load_bench_vs_authors()
    data = tmp_path / "beibei"
    data.mkdir()
    (data / "manifest.json").write_text("{}")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "HEAD").write_text("ref: refs/heads/master\n")
    fake = tmp_path / "fake_ref.sh"
    # the fake authors: s/batch 4 with 2 layers, 8 with 4 (LAYERS is '[64,64]' or '[64,64,64,64]')
    fake.write_text("#!/bin/bash\nset -e\n"
                    "n=$(echo \"$LAYERS\" | tr -cd ',' | wc -c); n=$((n + 1))\n"
                    "echo noise line\n"
                    "python3 -c \"import json,sys; n=int(sys.argv[1]); b=int(sys.argv[2]); m=4.0*n/2; "
                    "print('REFBENCH ' + json.dumps({'users': 21716, 'items': 7977, 'behs': [], 'batch_size': b, "
                    "'layers': n, 'batches_per_epoch': 21716 // b, 'warmup': 1, 'timed_batches': int(sys.argv[3]), "
                    "'batch_mean_s': m, 'batch_min_s': m, 'batch_max_s': m, 'aug_views_s': 0.0, "
                    "'epoch_s_extrapolated': (21716 // b) * m, 'threads': 1, 'maxrss_mib': 9000.0, "
                    "'rss_now_mib': 1.0, 'load1': 1.0}))\" $n $BATCH $STEPS\n")
    calls = []

    def fake_ours(data_, layers, batch, sets, threads, steps, warmup, python):
        calls.append(("ours", layers, batch, tuple(sets)))
        n = -(-21716 // batch)
        mean = 0.5 if batch == 256 else 2.0
        return {"step_mean_s": mean, "step_min_s": mean, "timed_steps": steps, "steps_per_epoch": n,
                "views_s": 0.0, "epoch_s": n * mean, "extrapolated": True, "threads": threads,
                "peak_rss_mib": 1500.0}

    monkeypatch.setattr(bva, "run_ours", fake_ours)
    out_json = tmp_path / "b.json"
    rc = bva.main(["--data", str(data), "--mirror", str(mirror), "--ref-script", str(fake), "--work",
                   str(tmp_path / "w"), "--steps", "2", "--rounds", "2", "--json-out", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "EXTRAPOLATED" in out
    # ours (a), authors L2, ours (b), ours (c), authors L4, twice
    res = json.loads(out_json.read_text())
    order = [(r["side"], r["comparison"]) for r in res["runs"]]
    assert order == [("ours", "a"), ("authors", "a"), ("ours", "b"), ("ours", "c"), ("authors", "c")] * 2
    assert calls[:3] == [("ours", 2, 256, ()), ("ours", 2, 2048, ()), ("ours", 2, 2048, ("hmg.relax=1.0",))]
    s = res["summary"]
    # (a): authors 84 x 4 s vs ours 85 x 0.5 s; (b): the same authors' run vs 11 x 2 s; (c): 84 x 8 s vs 22 s
    assert s["a"]["rounds"][0]["speedup"] == pytest.approx(84 * 4 / (85 * 0.5))
    assert s["b"]["rounds"][1]["speedup"] == pytest.approx(84 * 4 / 22)
    assert s["c"]["rounds"][0]["speedup"] == pytest.approx(84 * 8 / 22)
    assert s["c"]["rounds"][0]["rss_ratio"] == pytest.approx(6.0)
    assert f"**{84 * 8 / 22:.1f}x**" in out
    assert bva.parse_authors_output("x\n" + _fake_refbench(2, 256, 5.0) + "\nSUMMARY y\n")[0]["layers"] == 2


def test_bench_vs_authors_bad_input(tmp_path):
    """Bad input: one line on stderr, exit 2."""
    for args in (["--only", "x"], ["--steps", "0"], ["--data", str(tmp_path / "none")]):
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_vs_authors.py"), *args],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not os.environ.get("MBSSL_AUTHORS_MIRROR"),
                    reason="needs a bare fetch of Scofield666/MBSSL in $MBSSL_AUTHORS_MIRROR, ~10 GB and ~3 min "
                           "(not in CI)")
def test_bench_vs_authors_real_smoke(tmp_path):
    """One real round of comparison (a), 1 timed step per side: the authors' code rebuilds and
    runs, and both sides report (opt-in: MBSSL_AUTHORS_MIRROR=<bare git dir>; the pv-less Beibei
    is prepared here)."""
    data = tmp_path / "beibei"
    subprocess.run([sys.executable, "-m", "mbssl_dist.data", "prepare", "--format", "text", "--input",
                    str(ROOT.parent / "shared" / "data" / "incomplete" / "Beibei"), "--behaviors", "cart,buy",
                    "--n-users", "21716", "--n-items", "7977", "--out", str(data)], check=True, cwd=ROOT,
                   capture_output=True)
    out_json = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_vs_authors.py"), "--data", str(data),
                        "--mirror", os.environ["MBSSL_AUTHORS_MIRROR"], "--work", str(tmp_path / "w"),
                        "--only", "a", "--rounds", "1", "--steps", "1", "--warmup", "0", "--json-out", str(out_json)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    s = json.loads(out_json.read_text())["summary"]["a"]["rounds"][0]
    assert s["speedup"] > 0 and s["authors_peak_rss_mib"] > 0


def test_bench_ssl_floor_records_the_timed_sweeps(tmp_path):
    """--floor sets each timed SSL step beside the bare GEMM + exp operations of exactly its own
    InfoNCE sweeps: intra and one inter task per auxiliary behavior, a user and an item side each."""
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    prepare_synthetic(tmp_path / "syn", SyntheticSpec(n_users=120, n_items=80, n_clusters=4))
    r = subprocess.run([sys.executable, "tools/bench_ssl.py", "--floor", "--data", str(tmp_path / "syn"),
                        "--batch-size", "32", "--rounds", "1", "--steps", "1", "--set", "model.dim=8",
                        "--set", "swing.topn=10", "--set", f'data.cache_dir="{tmp_path / "cache"}"'],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("round 0"))
    sweeps = json.loads(line.split("sweeps ")[1].split(")")[0])
    K = 3  # the synthetic default: view, cart, buy
    assert len(sweeps) == 2 * (1 + (K - 1))
    assert {c for _, c, _ in sweeps} == {120, 80} and {d for _, _, d in sweeps} == {8}
    assert float(line.split("SSL / floor ")[1].split(",")[0]) > 0


def test_hits_by_aux_against_the_evaluator(tmp_path):
    """Given aux-popularity's own top-K as the 'model', both columns agree in every group, nothing is
    'only' one side's, and the overall figure is the evaluator's aux-popularity Recall@K."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    sys.path.insert(0, str(ROOT / "tools"))
    import hits_by_aux as H
    from mbssl_dist.baselines import run_baselines
    from mbssl_dist.data import load_prepared
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    prepare_synthetic(tmp_path / "syn", SyntheticSpec(n_users=150, n_items=90, n_clusters=4))
    ds = load_prepared(tmp_path / "syn")
    bu, bi = ds.pairs(ds.n_behaviors - 1)
    known = sp.csr_matrix((np.ones(len(bu) + len(ds.valid_user)), (np.r_[bu, ds.valid_user], np.r_[bi, ds.valid_item])),
                          shape=(ds.n_users, ds.n_items))
    users = np.unique(ds.test_user).astype(np.int64)
    top = H.aux_pop_topk(ds, known, users, 5)
    pd.DataFrame({"user": np.repeat(users, 5), "rank": np.tile(np.arange(1, 6), len(users)),
                  "item": top.ravel(), "score": np.zeros(top.size)}).to_parquet(tmp_path / "recs.parquet")
    r = subprocess.run([sys.executable, "tools/hits_by_aux.py", "--data", str(tmp_path / "syn"), "--recs",
                        str(tmp_path / "recs.parquet"), "--k", "5"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x.split("|")[1].strip(): [float(v) for v in x.split("|")[2:8]] for x in r.stdout.splitlines()
            if x.startswith("| ") and not x.startswith("| test pairs")}
    for share, model, pop, both, only_m, only_p in rows.values():
        assert model == pop == both and only_m == only_p == 0.0
    want = run_baselines(ds, ["aux_popularity"], ks=(5,))["aux_popularity"]["test"]["recall@5"]
    assert rows["all"][1] == pytest.approx(want, abs=1e-4)
    assert rows["in an auxiliary behavior"][1] + rows["in no auxiliary behavior"][1] == pytest.approx(rows["all"][1], abs=2e-4)


def test_split_shift_against_brute_force(tmp_path):
    """The held-out item statistics equal a pair-by-pair loop; aux-popularity's row is the
    evaluator's baseline figure; aux-conversion (AuxPopularityScorer with ``within``) orders the
    cart level by the brute-force rate and leaves the items in no auxiliary behavior by popularity."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tools"))
    import split_shift as S
    from mbssl_dist.baselines import run_baselines
    from mbssl_dist.data import load_prepared
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    prepare_synthetic(tmp_path / "syn", SyntheticSpec(n_users=150, n_items=90, n_clusters=4))
    ds = load_prepared(tmp_path / "syn")
    K = ds.n_behaviors
    cart = set(zip(*(x.tolist() for x in ds.pairs(K - 2))))
    buy = set(zip(*(x.tolist() for x in ds.pairs(K - 1))))
    buys = {i: sum(1 for _, j in buy if j == i) for i in range(ds.n_items)}
    rate = len(cart & buy) / len(cart)
    conv = [(sum(1 for p in cart if p[1] == i and p in buy) + 5 * rate) / (sum(1 for p in cart if p[1] == i) + 5)
            for i in range(ds.n_items)]
    assert S.conversion(ds, 5.0) == pytest.approx(conv, rel=1e-12)
    st = S.shift_stats(ds, np.asarray(conv))
    for ph, (us, it) in {"valid": (ds.valid_user, ds.valid_item), "test": (ds.test_user, ds.test_item)}.items():
        pairs = sorted(set(zip(us.tolist(), it.tolist())))
        in_aux = [p in cart for p in pairs]
        assert st[ph]["pairs"] == len(pairs)
        assert st[ph]["in_closest_aux"] == pytest.approx(np.mean(in_aux))
        assert st[ph]["median_buys"] == np.median([buys[i] for _, i in pairs])
        assert st[ph]["conversion"] == pytest.approx(np.mean([conv[i] for _, i in pairs]))
        assert st[ph]["conversion_in_aux"] == pytest.approx(np.mean([conv[i] for (_, i), a in zip(pairs, in_aux) if a]))
    rm = S.rule_metrics(ds, 5, np.asarray(conv))
    want = run_baselines(ds, ["aux_popularity"], ks=(5,))["aux_popularity"]
    for ph in ("valid", "test"):
        assert rm["aux-popularity"][ph]["recall@5"] == pytest.approx(want[ph]["recall@5"], abs=1e-12)
    import torch

    from mbssl_dist.baselines import AuxPopularityScorer

    u = max(range(ds.n_users), key=lambda v: sum(1 for w, _ in cart if w == v))  # the most carted items
    mine = sorted(i for v, i in cart if v == u)
    by_conv = sorted(mine, key=lambda i: (-conv[i], i))
    assert by_conv != sorted(mine, key=lambda i: (-buys[i], i))  # else the check below could not fail
    score = AuxPopularityScorer(ds, within=np.asarray(conv))(torch.tensor([u]))[0].numpy()
    top = float(K - 1)  # the closest behavior's level
    assert all(score[i] >= top for i in mine) and all(score[i] < top for i in range(ds.n_items) if (u, i) not in cart)
    assert sorted(mine, key=lambda i: (-score[i], i)) == by_conv
    aux_items = {i for k in range(K - 1) for v, i in zip(*(x.tolist() for x in ds.pairs(k))) if v == u}
    rest = [i for i in range(ds.n_items) if i not in aux_items]  # in no auxiliary behavior: by popularity
    assert sorted(rest, key=lambda i: (-score[i], i)) == sorted(rest, key=lambda i: (-buys[i], i))
    n_cart = [sum(1 for _, j in cart if j == i) for i in range(ds.n_items)]
    assert S.closest_aux_count(ds).tolist() == n_cart
    by_count = AuxPopularityScorer(ds, within=np.asarray(n_cart, dtype=float))(torch.tensor([u]))[0].numpy()
    want_c = rm["aux-closest-count"]
    assert sorted(mine, key=lambda i: (-n_cart[i], i)) != sorted(mine, key=lambda i: (-buys[i], i))
    assert sorted(mine, key=lambda i: (-by_count[i], i)) == sorted(mine, key=lambda i: (-n_cart[i], i))
    from mbssl_dist.evaluate import eval_split, evaluate

    for ph in ("valid", "test"):  # the row is that scorer's (the tool's wiring)
        users, h, mask = eval_split(ds, ph)
        got = evaluate(AuxPopularityScorer(ds, within=np.asarray(n_cart, dtype=float)),
                       torch.from_numpy(users), h, mask, ks=(5,))
        assert want_c[ph]["recall@5"] == pytest.approx(got["recall@5"], abs=1e-12)
    with pytest.raises(ValueError, match="within"):
        AuxPopularityScorer(ds, within=-np.ones(ds.n_items))


@pytest.mark.parametrize("cmd", [["tools/hits_by_aux.py", "--data", "NOPE", "--recs", "r.parquet"],
                                 ["tools/split_shift.py", "--data", "NOPE"],
                                 ["tools/bench_ssl.py", "--floor", "--data", "NOPE"]])
def test_measurement_tools_refuse_a_wrong_data_path_in_one_line(tmp_path, cmd):
    cmd = [str(tmp_path / "nope") if x == "NOPE" else x for x in cmd]
    r = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "nope" in r.stderr.strip().splitlines()[-1] and "manifest.json" in r.stderr


def test_hmg_first_step_runs_and_refuses_a_used_out(tmp_path):
    out = tmp_path / "hmg"
    cmd = [sys.executable, "tools/hmg_first_step.py", "--configs", "configs/synthetic.toml", "--budget", "0", "0.1",
           "--out", str(out), "--set", f'data.cache_dir="{tmp_path / "cache"}"']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [x.split("|") for x in r.stdout.splitlines() if x.startswith("| synthetic")]
    assert {x[2].strip() for x in rows} == {"0", "0.1"} and {x[3].strip() for x in rows} >= {"intra"}
    assert all(float(x[4]) > 0 for x in rows)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "is not empty" in r.stderr


def test_bench_scaling_auto_batch_sizes_each_graph_and_its_log_reads_back(tmp_path):
    """--batch-size 0 gives each size the train.batch_size = 0 batch (~16 steps per epoch; 128 is
    its floor, so 1,000 users get 8 steps); --from-log reads the batch back (older logs: 1024)."""
    log = tmp_path / "out.log"
    p = subprocess.run([sys.executable, "tools/bench_scaling.py", "--base-users", "1000", "--users", "1000", "2000",
                        "--batch-size", "0", "--steps", "1", "--modes", "sampled", "sampled-own",
                        "--cache", str(tmp_path / "c"),
                        "--set", "loss.n_negatives=64"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    log.write_text(p.stdout)
    rows = [ln.split() for ln in p.stdout.splitlines() if "phases/step" in ln]
    assert [(r[0], r[3], r[9]) for r in rows] == [
        ("1000", "sampled", "batch=128x8"), ("1000", "sampled-own", "batch=128x8"),
        ("2000", "sampled", "batch=128x16"), ("2000", "sampled-own", "batch=128x16")]
    old = tmp_path / "old.log"  # the pre-auto format, without the batch column
    old.write_text("\n".join(" ".join(r[:9]) + "  phases/step {'loss/intra': 0.1}" for r in rows if r[3] == "sampled"))
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_scaling as B

    back = B.from_log(str(log))
    for mode in ("sampled", "sampled-own"):
        assert [x["steps_per_epoch"] for x in back[mode]] == [8, 16]
    assert "sampled / sampled-own epoch time" in p.stdout
    assert [x["steps_per_epoch"] for x in B.from_log(str(old))["sampled"]] == [1, 2]
