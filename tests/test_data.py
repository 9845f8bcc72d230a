"""Data layer: importers, validation split, prepared directory, bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mbssl_dist.data import DataError, load_prepared
from mbssl_dist.data.__main__ import main as data_main
from mbssl_dist.data.prepare import prepare_synthetic, prepare_table, prepare_text
from mbssl_dist.data.synthetic import SyntheticSpec

from .conftest import REPO


def write(d: Path, name: str, text: str, gz: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / (name + (".txt.gz" if gz else ".txt"))
    if gz:
        with gzip.open(p, "wt") as f:
            f.write(text)
    else:
        p.write_text(text)
    return p


def good_text_dir(d: Path) -> Path:
    write(d, "view", "0 1 2 3\n1 0 2\n2 3 4\n", gz=True)
    write(d, "cart", "0 1 3\n2 4\n")
    write(d, "buy", "0 1 3\n1 0 2\n2 4 3\n")
    write(d, "test", "0 2\n1 4\n2 0\n")
    return d


# ---------------------------------------------------------------- good input


def test_text_roundtrip(tmp_path):
    src = good_text_dir(tmp_path / "in")
    ds = prepare_text(src, tmp_path / "out", seed=3)
    back = load_prepared(tmp_path / "out")
    assert back.behaviors == ["view", "cart", "buy"]
    assert (back.n_users, back.n_items) == (3, 5)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["counts_input"] == {"view": 7, "cart": 3, "buy": 6}
    assert m["counts"]["buy"] == 3 and m["n_valid"] == 3 and m["n_test"] == 3
    assert len(m["inputs"]) == 4 and all(len(x["sha256"]) == 64 for x in m["inputs"])
    # train + valid of the target == input buy pairs
    bu, bi = back.pairs(2)
    got = set(zip(bu.tolist(), bi.tolist())) | set(zip(back.valid_user.tolist(), back.valid_item.tolist()))
    assert got == {(0, 1), (0, 3), (1, 0), (1, 2), (2, 4), (2, 3)}
    t = pq.read_table(tmp_path / "out" / "train.parquet")
    assert str(t.schema.field("user").type) == "int32" and str(t.schema.field("behavior").type) == "int8"
    assert ds.checksum() == back.checksum() != ""


def test_validation_split_rules():
    from mbssl_dist.data.split import carve_validation

    users = np.array([0, 0, 0, 1, 2, 2])
    items = np.array([5, 6, 7, 1, 3, 4])
    keep, vidx = carve_validation(users, items, seed=1)
    assert sorted(users[vidx].tolist()) == [0, 2]          # user 1 has one purchase: keeps it
    assert keep.sum() == 4 and not keep[vidx].any()
    keep2, vidx2 = carve_validation(users, items, seed=1)
    assert (vidx == vidx2).all()                              # seeded: same choice
    choices = {tuple(carve_validation(users, items, seed=s)[1]) for s in range(20)}
    assert len(choices) > 1                                   # and the seed matters
    _, vts = carve_validation(users, items, seed=1, timestamps=np.array([3, 9, 1, 0, 2, 1]))
    assert vts.tolist() == [1, 4]                             # latest per user


def test_synthetic_deterministic_and_planted(tmp_path):
    a = prepare_synthetic(tmp_path / "a", SyntheticSpec(seed=5))
    b = prepare_synthetic(tmp_path / "b", SyntheticSpec(seed=5))
    c = prepare_synthetic(tmp_path / "c", SyntheticSpec(seed=6))
    assert a.checksum() == b.checksum() != c.checksum()
    # auxiliary behaviors are noisy supersets: most target pairs also appear in view
    key = lambda u, i: set(zip(u.tolist(), i.tolist()))
    buy, view = key(*a.pairs(2)), key(*a.pairs(0))
    assert len(buy & view) / len(buy) > 0.6
    assert len(view) > 2 * len(buy)


def test_table_import_string_ids_and_timestamps(tmp_path):
    csv = tmp_path / "log.csv"
    rows = ["user_id,item_id,behavior,timestamp"]
    for u in ["alice", "bob"]:
        for t, it in enumerate(["apple", "pear", "fig", "kiwi"]):
            rows.append(f"{u},{it},buy,{t}")
            rows.append(f"{u},{it},view,{t}")
    rows.append("alice,apple,buy,0")  # repeated row: merged and counted
    rows.append("carol,fig,buy,1")     # single purchase: no test item
    csv.write_text("\n".join(rows) + "\n")
    ds = prepare_table(csv, tmp_path / "out")
    umap = pq.read_table(tmp_path / "out" / "user_map.parquet").to_pydict()
    imap = pq.read_table(tmp_path / "out" / "item_map.parquet").to_pydict()
    names = dict(zip(umap["index"], umap["id"]))
    inames = dict(zip(imap["index"], imap["id"]))
    test = {names[u]: inames[i] for u, i in zip(ds.test_user.tolist(), ds.test_item.tolist())}
    valid = {names[u]: inames[i] for u, i in zip(ds.valid_user.tolist(), ds.valid_item.tolist())}
    assert test == {"alice": "kiwi", "bob": "kiwi"}      # last by timestamp
    assert valid == {"alice": "fig", "bob": "fig"}       # second last
    assert ds.manifest["table"]["duplicate_rows_merged"] == 1
    assert ds.manifest["table"]["users_without_test (single target interaction)"] == 1
    assert ds.behaviors == ["view", "buy"]


# ---------------------------------------------------------------- bad input

BAD_TEXT = {
    "non_integer_item": ("buy", "0 1 x\n", "buy.txt:1", "not an integer"),
    "negative_id": ("buy", "0 1\n-1 2\n", "buy.txt:2", "negative"),
    "user_line_twice": ("buy", "0 1\n1 2\n0 3\n", "buy.txt:3", "already has a line"),
    "item_twice_on_line": ("buy", "0 1 1\n", "buy.txt:1", "listed twice"),
    "empty_behavior_file": ("cart", "\n", "cart.txt", "no interactions"),
    "test_three_fields": ("test", "0 1 2\n", "test.txt:1", "2 fields"),
    "test_duplicate_user": ("test", "0 2\n1 3\n0 3\n", "test.txt:3", "duplicate test entry"),
    "test_user_no_train": ("test", "0 2\n9 3\n", "test.txt", "no training interactions"),
    "test_pair_in_train": ("test", "0 1\n", "test.txt", "also occur in the training"),
    "test_empty": ("test", "", "test.txt", "empty"),
}


def make_dir(d: Path, override: tuple[str, str]) -> Path:
    files = {"cart": "0 1\n1 2\n", "buy": "0 1 2\n1 2 3\n", "test": "0 3\n1 0\n"}
    files[override[0]] = override[1]
    for k, v in files.items():
        write(d, k, v)
    return d


@pytest.mark.parametrize("case", sorted(BAD_TEXT))
def test_bad_text_input(tmp_path, case):
    name, content, where, what = BAD_TEXT[case]
    src = make_dir(tmp_path / "in", (name, content))
    with pytest.raises(DataError) as ei:
        prepare_text(src, tmp_path / "out")
    msg = str(ei.value)
    assert where in msg and what in msg, msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp left


def test_id_beyond_declared_count(tmp_path):
    src = make_dir(tmp_path / "in", ("buy", "0 1 2\n1 2 7\n"))
    with pytest.raises(DataError, match=r"buy.txt:2.*out of range: declared n_items = 5"):
        prepare_text(src, tmp_path / "out", n_items=5)


def test_corrupt_gzip(tmp_path):
    src = make_dir(tmp_path / "in", ("buy", "0 1 2\n1 2 3\n"))
    (src / "buy.txt").unlink()
    data = gzip.compress(b"0 1 2\n1 2 3\n" * 200)
    (src / "buy.txt.gz").write_bytes(data[: len(data) // 2] + b"\x00garbage")
    with pytest.raises(DataError, match=r"buy.txt.gz: cannot read file"):
        prepare_text(src, tmp_path / "out")


def test_unknown_and_duplicate_behavior_names(tmp_path):
    src = make_dir(tmp_path / "in", ("buy", "0 1 2\n1 2 3\n"))
    with pytest.raises(DataError, match="unknown behavior 'fav'"):
        prepare_text(src, tmp_path / "o1", behaviors=["fav", "buy"])
    with pytest.raises(DataError, match="duplicate behavior name"):
        prepare_text(src, tmp_path / "o2", behaviors=["cart", "cart", "buy"])
    write(src, "wobble", "0 1\n")
    with pytest.raises(DataError, match="cannot order unknown behavior"):
        prepare_text(src, tmp_path / "o3")


def test_target_missing(tmp_path):
    src = make_dir(tmp_path / "in", ("buy", "0 1 2\n1 2 3\n"))
    with pytest.raises(DataError, match="target behavior 'purchase' has no file"):
        prepare_text(src, tmp_path / "out", target="purchase")
    with pytest.raises(DataError, match="must be last"):
        prepare_text(src, tmp_path / "out", behaviors=["buy", "cart"], target="buy")


def test_no_behavior_files_and_missing_dir(tmp_path):
    d = tmp_path / "in"
    write(d, "test", "0 1\n")
    with pytest.raises(DataError, match="no behavior files"):
        prepare_text(d, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        prepare_text(tmp_path / "nope", tmp_path / "out")


def test_gz_and_plain_both_present(tmp_path):
    src = make_dir(tmp_path / "in", ("buy", "0 1 2\n1 2 3\n"))
    write(src, "buy", "0 1 2\n1 2 3\n", gz=True)
    with pytest.raises(DataError, match="both buy.txt and buy.txt.gz"):
        prepare_text(src, tmp_path / "out")


def test_test_pair_in_train_drop_and_report(tmp_path):
    src = make_dir(tmp_path / "in", ("test", "0 1\n1 0\n"))
    ds = prepare_text(src, tmp_path / "out", on_test_in_train="drop")
    assert ds.manifest["dropped"] == {"test_pairs_removed_from_train": 1}
    bu, bi = ds.pairs(1)
    assert (0, 1) not in set(zip(bu.tolist(), bi.tolist()))


BAD_TABLE = {
    "missing_column": ("user_id,item,behavior\na,b,buy\n", "missing column"),
    "empty_id": ("user_id,item_id,behavior\na,x,buy\n,y,buy\n", "log.csv:3 (field 'user_id'): empty user_id"),
    "unknown_behavior": ("user_id,item_id,behavior\na,x,buy\na,y,wink\n", "cannot order unknown behavior"),
    "no_rows": ("user_id,item_id,behavior\n", "no rows"),
    "bad_timestamp": ("user_id,item_id,behavior,timestamp\na,x,buy,1\na,y,buy,noon\n", "timestamp"),
    "no_target": ("user_id,item_id,behavior\na,x,view\na,y,cart\n", "buy"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLE))
def test_bad_table_input(tmp_path, case):
    content, what = BAD_TABLE[case]
    p = tmp_path / "log.csv"
    p.write_text(content)
    with pytest.raises(DataError) as ei:
        prepare_table(p, tmp_path / "out", behaviors=["view", "cart", "buy"] if case == "no_target" else None)
    assert what in str(ei.value), str(ei.value)
    assert not (tmp_path / "out").exists()


def test_cli_malformed_exits_nonzero_with_file_and_line(tmp_path):
    src = make_dir(tmp_path / "in", ("buy", "0 1 2\n1 2 oops\n"))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mbssl_dist.data", "prepare", "--format", "text", "--input", str(src),
                        "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "buy.txt:2" in r.stderr and "'oops' is not an integer" in r.stderr
    assert not out.exists()


def test_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out"
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out)]) == 0
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out)]) == 2
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out), "--overwrite", "--seed", "1"]) == 0


# ---------------------------------------------------------------- real data

# (dir, n_users, n_items, counts as read, test users) from ../shared/data/README.md
REAL = {
    "Taobao_MBCGCN": (15449, 11953, {"view": 873954, "cart": 195476, "buy": 92180}, 15449),
    "Retailrocket": (2174, 30113, {"view": 75374, "cart": 12456, "buy": 9551}, 2174),
    "incomplete/Beibei": (21716, 7977, {"cart": 642622, "buy": 282860}, 21716),
    "incomplete/Taobao": (48749, 39493, {"cart": 193747, "buy": 211022}, 48749),
    "incomplete/IJCAI": (17435, 35920, {"fav": 60204, "cart": 751, "buy": 131685}, 6102),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dataset_statistics(shared_data, tmp_path, name):
    n_users, n_items, counts, n_test = REAL[name]
    ds = prepare_text(shared_data / name, tmp_path / "out", n_users=n_users, n_items=n_items)
    m = load_prepared(tmp_path / "out").manifest
    assert (m["n_users"], m["n_items"]) == (n_users, n_items)
    assert m["counts_input"] == counts
    assert m["n_test"] == m["n_test_users"] == n_test
    assert m["behaviors"] == list(counts)
    # validation moved exactly one target item per user with >= 2 purchases
    assert m["counts"]["buy"] + m["n_valid"] == counts["buy"]
    assert len(np.unique(ds.valid_user)) == m["n_valid"]
    # inferred shape equals the declared one for these files
    ds2 = prepare_text(shared_data / name, tmp_path / "out2", valid="none")
    assert (ds2.n_users, ds2.n_items) == (n_users, n_items)


def test_valid_aux_mirrors_test_construction(tmp_path):
    # test pairs never in view -> auto drops the view interactions on validation pairs
    d = tmp_path / "in"
    write(d, "view", "0 1 2 3\n1 2 3\n")
    write(d, "buy", "0 1 2\n1 2 3\n")
    write(d, "test", "0 4\n1 0\n")
    ds = prepare_text(d, tmp_path / "a", seed=0)
    v = set(zip(ds.valid_user.tolist(), ds.valid_item.tolist()))
    view = set(zip(*(x.tolist() for x in ds.pairs(0))))
    assert v and not (v & view)
    assert ds.manifest["dropped"]["auxiliary_pairs_on_validation_items"] == 2
    assert ds.manifest["validation"]["aux_interactions_on_valid_pairs"] == "dropped"
    keep = prepare_text(d, tmp_path / "b", seed=0, valid_aux="keep")
    assert v <= set(zip(*(x.tolist() for x in keep.pairs(0))))
    # a test pair that occurs in view -> auto keeps them
    write(d, "test", "0 3\n1 0\n")
    (d / "buy.txt").write_text("0 1 2\n1 2 3\n")
    auto = prepare_text(d, tmp_path / "c", seed=0)
    assert auto.manifest["validation"]["aux_interactions_on_valid_pairs"] == "kept"
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o777 & ~mask  # an ordinary directory, not mkdtemp's 0700
    assert (tmp_path / "c" / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~mask  # files too (not 0600)


def test_mirror_count_rules():
    from mbssl_dist.data.prepare import mirror_count
    assert mirror_count(885, 885, 0, 2174) == 885  # test never in aux: strip every validation pair
    assert mirror_count(21716, 21716, 13525, 21716) == 21716 - 13525  # Beibei: 100 % vs 62 %
    assert mirror_count(13247, 15449, 13163, 15449) == 0  # Taobao_MBCGCN: .8575 vs .8520, sampling noise
    assert mirror_count(7559, 48749, 8326, 48749) == 0  # validation less often in aux: nothing to add
    assert mirror_count(0, 10, 5, 10) == 0 and mirror_count(3, 0, 1, 3) == 0
    # brute force of the rule: share after stripping equals the test's share, to rounding
    for v, nv, t, nt in [(900, 1000, 300, 1000), (50, 50, 10, 40), (400, 500, 100, 800)]:
        k = mirror_count(v, nv, t, nt)
        assert abs((v - k) / nv - t / nt) <= 0.5 / nv + 1e-12


def test_valid_aux_auto_mirrors_a_partial_test_share(tmp_path):
    # 40 users; every buy is also carted; the test items are in cart for 10 of 40 users
    d = tmp_path / "in"
    n = 40
    cart = "".join(f"{u} {u % 7} {(u % 7) + 7} {(u % 7) + 14}\n" for u in range(n))
    buy = "".join(f"{u} {u % 7} {(u % 7) + 7}\n" for u in range(n))
    test = "".join(f"{u} {(u % 7) + 14 if u < 10 else 21 + u % 5}\n" for u in range(n))
    write(d, "cart", cart)
    write(d, "buy", buy)
    write(d, "test", test)
    ds = prepare_text(d, tmp_path / "a", seed=3)
    v = ds.manifest["validation"]
    assert v["aux_interactions_on_valid_pairs"] == "mirrored"
    assert v["test_pairs_in_an_aux_behavior"] == 10
    assert v["valid_pairs_stripped_of_aux"] == 30 and v["valid_pairs_in_an_aux_behavior"] == 10
    cart_pairs = set(zip(*(x.tolist() for x in ds.pairs(0))))
    valid = list(zip(ds.valid_user.tolist(), ds.valid_item.tolist()))
    assert sum(p in cart_pairs for p in valid) == 10  # the validation now shows the test's share
    assert len(cart_pairs) == 3 * n - 30  # exactly the stripped pairs' cart interactions are gone
    assert ds.manifest["dropped"]["auxiliary_pairs_on_validation_items"] == 30
    again = prepare_text(d, tmp_path / "b", seed=3)  # seeded: the same subset
    assert set(zip(*(x.tolist() for x in again.pairs(0)))) == cart_pairs
    keep = prepare_text(d, tmp_path / "c", seed=3, valid_aux="keep")
    assert len(set(zip(*(x.tolist() for x in keep.pairs(0))))) == 3 * n
    drop = prepare_text(d, tmp_path / "e", seed=3, valid_aux="drop")
    assert len(set(zip(*(x.tolist() for x in drop.pairs(0))))) == 3 * n - 40
