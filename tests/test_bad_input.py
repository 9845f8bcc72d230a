"""Bad input, case by case (issue #15 and item 7 of #10): each ends in a one-line error that
names the file and the 1-based line (or the config field), exit code 2, no traceback, no
output written, and the input untouched."""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mbssl_dist.data import DataError
from mbssl_dist.data.__main__ import main as data_main

from .conftest import REPO


def write(d: Path, name: str, text: str | bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def text_dir(d: Path, **override: str | bytes) -> Path:
    """A small valid text dataset (view < cart < buy); ``override`` replaces files by name."""
    files: dict[str, str | bytes] = {"view.txt": "0 1 2 3\n1 0 2\n2 3 4\n", "cart.txt": "0 1 3\n2 4\n",
                                     "buy.txt": "0 1 3\n1 0 2\n2 4 3\n", "test.txt": "0 2\n1 4\n2 0\n"}
    files.update(override)
    for name, content in files.items():
        if content is not None:
            write(d, name, content)
    return d


def snapshot(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``d`` (the input must come out byte-identical)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _drop_dac_override() -> None:
    """preexec_fn: root ignores directory permissions through CAP_DAC_OVERRIDE; drop it (and
    CAP_DAC_READ_SEARCH) from the bounding set so the child meets a read-only dir as a user does."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def cli(*args: str, as_user: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m mbssl_dist.data prepare ARGS``; ``as_user``: without root's DAC override."""
    pre = _drop_dac_override if as_user and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-m", "mbssl_dist.data", "prepare", *args], capture_output=True,
                          text=True, cwd=cwd, preexec_fn=pre)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr and no traceback; returns that line."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------ no data loss (#10 item 7)


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_prepare_refuses_out_overlapping_input(tmp_path, where):
    src = text_dir(tmp_path / "raw" / "in")
    before = snapshot(tmp_path / "raw")
    out = {"same": src, "parent": src.parent, "inside": src / "prepared"}[where]
    r = cli("--format", "text", "--input", str(src), "--out", str(out), "--overwrite")
    one_line_error(r, str(out), "the input", "refusing")
    assert snapshot(tmp_path / "raw") == before
    assert not (src / "prepared").exists()


def test_prepare_refuses_table_file_as_out(tmp_path):
    csv = write(tmp_path / "d", "log.csv", "user_id,item_id,behavior\na,x,buy\na,y,buy\n")
    before = snapshot(tmp_path / "d")
    for out in (csv, csv.parent):
        with pytest.raises(DataError, match="the input"):
            from mbssl_dist.data.prepare import prepare_table
            prepare_table(csv, out, overwrite=True)
    assert snapshot(tmp_path / "d") == before


def test_prepare_refuses_symlinked_out_to_input(tmp_path):
    src = text_dir(tmp_path / "in")
    before = snapshot(src)
    (tmp_path / "link").symlink_to(src)
    assert data_main(["prepare", "--format", "text", "--input", str(src), "--out", str(tmp_path / "link"),
                      "--overwrite"]) == 2
    assert snapshot(src) == before


def test_overwrite_replaces_only_a_prepared_dir(tmp_path):
    mine = tmp_path / "mine"
    write(mine, "notes.md", "my notes\n")
    assert data_main(["prepare", "--format", "synthetic", "--out", str(mine), "--overwrite"]) == 2
    assert (mine / "notes.md").read_text() == "my notes\n"
    out = tmp_path / "out"
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out)]) == 0
    assert data_main(["prepare", "--format", "synthetic", "--out", str(out), "--overwrite", "--seed", "1"]) == 0


def test_prepare_read_only_out_fails_before_parsing(tmp_path):
    """The writability probe runs first: a read-only destination is exit 2, one line, and the
    input is not even opened (a corrupt input would otherwise be reported first)."""
    src = text_dir(tmp_path / "in", **{"buy.txt": "0 1\nnot-an-id 2\n"})
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "out", ro / "deeper" / "out"):
            r = cli("--format", "text", "--input", str(src), "--out", str(out), as_user=True)
            line = one_line_error(r, str(out), "not writable", "Permission denied")
            assert "buy.txt" not in line
            assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------ table importer (#15)


def parquet(path: Path, **cols) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), path)
    return path


GOOD_ROWS = dict(user_id=["a", "a", "a", "b", "b"], item_id=["x", "y", "z", "x", "z"], behavior=["buy"] * 5)


def prep_table(src: Path, tmp_path: Path, **kw):
    from mbssl_dist.data.prepare import prepare_table

    return prepare_table(src, tmp_path / "out", **kw)


def table_error(src: Path, tmp_path: Path, **kw) -> str:
    from mbssl_dist.data.prepare import prepare_table

    with pytest.raises(DataError) as ei:
        prepare_table(src, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    assert str(src) in str(ei.value)
    return str(ei.value)


def test_parquet_null_user_id_is_an_error_not_user_none(tmp_path):
    src = parquet(tmp_path / "t.parquet", **(GOOD_ROWS | {"user_id": ["a", None, "a", "b", "b"]}))
    assert "row 2: empty user_id" in table_error(src, tmp_path)
    src = parquet(tmp_path / "i.parquet", **(GOOD_ROWS | {"user_id": [1, 1, None, 2, 2]}))  # integer ids too
    assert "row 3: empty user_id" in table_error(src, tmp_path)


def test_nan_timestamp_rejected(tmp_path):
    src = parquet(tmp_path / "t.parquet", **GOOD_ROWS, timestamp=[1.0, float("nan"), 2.0, 3.0, 4.0])
    assert "row 2: timestamp nan is not finite" in table_error(src, tmp_path)
    src = parquet(tmp_path / "u.parquet", **GOOD_ROWS, timestamp=[1.0, 2.0, float("inf"), 3.0, 4.0])
    assert "row 3: timestamp inf is not finite" in table_error(src, tmp_path)
    csv = write(tmp_path, "t.csv", "user_id,item_id,behavior,timestamp\na,x,buy,1\na,y,buy,2\na,z,buy,NaN\n")
    assert "t.csv:4 (field 'timestamp'): missing timestamp" in table_error(csv, tmp_path)


def test_parquet_binary_column_invalid_utf8(tmp_path):
    import pyarrow as pa

    src = parquet(tmp_path / "t.parquet", **(GOOD_ROWS | {
        "item_id": pa.array([b"x", b"y", b"\xff\xfe", b"x", b"z"], pa.binary())}))
    assert "row 3: item_id b'\\xff\\xfe' is not valid UTF-8" in table_error(src, tmp_path)


def test_parquet_rows_are_one_based(tmp_path):
    src = parquet(tmp_path / "t.parquet", **(GOOD_ROWS | {"behavior": ["buy", "buy", "wink", "buy", "buy"]}))
    assert "row 3: unknown behavior 'wink'" in table_error(src, tmp_path, behaviors=["view", "buy"])


CSV_HEAD = "user_id,item_id,behavior,timestamp\n"
# a blank line and a quoted field spanning two lines before the bad row: the reported line is
# the real line in the file, not row + 2
CSV_PRE = 'a,x,buy,1\n\n"b\nc",y,buy,2\n'


@pytest.mark.parametrize("case,body,line,what", [
    ("duplicate_header", CSV_HEAD, 6, "header line appears again"),
    ("non_numeric_timestamp", "a,z,buy,noon\n", 6, "timestamp 'noon' is not a number"),
    ("ragged_row", "a,z,buy,3,extra\n", 6, "expected 4 fields like the header, got 5"),
    ("empty_item", "a,,buy,3\n", 6, "empty item_id"),
])
def test_csv_errors_name_the_one_based_line(tmp_path, case, body, line, what):
    csv = write(tmp_path, "log.csv", CSV_HEAD + CSV_PRE + body + "b,x,buy,4\n")
    msg = table_error(csv, tmp_path)
    assert f"log.csv:{line}" in msg and what in msg, msg


def test_csv_non_utf8_bytes_name_the_line(tmp_path):
    csv = write(tmp_path, "log.csv", (CSV_HEAD + "a,x,buy,1\na,y,buy,2\n").encode() + b"a,caf\xe9,buy,3\n")
    msg = table_error(csv, tmp_path)
    assert "log.csv:4" in msg and "not UTF-8" in msg, msg


def test_csv_five_megabyte_line_imports(tmp_path):
    long_id = "y" * 5_000_000
    csv = write(tmp_path, "log.csv", f"user_id,item_id,behavior\na,x,buy\na,{long_id},buy\na,z,buy\nb,x,buy\nb,z,buy\n")
    ds = prep_table(csv, tmp_path)
    import pyarrow.parquet as pq

    ids = pq.read_table(tmp_path / "out" / "item_map.parquet").column("id").to_pylist()
    assert sorted(ids) == sorted(["x", long_id, "z"])
    assert len(ds.train_user) + len(ds.valid_user) + len(ds.test_user) == 5


def test_directory_as_table_input_and_file_as_text_input(tmp_path):
    (tmp_path / "d").mkdir()
    assert "is a directory" in table_error(tmp_path / "d", tmp_path)
    from mbssl_dist.data.prepare import prepare_text

    f = write(tmp_path, "log.csv", "user_id,item_id,behavior\n")
    with pytest.raises(DataError, match="log.csv: is a file; --format text reads a directory"):
        prepare_text(f, tmp_path / "out")


@pytest.mark.parametrize("sep,name", [("\t", "tab"), (";", "semicolon")])
def test_delimiter_hint(tmp_path, sep, name):
    csv = write(tmp_path, "log.tsv", sep.join(["user_id", "item_id", "behavior"]) + "\n" + sep.join("axb") + "\n")
    msg = table_error(csv, tmp_path)
    assert f"looks {name}-separated" in msg, msg


def test_csv_bom_and_crlf_import_like_plain(tmp_path):
    rows = "user_id,item_id,behavior\na,x,buy\na,y,buy\nb,x,buy\nb,z,buy\n"
    plain = prep_table(write(tmp_path, "p.csv", rows), tmp_path / "p")
    bom = prep_table(write(tmp_path, "b.csv", b"\xef\xbb\xbf" + rows.replace("\n", "\r\n").encode()), tmp_path / "b")
    assert plain.checksum() == bom.checksum()


# ------------------------------------------------------------ text importer (#15)


def prep_text(src: Path, out: Path, **kw):
    from mbssl_dist.data.prepare import prepare_text

    return prepare_text(src, out, **kw)


def test_text_bom_is_accepted(tmp_path):
    plain = prep_text(text_dir(tmp_path / "a"), tmp_path / "oa")
    bom = prep_text(text_dir(tmp_path / "b", **{"buy.txt": b"\xef\xbb\xbf0 1 3\n1 0 2\n2 4 3\n",
                                                "test.txt": b"\xef\xbb\xbf0 2\r\n1 4\r\n2 0\r\n"}), tmp_path / "ob")
    assert plain.checksum() == bom.checksum()


def test_text_cr_only_line_endings(tmp_path):
    src = text_dir(tmp_path / "in", **{"view.txt": b"0 1 2 3\r1 0 2\r2 3 4\r"})
    with pytest.raises(DataError, match=r"view.txt:1: carriage return inside a line: CR-only"):
        prep_text(src, tmp_path / "out")


def test_text_non_utf8_and_sloppy_integers(tmp_path):
    src = text_dir(tmp_path / "a", **{"cart.txt": b"0 1 3\n2 \xff4\n"})
    with pytest.raises(DataError, match=r"cart.txt:2: bytes that are not UTF-8"):
        prep_text(src, tmp_path / "o")
    for tok in ["1_0", "+1", "\u0663", "1.0", "99999999999"]:
        src = text_dir(tmp_path / f"t{len(tok)}{tok.isascii()}", **{"cart.txt": f"0 1 3\n2 {tok}\n"})
        with pytest.raises(DataError, match=r"cart.txt:2: item id .*(not an integer|too large)"):
            prep_text(src, tmp_path / "o")


def test_missing_target_file_warns_and_manifest_records_order(tmp_path, caplog):
    import json

    src = text_dir(tmp_path / "in", **{"buy.txt": None})
    (src / "buy.txt").unlink(missing_ok=True)
    with caplog.at_level("WARNING"):
        prep_text(src, tmp_path / "out", on_test_in_train="drop")
    warn = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("target behavior is 'cart', not the conventional 'buy'" in w and "inferred" in w for w in warn), warn
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    bo = m["behavior_order"]
    assert bo["behaviors"] == ["view", "cart"] and bo["target"] == "cart" == m["target"]
    assert bo["chosen_by"].startswith("inferred") and len(bo["warnings"]) == 1
    # the conventional layout: no warning, chosen by the default order
    caplog.clear()
    with caplog.at_level("INFO"):
        prep_text(text_dir(tmp_path / "ok"), tmp_path / "ok_out")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("behavior order ['view', 'cart', 'buy'] (weakest first), target 'buy'" in r.getMessage()
               for r in caplog.records)
    m = json.loads((tmp_path / "ok_out" / "manifest.json").read_text())
    assert m["behavior_order"]["warnings"] == [] and m["behavior_order"]["target"] == "buy"
    # explicit --target cart: still warned (not buy), but not as inferred
    caplog.clear()
    prep_text(text_dir(tmp_path / "ex"), tmp_path / "ex_out", target="cart", on_test_in_train="drop")
    w = json.loads((tmp_path / "ex_out" / "manifest.json").read_text())["behavior_order"]
    assert w["chosen_by"] == "--target" and "inferred" not in w["warnings"][0]


def test_table_inferred_target_warns(tmp_path):
    csv = write(tmp_path, "log.csv", "user_id,item_id,behavior\na,x,view\na,y,cart\na,x,cart\nb,x,cart\nb,y,cart\n")
    ds = prep_table(csv, tmp_path)
    assert ds.manifest["behavior_order"]["target"] == "cart" and ds.manifest["behavior_order"]["warnings"]


def test_cli_n_users_zero_is_an_error(tmp_path, capsys):
    src = text_dir(tmp_path / "in")
    assert data_main(["prepare", "--format", "text", "--input", str(src), "--out", str(tmp_path / "o"),
                      "--n-users", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: <input> (field 'n_users'): --n-users 0: must be >= 1 (omit it to use max id + 1)"]
    assert not (tmp_path / "o").exists()
    from mbssl_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.n_users = -1: must be >= 0"):
        load_config(None, ["data.n_users=-1"])
    assert load_config(None, ["data.n_users=0"]).data.n_users == 0  # 0 = infer (documented)


# ------------------------------------------------------------ swing / partition inputs (#15)


def _inconsistent_prepared(tmp_path: Path) -> Path:
    import json

    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    d = tmp_path / "prep"
    prepare_synthetic(d, SyntheticSpec(n_users=40, n_items=30, n_clusters=2))
    m = json.loads((d / "manifest.json").read_text())
    m["n_users"] = 10  # smaller than the ids in train.parquet
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_swing_and_partition_reject_manifest_smaller_than_ids(tmp_path, capsys):
    from mbssl_dist.partition.__main__ import main as part_main
    from mbssl_dist.swing.__main__ import main as swing_main

    d = _inconsistent_prepared(tmp_path)
    assert swing_main(["--data", str(d), "--out", str(tmp_path / "sw"), "--no-progress"]) == 2
    assert part_main(["--data", str(d), "--parts", "2", "--method", "range", "--out", str(tmp_path / "pt")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 2
    for ln in lines:
        assert "train.parquet" in ln and "outside [0, 10)" in ln and "n_users = 10" in ln, ln
    assert not (tmp_path / "sw").exists() and not (tmp_path / "pt").exists()


# ------------------------------------------------------------ trainer config (#15)


def _train(argv: list[str], capsys) -> tuple[int, list[str]]:
    from mbssl_dist.train import main as train_main

    rc = train_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [ln for ln in err.splitlines() if ln.startswith(("config error: ", "data error: "))]


def test_train_missing_data_path(tmp_path, capsys):
    cfg = write(tmp_path, "c.toml", '[data]\nformat = "text"\npath = "no_such_dir"\n')
    rc, lines = _train(["--config", str(cfg)], capsys)
    assert rc == 2 and len(lines) == 1
    assert "no_such_dir (field 'data.path'): does not exist" in lines[0]
    cfg = write(tmp_path, "p.toml", f'[data]\nformat = "prepared"\npath = "{tmp_path}"\n')
    rc, lines = _train(["--config", str(cfg)], capsys)
    assert rc == 2 and "not a prepared dataset directory" in lines[0]


def test_train_bad_data_through_config(tmp_path, capsys):
    text_dir(tmp_path / "raw", **{"buy.txt": "0 1 3\n1 0 x\n2 4 3\n"})
    cfg = write(tmp_path, "c.toml", f'[data]\nformat = "text"\npath = "raw"\ncache_dir = "{tmp_path / "cache"}"\n'
                                    '[run]\nmlflow = false\n')
    rc, lines = _train(["--config", str(cfg)], capsys)
    assert rc == 2 and len(lines) == 1 and "raw/buy.txt:2: item id 'x' is not an integer" in lines[0], lines
    assert not any((tmp_path / "cache").glob("raw-*"))


@pytest.mark.parametrize("ov,field", [("train.lr=nan", "train.lr"), ("train.lr=inf", "train.lr"),
                                      ("loss.tau=-inf", "loss.tau"), ("hmg.relax=nan", "hmg.relax"),
                                      ("loss.neg_weight=[0.1, nan]", "loss.neg_weight[1]")])
def test_train_non_finite_floats(capsys, ov, field):
    rc, lines = _train(["--set", ov], capsys)
    assert rc == 2 and len(lines) == 1 and f"{field} = " in lines[0] and "finite" in lines[0], lines


def test_train_cuda_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, lines = _train(["--set", 'train.device="cuda"'], capsys)
    assert rc == 2 and lines == [lines[0]] and "train.device = 'cuda' but CUDA is not available" in lines[0]


# ------------------------------------------------------------ torchrun off the network (#15)

_WORKER = """
import socket, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 0:
    import subprocess
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    print("IFACES", sorted({ln.split()[1] for ln in addrs.splitlines()}))
dist.destroy_process_group()
"""


def test_readme_loopback_torchrun_form_runs_with_loopback_only(tmp_path):
    """README documents that torchrun's store listens on all interfaces and gives a private
    network namespace as the loopback-only form; that form must run a 2-rank gloo job and see
    no interface but lo."""
    import re

    readme = (REPO / "README.md").read_text()
    m = re.search(r"`(unshare --net --map-root-user sh -c '[^`]*')`", readme)
    assert m and "all interfaces" in readme, "README 'Bad input' must document the loopback form"
    if shutil.which("unshare") is None or shutil.which("ip") is None or subprocess.run(
            ["unshare", "--net", "--map-root-user", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare --net --map-root-user is not permitted here")
    (tmp_path / "w.py").write_text(_WORKER)
    assert "NPROC=2 bash launch/run_local.sh" in m.group(1)
    cmd = m.group(1).replace("NPROC=2 bash launch/run_local.sh",
                             f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 w.py")
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IFACES ['lo']" in r.stdout, r.stdout


def test_csv_quoted_newlines_across_blocks(tmp_path):
    """A quoted id spanning lines in a file of several pyarrow blocks (the fast chunker assumes
    one row per line and fails on such files: the reader retries with newlines allowed)."""
    rows = ["user_id,item_id,behavior"] + [f'"u{k % 50}\nx",i{k % 97},buy' for k in range(150000)]
    csv = write(tmp_path, "nl.csv", "\n".join(rows) + "\n")
    assert csv.stat().st_size > 2 * (1 << 20)
    prep_table(csv, tmp_path)
    import pyarrow.parquet as pq

    users = pq.read_table(tmp_path / "out" / "user_map.parquet").column("id").to_pylist()
    assert users == sorted(f"u{k}\nx" for k in range(50))


def test_table_ids_differing_only_by_trailing_nul_stay_distinct(tmp_path):
    src = parquet(tmp_path / "n.parquet", user_id=["a", "a\x00", "a", "a\x00"], item_id=["x", "x", "y", "y"],
                  behavior=["buy"] * 4)
    ds = prep_table(src, tmp_path, valid="none")
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "out" / "user_map.parquet").column("id").to_pylist() == ["a", "a\x00"]
    assert ds.n_users == 2 and len(ds.test_user) == 2
