"""Property-based fuzzing of the importers (Hypothesis).

Valid datasets, generated in the text format and as CSV and Parquet tables (string ids with
commas, quotes, newlines and unicode; CRLF; a BOM; shuffled rows; repeated rows), must import
to the same canonical dataset as the small reference parse below. Corrupted files (a cell, a
line, random bytes, a truncation) must end in ``DataError`` naming the file (the CLI's exit 2)
and leave no output directory; never another exception.

Bounded for CI: few examples, no deadline, derandomized (the same examples on every run).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mbssl_dist.data import DataError, load_prepared
from mbssl_dist.data.__main__ import main as data_main
from mbssl_dist.data.prepare import prepare_table, prepare_text

# MBSSL_FUZZ_EXAMPLES=2000 MBSSL_FUZZ_RANDOM=1 runs a long, fresh search locally
FUZZ = settings(max_examples=int(os.environ.get("MBSSL_FUZZ_EXAMPLES", "30")), deadline=None,
                derandomize=os.environ.get("MBSSL_FUZZ_RANDOM") != "1", database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ORDER = ["view", "cart", "buy"]


# ------------------------------------------------------------------ reference parses


def ref_table(rows: list[tuple[str, str, str, int]]) -> dict:
    """What the table importer must produce (with valid = none), computed the obvious way:
    repeated (user, item, behavior) rows keep their latest timestamp; a user with >= 2 distinct
    target items holds out the latest one (ties: the larger item id in sorted order)."""
    latest: dict[tuple[str, str, str], int] = {}
    for u, i, b, ts in rows:
        latest[(u, i, b)] = max(latest.get((u, i, b), ts), ts)
    behaviors = [b for b in ORDER if any(k[2] == b for k in latest)]
    target = behaviors[-1]
    items = sorted({k[1] for k in latest})
    rank = {x: n for n, x in enumerate(items)}
    per_user: dict[str, list[tuple[int, int, str]]] = {}
    for (u, i, b), ts in latest.items():
        if b == target:
            per_user.setdefault(u, []).append((ts, rank[i], i))
    test = {(u, max(v)[2]) for u, v in per_user.items() if len(v) >= 2}
    train = {k for k in latest if not (k[2] == target and (k[0], k[1]) in test)}
    return {"behaviors": behaviors, "users": sorted({k[0] for k in latest}), "items": items,
            "train": train, "test": test}


def canonical_table(out: Path) -> dict:
    ds = load_prepared(out)
    users = pq.read_table(out / "user_map.parquet").column("id").to_pylist()
    items = pq.read_table(out / "item_map.parquet").column("id").to_pylist()
    train = {(users[u], items[i], ds.behaviors[b])
             for u, i, b in zip(ds.train_user.tolist(), ds.train_item.tolist(), ds.train_behavior.tolist())}
    test = {(users[u], items[i]) for u, i in zip(ds.test_user.tolist(), ds.test_item.tolist())}
    return {"behaviors": ds.behaviors, "users": users, "items": items, "train": train, "test": test}


def ref_text(files: dict[str, dict[int, list[int]]], test: dict[int, int]) -> dict:
    """What the text importer must produce (valid = none): every listed pair, ids as given."""
    train = {(b, u, i) for b, lines in files.items() for u, its in lines.items() for i in its}
    ids_u = [u for lines in files.values() for u in lines] + list(test)
    ids_i = [i for lines in files.values() for its in lines.values() for i in its] + list(test.values())
    return {"behaviors": [b for b in ORDER if b in files], "n_users": max(ids_u) + 1, "n_items": max(ids_i) + 1,
            "train": train, "test": set(test.items())}


def canonical_text(out: Path) -> dict:
    ds = load_prepared(out)
    train = {(ds.behaviors[b], u, i)
             for u, i, b in zip(ds.train_user.tolist(), ds.train_item.tolist(), ds.train_behavior.tolist())}
    return {"behaviors": ds.behaviors, "n_users": ds.n_users, "n_items": ds.n_items, "train": train,
            "test": set(zip(ds.test_user.tolist(), ds.test_item.tolist()))}


# ------------------------------------------------------------------ generators

# ids: anything a spreadsheet might hold (commas, quotes, newlines inside quotes, unicode)
ID_CHARS = st.sampled_from(list("abcxyz019 ,;\"'\n\t-_.") + ["é", "ß", "猫", "🛒", "\u00a0", "\x00"])
IDS = st.text(ID_CHARS, min_size=1, max_size=6).filter(lambda s: s.strip() != "" and s != "user_id")


@st.composite
def table_rows(draw) -> list[tuple[str, str, str, int]]:
    users = draw(st.lists(IDS, min_size=1, max_size=4, unique=True))
    items = draw(st.lists(IDS, min_size=2, max_size=5, unique=True))
    n = draw(st.integers(3, 25))
    rows = [(draw(st.sampled_from(users)), draw(st.sampled_from(items)), draw(st.sampled_from(ORDER)),
             draw(st.integers(-10**6, 10**12))) for _ in range(n)]
    rows.append((users[0], items[0], "buy", draw(st.integers(0, 10))))  # a target interaction exists
    # repeated rows (merged, latest timestamp kept) and a shuffled order
    rows += draw(st.lists(st.sampled_from(rows), max_size=4))
    return draw(st.permutations(rows))


def csv_bytes(rows, *, crlf: bool, bom: bool, quote_all: bool) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\r\n" if crlf else "\n",
                   quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL)
    w.writerow(["user_id", "item_id", "behavior", "timestamp"])
    w.writerows(rows)
    return (b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8")


def parquet_bytes(rows) -> bytes:
    u, i, b, ts = (list(c) for c in zip(*rows))
    sink = io.BytesIO()
    pq.write_table(pa.table({"user_id": u, "item_id": i, "behavior": b, "timestamp": pa.array(ts, pa.int64())}), sink)
    return sink.getvalue()


@st.composite
def text_dataset(draw):
    """Per-behavior lines {user: items} and the test pairs; always a valid dataset."""
    n_users, n_items = draw(st.integers(1, 6)), draw(st.integers(2, 8))
    present = [b for b in ORDER[:-1] if draw(st.booleans())] + ["buy"]
    files: dict[str, dict[int, list[int]]] = {}
    for b in present:
        lines = {}
        for u in draw(st.lists(st.integers(0, n_users - 1), min_size=1, max_size=n_users, unique=True)):
            lines[u] = draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=n_items, unique=True))
        files[b] = lines
    users_with_train = sorted({u for lines in files.values() for u in lines})
    test = {}
    for u in users_with_train:
        free = [i for i in range(n_items) if i not in files["buy"].get(u, [])]
        if free and draw(st.booleans()):
            test[u] = draw(st.sampled_from(free))
    if not test:  # at least one test pair
        u = users_with_train[0]
        free = [i for i in range(n_items + 1) if i not in files["buy"].get(u, [])]
        test[u] = free[0]
    return files, test


@st.composite
def text_layout(draw):
    """How the same content is spelled: separators, line endings, BOM, blank lines, order, gzip."""
    return {"sep": draw(st.sampled_from([" ", "\t", "  ", " \t"])), "eol": draw(st.sampled_from(["\n", "\r\n"])),
            "bom": draw(st.booleans()), "blank": draw(st.booleans()), "trailing": draw(st.sampled_from(["", " "])),
            "gz": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


def write_text(d: Path, files, test, lay) -> dict[str, Path]:
    d.mkdir(parents=True)
    rng = np.random.default_rng(lay["seed"])
    out = {}
    contents = {b: [[u, *its] for u, its in lines.items()] for b, lines in files.items()}
    contents["test"] = [[u, i] for u, i in test.items()]
    for name, rows in contents.items():
        rows = [rows[k] for k in rng.permutation(len(rows))]
        lines = [lay["sep"].join(map(str, r)) + lay["trailing"] for r in rows]
        if lay["blank"]:
            lines.insert(int(rng.integers(0, len(lines) + 1)), "")
        data = (b"\xef\xbb\xbf" if lay["bom"] else b"") + "".join(x + lay["eol"] for x in lines).encode()
        p = d / f"{name}.txt{'.gz' if lay['gz'] else ''}"
        p.write_bytes(gzip.compress(data, mtime=0) if lay["gz"] else data)
        out[name] = p
    return out


# ------------------------------------------------------------------ valid input: same canonical dataset


@FUZZ
@given(rows=table_rows(), crlf=st.booleans(), bom=st.booleans(), quote_all=st.booleans())
def test_fuzz_table_csv_and_parquet_match_reference(rows, crlf, bom, quote_all):
    ref = ref_table(rows)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        (d / "t.csv").write_bytes(csv_bytes(rows, crlf=crlf, bom=bom, quote_all=quote_all))
        (d / "t.parquet").write_bytes(parquet_bytes(rows))
        a = prepare_table(d / "t.csv", d / "a", valid="none")
        b = prepare_table(d / "t.parquet", d / "b", valid="none")
        assert canonical_table(d / "a") == ref
        assert canonical_table(d / "b") == ref
        assert a.checksum() == b.checksum()
        assert a.manifest["table"]["duplicate_rows_merged"] == len(rows) - len({r[:3] for r in rows})


@FUZZ
@given(data=text_dataset(), lay=text_layout())
def test_fuzz_text_matches_reference(data, lay):
    files, test = data
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        write_text(d / "in", files, test, lay)
        prepare_text(d / "in", d / "out", valid="none")
        assert canonical_text(d / "out") == ref_text(files, test)


# ------------------------------------------------------------------ corruptions: DataError naming the file


def corrupt(data: bytes, kind: str, pos: int, junk: bytes) -> bytes:
    """Apply one corruption at relative position ``pos`` (0..10**6)."""
    at = pos * len(data) // 10**6
    if kind == "truncate":
        return data[:at]
    if kind == "bytes":
        return data[:at] + junk + data[at + len(junk):]
    lines = data.split(b"\n")
    k = min(at * len(lines) // max(len(data), 1), len(lines) - 1)
    if kind == "line":  # an extra line of junk
        return b"\n".join(lines[:k] + [junk] + lines[k:])
    # "cell": replace one whitespace/comma separated field of one line by junk
    cells = lines[k].split(b"," if b"," in lines[k] else b" ")
    cells[pos % len(cells)] = junk
    lines[k] = (b"," if b"," in lines[k] else b" ").join(cells)
    return b"\n".join(lines)


CORRUPTION = st.tuples(st.sampled_from(["truncate", "bytes", "line", "cell"]), st.integers(0, 10**6),
                       st.sampled_from([b"", b"x", b"-1", b"\xff\xfe", b"\x00", b'"', b"1 1", b"a,b", b",,,,",
                                        b"9" * 12, b"nan", b"\r", b"\xef\xbb\xbf", b"1.5", b"user_id,item_id"]))


def _expect_clean_outcome(run, out: Path, files: list[Path]) -> str:
    """Run an import; it either succeeds (the corruption happened to stay valid) or raises a
    DataError naming one of ``files``, with no output directory and no temp directory left."""
    try:
        run()
    except DataError as e:
        assert e.file is not None and any(e.file == str(f) for f in files), (str(e), files)
        assert str(e).startswith(e.file)
        assert "\n" not in str(e).strip(), str(e)
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
        event("DataError")
        return "error"
    event("still valid")
    return "ok"


@FUZZ
@given(rows=table_rows(), fmt=st.sampled_from(["csv", "parquet"]), c=CORRUPTION)
def test_fuzz_table_corruption(rows, fmt, c):
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        src = d / f"t.{fmt}"
        good = csv_bytes(rows, crlf=False, bom=False, quote_all=False) if fmt == "csv" else parquet_bytes(rows)
        src.write_bytes(corrupt(good, *c))
        _expect_clean_outcome(lambda: prepare_table(src, d / "out"), d / "out", [src])


@FUZZ
@given(data=text_dataset(), lay=text_layout(), victim=st.sampled_from(["buy", "test", "first"]), c=CORRUPTION)
def test_fuzz_text_corruption(data, lay, victim, c):
    files, test = data
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        paths = write_text(d / "in", files, test, lay)
        p = paths[next(iter(paths)) if victim == "first" else victim]
        raw = p.read_bytes()
        if p.suffix == ".gz" and c[0] != "truncate" and c[0] != "bytes":
            raw = gzip.compress(corrupt(gzip.decompress(raw), *c), mtime=0)  # corrupt the content
        else:
            raw = corrupt(raw, *c)  # corrupt the (possibly compressed) bytes
        p.write_bytes(raw)
        _expect_clean_outcome(lambda: prepare_text(d / "in", d / "out"), d / "out", [*paths.values(), d / "in"])


@FUZZ
@given(data=text_dataset(), junk=st.sampled_from([b"x", b"-3", b"1.0", b"+2", b"\xff", b"3\r4"]))
def test_fuzz_text_bad_token_always_fails(data, junk):
    """A bad id token is never accepted (the property above allows 'still valid' outcomes)."""
    files, test = data
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        paths = write_text(d / "in", files, test, {"sep": " ", "eol": "\n", "bom": False, "blank": False,
                                                   "trailing": "", "gz": False, "seed": 0})
        p = paths["buy"]
        lines = p.read_bytes().split(b"\n")
        lines[0] = lines[0] + b" " + junk
        p.write_bytes(b"\n".join(lines))
        with pytest.raises(DataError) as ei:
            prepare_text(d / "in", d / "out")
        assert ei.value.file == str(p) and ei.value.line == 1, str(ei.value)
        assert not (d / "out").exists()


def test_cli_corruption_exit_2(tmp_path, capsys):
    rows = [("a", "x", "buy", 1), ("a", "y", "buy", 2), ("b", "x", "buy", 3)]
    src = tmp_path / "t.csv"
    src.write_bytes(csv_bytes(rows, crlf=False, bom=False, quote_all=False)[:-9])  # truncated mid-row
    assert data_main(["prepare", "--format", "table", "--input", str(src), "--out", str(tmp_path / "o")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith(f"error: {src}:4"), err
    assert not (tmp_path / "o").exists()
