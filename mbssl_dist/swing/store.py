"""Reading and writing the swing output directory.

Layout::

    DIR/manifest.json
    DIR/items/part-00000.parquet ...   src:int32, dst:int32, score:float64, rank:int16|int32
    DIR/users/part-00000.parquet ...

Within a part, rows are sorted by (src, rank); rank 0 is the most similar neighbor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
SIDES = ("items", "users")
FORMAT_VERSION = 1


def rank_dtype(topn: int) -> type:
    return np.int16 if topn <= np.iinfo(np.int16).max + 1 else np.int32


def write_part(path: Path, src: np.ndarray, dst: np.ndarray, score: np.ndarray, rank: np.ndarray,
               topn: int) -> int:
    """Write one part file; returns its number of rows."""
    table = pa.table({
        "src": pa.array(np.asarray(src, dtype=np.int32)),
        "dst": pa.array(np.asarray(dst, dtype=np.int32)),
        "score": pa.array(np.asarray(score, dtype=np.float64)),
        "rank": pa.array(np.asarray(rank).astype(rank_dtype(topn))),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table.num_rows


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    mpath = Path(out) / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"{out}: not a swing output directory (no {MANIFEST}); "
                                "run `python -m mbssl_dist.swing` first")
    return json.loads(mpath.read_text())


def _side_name(side: str) -> str:
    s = {"item": "items", "items": "items", "user": "users", "users": "users"}.get(side)
    if s is None:
        raise ValueError(f"side must be 'items' or 'users', got {side!r}")
    return s


def load_swing(out: str | os.PathLike, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All rows of one side as ``(src, dst, score, rank)``, sorted by (src, rank)."""
    side = _side_name(side)
    man = read_manifest(out)
    if side not in man.get("results", {}):
        raise KeyError(f"{out}: side {side!r} was not computed (have {sorted(man.get('results', {}))})")
    files = sorted((Path(out) / side).glob("part-*.parquet"))
    if not files:
        z = np.zeros(0, np.int32)
        return z, z, np.zeros(0, np.float64), z
    t = pa.concat_tables([pq.read_table(f) for f in files])
    src = t["src"].to_numpy()
    rank = t["rank"].to_numpy()
    order = np.lexsort((rank, src))
    return (src[order], t["dst"].to_numpy()[order], t["score"].to_numpy()[order], rank[order])


def load_swing_topn(out: str | os.PathLike, side: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` neighbors of every source node as CSR arrays ``(indptr, indices)``.

    ``indices[indptr[s]:indptr[s+1]]`` are the neighbors of ``s``, most similar first
    (fewer than ``n`` when ``s`` has fewer neighbors).  ``n`` defaults to the stored top-N
    and must not exceed it.
    """
    side = _side_name(side)
    man = read_manifest(out)
    topn = int(man["topn"])
    if n is None:
        n = topn
    if n < 1 or n > topn:
        raise ValueError(f"n must be in [1, {topn}] (the stored top-N), got {n}")
    n_src = int(man["results"][side]["n_src"])
    src, dst, _, rank = load_swing(out, side)
    m = rank < n
    src, dst = src[m], dst[m]
    indptr = np.zeros(n_src + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=n_src), out=indptr[1:])
    return indptr, dst.astype(np.int32)
