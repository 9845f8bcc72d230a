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
from .text import default_order

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


def _read_table(path: Path) -> tuple[pa.Table, int]:
    """Return (table, header_offset) where row r is at file line r + header_offset."""
    if not path.is_file():
        raise DataError("input table does not exist", file=str(path))
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path), 0
        import pyarrow.csv as pacsv
        opts = pacsv.ConvertOptions(column_types={"user_id": pa.string(), "item_id": pa.string(),
                                                  "behavior": pa.string()}, strings_can_be_null=False)
        return pacsv.read_csv(path, convert_options=opts), 2
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot parse table: {e}", file=str(path)) from e


def _row_error(path: Path, off: int, row: int, msg: str, field: str | None = None) -> DataError:
    if off:
        return DataError(msg, file=str(path), line=row + off, field=field)
    return DataError(f"row {row}: {msg}", file=str(path), field=field)


def read_table(path: Path, behaviors: list[str] | None, target: str | None, seed: int) -> TableData:
    t, off = _read_table(path)
    missing = [c for c in REQUIRED if c not in t.column_names]
    if missing:
        raise DataError(f"missing column(s) {missing}; expected user_id, item_id, behavior[, timestamp], "
                        f"found {t.column_names}", file=str(path))
    if t.num_rows == 0:
        raise DataError("table has no rows (empty dataset)", file=str(path))
    cols = {}
    for c in REQUIRED:
        arr = t[c].cast(pa.string())
        bad = pc.or_(pc.is_null(arr), pc.equal(pc.utf8_trim_whitespace(arr), ""))
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise _row_error(path, off, row, f"empty {c}", field=c)
        cols[c] = np.asarray(arr.to_pylist(), dtype=object)
    ts = None
    if "timestamp" in t.column_names:
        col = t["timestamp"]
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            col = col.cast(pa.timestamp("us")).cast(pa.int64())
        try:
            ts_arr = col.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"timestamp column is not numeric or a timestamp: {e}", file=str(path),
                            field="timestamp") from e
        if ts_arr.null_count:
            row = int(np.flatnonzero(pc.is_null(ts_arr).to_numpy(zero_copy_only=False))[0])
            raise _row_error(path, off, row, "missing timestamp", field="timestamp")
        ts = ts_arr.to_numpy()

    present = sorted(set(cols["behavior"].tolist()))
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
            raise _row_error(path, off, row, f"unknown behavior {unknown[0]!r}; --behaviors lists {behaviors}",
                             field="behavior")
        absent = [b for b in behaviors if b not in present]
        if behaviors[-1] in absent:
            raise DataError(f"target behavior {behaviors[-1]!r} does not occur in the table", file=str(path),
                            field="behavior")
        if absent:
            raise DataError(f"behavior(s) {absent} listed in --behaviors do not occur in the table", file=str(path),
                            field="behavior")

    user_ids, u = np.unique(cols["user_id"].astype(str), return_inverse=True)
    item_ids, i = np.unique(cols["item_id"].astype(str), return_inverse=True)
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
                     n_users_target - len(test_rows))
