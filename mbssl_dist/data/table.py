"""Importer for a long interaction table: ``user_id, item_id, behavior[, timestamp]``.

CSV (with header) or Parquet; ids are arbitrary strings, mapped to dense 0-based ints
(maps written beside the data so recommendations can be mapped back). The held-out test
item of a user is its last target interaction by timestamp when a timestamp column exists,
else a seeded random one; users with a single target interaction keep it for training.
Repeated (user, item, behavior) rows are merged and counted, never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import DataError
from .text import default_order, report_order

log = logging.getLogger(__name__)
REQUIRED = ("user_id", "item_id", "behavior")


@dataclass
class TableData:
    behaviors: list[str]
    users: list[np.ndarray]
    items: list[np.ndarray]
    test_user: np.ndarray
    test_item: np.ndarray
    user_ids: np.ndarray  # dense index -> original id (str)
    item_ids: np.ndarray
    timestamps: np.ndarray | None  # of the target behavior's train pairs (for validation)
    duplicates_merged: int
    users_without_test: int
    order: dict | None = None  # manifest "behavior_order"


CSV_BLOCK = 1 << 20  # pyarrow's default block; rows longer than a block need a larger one


def _csv_records(path: Path):
    """Yield (first_line, last_line, fields) of every non-empty CSV record, 1-based lines.

    The slow, exact twin of pyarrow's parser, used only to *explain* a failure: which line has
    bytes that are not UTF-8, a ragged row, an unterminated quote, or where data row r lives
    (quoted fields may span lines and empty lines are skipped, so row + 2 is not the line).
    Raises DataError for undecodable bytes.
    """
    import csv

    def lines():  # streamed: the error path must not hold a large file in memory
        with open(path, "rb") as fb:
            for n, raw in enumerate(fb, 1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"bytes that are not UTF-8 ({raw[e.start:e.start + 4]!r}); save the file as "
                                    "UTF-8", file=str(path), line=n) from None

    reader = csv.reader(lines())  # line_num counts the lines pulled, i.e. 1-based file lines
    start = 1
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"malformed CSV ({e})", file=str(path), line=start) from None
        end = reader.line_num
        if rec:  # csv yields [] for an empty line, which pyarrow skips too
            yield start, end, rec
        start = end + 1


def _explain_csv_failure(path: Path, err: Exception) -> DataError:
    """Turn a pyarrow CSV error into ``FILE:LINE: problem`` using the exact Python pass."""
    header = None
    for first, _, rec in _csv_records(path):
        if header is None:
            header = rec
            continue
        if len(rec) != len(header):
            return DataError(f"expected {len(header)} fields like the header, got {len(rec)}", file=str(path),
                             line=first)
    return DataError(f"cannot parse table: {err}", file=str(path))


def _csv_line_of_row(path: Path, row: int) -> int | None:
    """1-based line where data row ``row`` (0-based, header excluded) starts."""
    for k, (first, _, _rec) in enumerate(_csv_records(path)):
        if k == row + 1:
            return first
    return None


def _read_csv(path: Path, block_size: int = CSV_BLOCK, newlines: bool = False) -> pa.Table:
    """pyarrow's fast parser; retried with a larger block (a row longer than 1 MB) or with
    quoted newlines allowed (slower, so only when needed); any remaining failure is explained
    with a file line by the exact Python pass."""
    import pyarrow.csv as pacsv

    opts = pacsv.ConvertOptions(column_types={"user_id": pa.string(), "item_id": pa.string(),
                                              "behavior": pa.string()}, strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, read_options=pacsv.ReadOptions(block_size=block_size),
                              parse_options=pacsv.ParseOptions(newlines_in_values=newlines), convert_options=opts)
    except (pa.ArrowException, UnicodeDecodeError) as e:  # bad bytes in the header raise UnicodeDecodeError
        if "straddle" in str(e) and block_size < (1 << 30):
            with open(path, "rb") as f:
                longest = max((len(line) for line in f), default=0)
            if longest * 2 + 1 > block_size:
                return _read_csv(path, min(1 << 30, longest * 2 + 1), newlines)
        if not newlines and isinstance(e, pa.ArrowInvalid):
            try:
                return _read_csv(path, block_size, True)
            except DataError:
                pass
        raise _explain_csv_failure(path, e) from None


def _read_table(path: Path) -> tuple[pa.Table, str]:
    """Return (table, kind) with kind ``csv`` or ``parquet``."""
    if path.is_dir():
        raise DataError("is a directory; --format table reads one CSV or Parquet file (a directory of "
                        "<behavior>.txt files is --format text)", file=str(path))
    if not path.is_file():
        raise DataError("input table does not exist", file=str(path))
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            t, kind = pq.read_table(path), "parquet"
        else:
            t, kind = _read_csv(path), "csv"
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot parse table: {e}", file=str(path)) from e
    try:
        t.column_names  # noqa: B018 - decoded lazily; bytes that are not UTF-8 fail here
    except UnicodeDecodeError as e:
        if kind == "csv":
            raise _explain_csv_failure(path, e) from None
        raise DataError("column names are not valid UTF-8", file=str(path)) from None
    return t, kind


def _row_error(path: Path, kind: str, row: int, msg: str, field: str | None = None) -> DataError:
    """Error at data row ``row`` (0-based): CSV names the 1-based file line, Parquet the 1-based row."""
    if kind == "csv":
        return DataError(msg, file=str(path), line=_csv_line_of_row(path, row), field=field)
    return DataError(f"row {row + 1}: {msg}", file=str(path), field=field)


def _as_strings(t: pa.Table, c: str, path: Path, kind: str) -> pa.ChunkedArray:
    col = t[c]
    try:
        return col.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            for r, v in enumerate(col.to_pylist()):
                if v is not None:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _row_error(path, kind, r, f"{c} {v[:16]!r} is not valid UTF-8", field=c) from None
        raise DataError(f"column {c} of type {col.type} cannot be read as text ids: {e}", file=str(path),
                        field=c) from None


def _delimiter_hint(names: list[str]) -> str:
    if len(names) == 1:
        for sep, what in (("\t", "tab"), (";", "semicolon"), ("|", "pipe")):
            if sep in names[0]:
                return (f"; the header looks {what}-separated, but the table importer reads comma-separated CSV "
                        "(convert it, e.g. to Parquet or CSV)")
    return ""


def _dense_ids(arr: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids, dense index of every row). Done in Arrow, not with numpy's fixed-width
    unicode arrays, which silently strip trailing NUL characters and would merge "a" and "a\\0"."""
    enc = arr.combine_chunks().dictionary_encode()
    order = pc.array_sort_indices(enc.dictionary).to_numpy()  # UTF-8 byte order = code point order
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    ids = np.empty(len(order), dtype=object)
    ids[:] = enc.dictionary.take(pa.array(order)).to_pylist()
    return ids, rank[enc.indices.to_numpy()]


def read_table(path: Path, behaviors: list[str] | None, target: str | None, seed: int) -> TableData:
    t, kind = _read_table(path)
    missing = [c for c in REQUIRED if c not in t.column_names]
    if missing:
        raise DataError(f"missing column(s) {missing}; expected user_id, item_id, behavior[, timestamp], "
                        f"found {t.column_names}{_delimiter_hint(t.column_names)}", file=str(path))
    if t.num_rows == 0:
        raise DataError("table has no rows (empty dataset)", file=str(path))
    cols = {}
    strs = {c: _as_strings(t, c, path, kind) for c in REQUIRED}
    for c in REQUIRED:
        arr = strs[c]
        # or_kleene with fill_null: a null must count as bad (plain or_ propagates null, and
        # any() skips nulls, which let a null id through as the user "None")
        bad = pc.or_(pc.is_null(arr), pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), True))
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise _row_error(path, kind, row, f"empty {c}", field=c)
        cols[c] = np.asarray(arr.to_pylist(), dtype=object)
    header_again = (cols["user_id"] == "user_id") & (cols["item_id"] == "item_id") & (cols["behavior"] == "behavior")
    if header_again.any():
        raise _row_error(path, kind, int(np.flatnonzero(header_again)[0]),
                         "the header line appears again (files concatenated with their headers?)")
    ts = None
    if "timestamp" in t.column_names:
        col = t["timestamp"]
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            col = col.cast(pa.timestamp("us")).cast(pa.int64())
        try:
            ts_arr = col.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for r, v in enumerate(col.to_pylist()):
                try:
                    float(v)
                except (TypeError, ValueError):
                    if v is not None:
                        raise _row_error(path, kind, r, f"timestamp {v!r} is not a number (expected numbers or "
                                         "ISO dates in the whole column)", field="timestamp") from None
            raise DataError(f"timestamp column of type {col.type} is not numeric or a timestamp", file=str(path),
                            field="timestamp") from None
        if ts_arr.null_count:
            row = int(np.flatnonzero(pc.is_null(ts_arr).to_numpy(zero_copy_only=False))[0])
            raise _row_error(path, kind, row, "missing timestamp (empty, NaN or null)", field="timestamp")
        ts = ts_arr.to_numpy()
        nonfinite = ~np.isfinite(ts)
        if nonfinite.any():
            r = int(np.flatnonzero(nonfinite)[0])
            raise _row_error(path, kind, r, f"timestamp {ts[r]} is not finite", field="timestamp")

    present = sorted(set(cols["behavior"].tolist()))
    by_behaviors, by_target = behaviors is not None, target is not None
    if behaviors is None:
        try:
            behaviors = default_order(present)
        except DataError as e:
            raise DataError(e.problem, file=str(path), field="behavior") from None
        if target is not None:
            if target not in behaviors:
                raise DataError(f"target behavior {target!r} does not occur; found {present}", file=str(path),
                                field="behavior")
            behaviors = [b for b in behaviors if b != target] + [target]
    else:
        dups = {b for b in behaviors if behaviors.count(b) > 1}
        if dups:
            raise DataError(f"duplicate behavior name(s) {sorted(dups)} in --behaviors", field="behaviors")
        if target is not None and behaviors[-1] != target:
            raise DataError(f"target behavior {target!r} must be last in --behaviors {behaviors}", field="behaviors")
        unknown = [b for b in present if b not in behaviors]
        if unknown:
            row = int(np.flatnonzero(cols["behavior"] == unknown[0])[0])
            raise _row_error(path, kind, row, f"unknown behavior {unknown[0]!r}; --behaviors lists {behaviors}",
                             field="behavior")
        absent = [b for b in behaviors if b not in present]
        if behaviors[-1] in absent:
            raise DataError(f"target behavior {behaviors[-1]!r} does not occur in the table", file=str(path),
                            field="behavior")
        if absent:
            raise DataError(f"behavior(s) {absent} listed in --behaviors do not occur in the table", file=str(path),
                            field="behavior")

    order_info = report_order(behaviors, by_behaviors=by_behaviors, by_target=by_target, where=str(path))
    user_ids, u = _dense_ids(strs["user_id"])
    item_ids, i = _dense_ids(strs["item_id"])
    b = np.asarray([behaviors.index(x) for x in cols["behavior"]], dtype=np.int64)
    n_items = len(item_ids)
    key = (b * len(user_ids) + u) * n_items + i
    # Merge repeated rows: keep the latest timestamp (so "last interaction" is well defined).
    order = np.lexsort((ts if ts is not None else np.zeros(len(key)), key))
    key_s = key[order]
    last = np.ones(len(key_s), dtype=bool)
    last[:-1] = key_s[1:] != key_s[:-1]
    sel = order[last]
    dups = int(len(key) - len(sel))
    if dups:
        log.info("%s: merged %d repeated (user, item, behavior) rows", path, dups)
    u, i, b = u[sel], i[sel], b[sel]
    ts_sel = ts[sel] if ts is not None else None

    K = len(behaviors)
    tgt = np.flatnonzero(b == K - 1)
    tu, ti = u[tgt], i[tgt]
    if ts_sel is None:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E57]))
        tkey = rng.random(len(tgt))
    else:
        tkey = ts_sel[tgt]
    order = np.lexsort((ti, tkey, tu))
    su = tu[order]
    last = np.ones(len(su), dtype=bool)
    last[:-1] = su[1:] != su[:-1]
    first = np.ones(len(su), dtype=bool)
    first[1:] = su[1:] != su[:-1]
    test_rows = tgt[order[last & ~first]]  # users with >= 2 target interactions
    n_users_target = int(last.sum())
    keep = np.ones(len(u), dtype=bool)
    keep[test_rows] = False
    test_user, test_item = u[test_rows], i[test_rows]
    users, items = [], []
    for k in range(K):
        m = keep & (b == k)
        users.append(u[m])
        items.append(i[m])
    tgt_keep = keep & (b == K - 1)
    return TableData(behaviors, users, items, test_user, test_item, user_ids.astype(object), item_ids.astype(object),
                     ts_sel[tgt_keep] if ts_sel is not None else None, dups,
                     n_users_target - len(test_rows), order_info)
