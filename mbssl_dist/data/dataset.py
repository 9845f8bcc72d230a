"""The canonical prepared dataset directory and its loader.

Layout of a prepared directory (written atomically by ``write_prepared``)::

    manifest.json    n_users, n_items, behaviors (target last), counts, n_test, n_valid, ...
    train.parquet    user:int32, item:int32, behavior:int8   (behavior = index into behaviors)
    valid.parquet    user:int32, item:int32                  (target behavior, one per user)
    test.parquet     user:int32, item:int32
    user_map.parquet / item_map.parquet   (table importer only) index:int32, id:string

Every consumer (swing, partition, trainer) reads it through ``load_prepared``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from .errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class PreparedDataset:
    """In-memory view of a prepared dataset directory (numpy arrays, 0-based dense ids)."""

    n_users: int
    n_items: int
    behaviors: list[str]
    train_user: np.ndarray
    train_item: np.ndarray
    train_behavior: np.ndarray
    valid_user: np.ndarray
    valid_item: np.ndarray
    test_user: np.ndarray
    test_item: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def target(self) -> str:
        return self.behaviors[-1]

    @property
    def n_behaviors(self) -> int:
        return len(self.behaviors)

    def behavior_index(self, name: str) -> int:
        try:
            return self.behaviors.index(name)
        except ValueError:
            raise KeyError(f"unknown behavior {name!r}; dataset has {self.behaviors}") from None

    def pairs(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of behavior ``k`` in the training graph."""
        m = self.train_behavior == k
        return self.train_user[m], self.train_item[m]

    def behavior_csr(self, k: int, dtype=np.float32) -> sp.csr_matrix:
        """Binary user x item CSR matrix of behavior ``k`` (sorted indices, no duplicates)."""
        u, i = self.pairs(k)
        m = sp.csr_matrix((np.ones(len(u), dtype=dtype), (u.astype(np.int64), i.astype(np.int64))),
                          shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.sort_indices()
        return m

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.train_behavior.astype(np.int64), minlength=self.n_behaviors)
        return {b: int(c[k]) for k, b in enumerate(self.behaviors)}

    def checksum(self) -> str:
        """Checksum identifying the prepared content (from the manifest)."""
        return str(self.manifest.get("content_sha256", ""))


def _table(cols: dict[str, np.ndarray]) -> pa.Table:
    return pa.table({k: pa.array(v) for k, v in cols.items()})


def write_prepared(out_dir: Path, ds: PreparedDataset, extra_tables: dict[str, pa.Table] | None = None) -> dict:
    """Write ``ds`` into an (already temporary) directory; return the final manifest.

    The caller wraps this in ``utils.io.atomic_dir`` so the directory appears whole.
    """
    import hashlib

    out_dir = Path(out_dir)
    tables = {
        "train": _table({"user": ds.train_user.astype(np.int32), "item": ds.train_item.astype(np.int32),
                         "behavior": ds.train_behavior.astype(np.int8)}),
        "valid": _table({"user": ds.valid_user.astype(np.int32), "item": ds.valid_item.astype(np.int32)}),
        "test": _table({"user": ds.test_user.astype(np.int32), "item": ds.test_item.astype(np.int32)}),
    }
    h = hashlib.sha256()
    for name, t in tables.items():
        pq.write_table(t, out_dir / f"{name}.parquet")
        for col in t.column_names:
            h.update(name.encode() + col.encode())
            h.update(np.ascontiguousarray(t[col].to_numpy()).tobytes())
    for name, t in (extra_tables or {}).items():
        pq.write_table(t, out_dir / f"{name}.parquet")
    manifest = dict(ds.manifest)
    manifest.update({
        "format_version": FORMAT_VERSION,
        "n_users": int(ds.n_users),
        "n_items": int(ds.n_items),
        "behaviors": list(ds.behaviors),
        "target": ds.behaviors[-1],
        "counts": ds.counts(),
        "n_train": int(len(ds.train_user)),
        "n_valid": int(len(ds.valid_user)),
        "n_test": int(len(ds.test_user)),
        "content_sha256": h.hexdigest(),
    })
    with open(out_dir / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    ds.manifest = manifest
    return manifest


def read_columns(path: str | os.PathLike, cols: list[str],
                 error: Callable[[str], Exception] | None = None) -> dict[str, np.ndarray]:
    """The columns ``cols`` of the Parquet file ``path`` as numpy arrays (strings: object).

    A file that cannot be read or lacks a column raises ``DataError`` naming the file, or
    ``error("PATH: problem")`` where given (the partition reader passes ``PartitionError``)."""
    def fail(problem: str) -> Exception:
        return error(f"{path}: {problem}") if error is not None else DataError(problem, file=str(path))

    try:
        t = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise fail(f"cannot read Parquet file: {e}") from e
    missing = [c for c in cols if c not in t.column_names]
    if missing:
        raise fail(f"missing column(s) {missing}; expected {cols}")
    return {c: t[c].to_numpy() for c in cols}


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Load a directory written by ``python -m mbssl_dist.data prepare``."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise DataError("not a prepared dataset directory (no manifest.json); run "
                        "`python -m mbssl_dist.data prepare` first", file=str(path))
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e}", file=str(mpath), line=e.lineno) from e
    for key in ("n_users", "n_items", "behaviors"):
        if key not in manifest:
            raise DataError(f"missing key {key!r}", file=str(mpath))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; "
                        "re-run prepare", file=str(mpath))
    for key in ("n_users", "n_items"):
        if isinstance(manifest[key], bool) or not isinstance(manifest[key], int) or manifest[key] < 1:
            raise DataError(f"{key} = {manifest[key]!r}: expected a positive integer", file=str(mpath))
    beh = manifest["behaviors"]
    if not isinstance(beh, list) or not beh or not all(isinstance(b, str) and b for b in beh):
        raise DataError(f"behaviors = {beh!r}: expected a non-empty list of names", file=str(mpath))
    tr = read_columns(path / "train.parquet", ["user", "item", "behavior"])
    va = read_columns(path / "valid.parquet", ["user", "item"])
    te = read_columns(path / "test.parquet", ["user", "item"])
    # Ids beyond the manifest's shape would index out of bounds deep inside swing, partition or
    # the trainer; an edited or mixed-up directory is caught here, naming file and row.
    limits = {"user": ("n_users", manifest["n_users"]), "item": ("n_items", manifest["n_items"]),
              "behavior": ("behaviors", len(beh))}
    for fname, cols in (("train.parquet", tr), ("valid.parquet", va), ("test.parquet", te)):
        for col, arr in cols.items():
            key, lim = limits[col]
            bad = np.flatnonzero((arr < 0) | (arr >= lim))
            if len(bad):
                r = int(bad[0])
                raise DataError(f"row {r + 1}: {col} {int(arr[r])} is outside [0, {lim}) declared by "
                                f"manifest.json {key} = {manifest[key] if key != 'behaviors' else beh}; the prepared "
                                "directory is inconsistent (re-run prepare)", file=str(path / fname), field=col)
    return PreparedDataset(
        n_users=int(manifest["n_users"]), n_items=int(manifest["n_items"]),
        behaviors=list(manifest["behaviors"]),
        train_user=tr["user"].astype(np.int32), train_item=tr["item"].astype(np.int32),
        train_behavior=tr["behavior"].astype(np.int8),
        valid_user=va["user"].astype(np.int32), valid_item=va["item"].astype(np.int32),
        test_user=te["user"].astype(np.int32), test_item=te["item"].astype(np.int32),
        manifest=manifest, path=path,
    )
