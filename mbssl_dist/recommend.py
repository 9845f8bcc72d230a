"""``python -m mbssl_dist.recommend --run runs/NAME --k 50 --out recs.parquet`` (``mbssl-recommend``)

Top-K items per user from a run's saved model (``runs/NAME/model/``), written as one Parquet
file with columns ``user, rank, item, score``:

* ``user`` / ``item``: the dataset's ORIGINAL ids (strings) when it was prepared with
  ``--format table`` (through ``user_map.parquet`` / ``item_map.parquet``), else the dense
  integer ids (int32);
* ``rank``: 1 .. K (int32); ``score``: the model's score (float32), descending; ties are broken
  by ascending dense item id, the evaluator's tie rule, so Recall@K computed from these lists
  equals the evaluator's;
* rows are grouped by user, in the order of ``--users`` (default: all users by dense id). A
  user gets ``min(K, #candidates)`` rows.

Known target items (the user's training AND validation purchases) are excluded unless
``--include-seen``; auxiliary-behavior items (views, carts) stay candidates.

``--users FILE``: a subset, one id per line (text) or a Parquet file with a ``user`` column (or
exactly one column); ids are the dataset's original ids for a table dataset, else dense ids.
An unknown id, a duplicate or an empty line is an error naming the file and line (Parquet: row).

Memory is bounded by one block of ``--batch-size`` users x all items (capped so that a block
holds at most 2^25 scores), never a users x items matrix. Under ``torchrun`` every rank
propagates its part of the graph and scores its own users, block by block; the blocks are
gathered to rank 0, which writes the ONE output file (no shared filesystem needed). The file
is written under a temporary name and renamed; an existing ``--out`` is replaced only with
``--overwrite``, and never when it is one of the inputs (the model directory, the dataset
directory with its id maps, the users file) or lies inside one. Recommend runs on CPU (gloo
under torchrun).
Exit codes: 0 ok, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from .export import ModelArtifact, ModelError, Scoring, open_dataset, read_model_dir, run_model_dir

log = logging.getLogger("mbssl_dist.recommend")

MAX_BLOCK_SCORES = 1 << 25


class UsageError(ValueError):
    """Bad command-line input; ``str()`` is the one-line message (naming the file/line)."""


def topk_block(scores: torch.Tensor, k: int, excl_rows: torch.Tensor | None = None,
               excl_cols: torch.Tensor | None = None, inplace: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row of ``scores`` [B, I] without the (row, item) pairs
    ``(excl_rows, excl_cols)`` (no duplicates).

    Order: descending score, ties by ascending item id (the evaluator's rule). Returns
    ``(items [B, k'], scores [B, k'], counts [B])`` with ``k' = min(k, I)``; row ``b`` holds
    ``counts[b] = min(k, #candidates)`` valid entries (the rest are excluded items, score -inf).
    ``inplace`` lets it write the exclusions into ``scores``. One ``topk`` of k'+1 per row
    settles every row whose (k'+1)-th score is below its k'-th; only rows with a tie across the
    cut are scanned again to keep the smallest tied item ids.
    """
    lo, hi = torch.aminmax(scores) if scores.numel() else (scores.new_zeros(()), scores.new_zeros(()))
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise ValueError("the model produced non-finite scores")
    B, I = scores.shape
    kk = min(int(k), I)
    s = scores if inplace else scores.clone()
    n_cand = torch.full((B,), I, dtype=torch.int64)
    if excl_rows is not None and len(excl_rows):
        s[excl_rows, excl_cols] = float("-inf")
        n_cand -= torch.bincount(excl_rows, minlength=B)
    if kk == 0 or B == 0:
        return (torch.zeros(B, kk, dtype=torch.int64), s.new_zeros(B, kk), torch.clamp(n_cand, max=kk))
    kk1 = min(kk + 1, I)
    vals, idx = torch.topk(s, kk1, dim=1)
    items = idx[:, :kk].clone()
    thr = vals[:, kk - 1]
    if kk1 > kk:
        amb = torch.nonzero(vals[:, kk] == thr).flatten()  # a tie across the cut
        if len(amb):
            sub = s[amb]
            t = thr[amb, None]
            sel = sub > t
            eq = sub == t
            need = kk - sel.sum(1)
            sel |= eq & (torch.cumsum(eq, 1) <= need[:, None])
            items[amb] = torch.nonzero(sel)[:, 1].view(len(amb), kk)
    items = torch.sort(items, dim=1).values  # ascending id, then a stable sort by score
    v, order = torch.sort(s.gather(1, items), dim=1, descending=True, stable=True)
    return items.gather(1, order), v, torch.clamp(n_cand, max=kk)


class IdMap:
    """Original <-> dense ids of one side (a table dataset's ``*_map.parquet``), or identity."""

    def __init__(self, n: int, path: Path | None):
        self.n = n
        self.path = path
        self.ids: np.ndarray | None = None
        self._index: dict[str, int] | None = None
        if path is not None:
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            idx = t["index"].to_numpy().astype(np.int64)
            ids = np.asarray(t["id"].to_pylist(), dtype=object)
            if len(idx) != n or not np.array_equal(idx, np.arange(n)):
                raise ModelError(f"{path}: expected indices 0..{n - 1}")
            self.ids = ids

    @property
    def original(self) -> bool:
        return self.ids is not None

    def dense(self, value, where: str) -> int:
        """Dense id of one input value; ``where`` (``FILE:LINE``) names it in the error."""
        if self.ids is not None:
            if self._index is None:
                self._index = {str(v): i for i, v in enumerate(self.ids)}
            key = str(value)
            if key not in self._index:
                raise UsageError(f"{where}: unknown user id {key!r} (not in {self.path})")
            return self._index[key]
        try:
            i = int(str(value).strip())
        except ValueError:
            raise UsageError(f"{where}: user id {value!r} is not an integer (this dataset has dense ids)") from None
        if not 0 <= i < self.n:
            raise UsageError(f"{where}: unknown user id {i} (the dataset has users 0..{self.n - 1})")
        return i

    def to_original(self, dense: np.ndarray):
        import pyarrow as pa

        if self.ids is None:
            return pa.array(np.asarray(dense, dtype=np.int32))
        return pa.array(self.ids[np.asarray(dense, dtype=np.int64)].tolist(), pa.string())


def read_users_file(path: Path, umap: IdMap) -> np.ndarray:
    """Dense ids of the users listed in ``path`` (text lines or a Parquet column)."""
    if not path.is_file():
        raise UsageError(f"{path}: --users file not found")
    values: list[tuple[str, object]] = []
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise UsageError(f"{path}: cannot read Parquet ({e})") from None
        col = "user" if "user" in t.column_names else (t.column_names[0] if t.num_columns == 1 else None)
        if col is None:
            raise UsageError(f"{path}: needs a 'user' column (or exactly one column); has {t.column_names}")
        for r, v in enumerate(t[col].to_pylist(), 1):
            if v is None:
                raise UsageError(f"{path}: row {r}: null user id")
            values.append((f"{path}: row {r}", v))
    else:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: cannot read ({e})") from None
        for n, line in enumerate(text.splitlines(), 1):
            v = line.strip()
            if not v:
                raise UsageError(f"{path}:{n}: empty line (one user id per line)")
            values.append((f"{path}:{n}", v))
    if not values:
        raise UsageError(f"{path}: no user ids")
    out = np.empty(len(values), dtype=np.int64)
    first: dict[int, str] = {}
    for j, (where, v) in enumerate(values):
        u = umap.dense(v, where)
        if u in first:
            raise UsageError(f"{where}: user {v!r} listed twice (first at {first[u]})")
        first[u] = where
        out[j] = u
    return out


def seen_matrix(ds) -> sp.csr_matrix:
    """User x item CSR of the known target items: training purchases plus validation items."""
    from .evaluate import eval_masks

    return eval_masks(ds)["test"]


class Recommender:
    """Top-K lists from a model directory (collective under torchrun: every rank builds one)."""

    def __init__(self, model_dir: str | os.PathLike | ModelArtifact, comm=None, device: torch.device | str = "cpu",
                 data: str | os.PathLike | None = None, threads: int | None = None):
        self.art: ModelArtifact = model_dir if isinstance(model_dir, ModelArtifact) else read_model_dir(model_dir)
        t = threads if threads is not None else self.art.cfg.train.threads
        if t:
            torch.set_num_threads(t)
        self.ds = open_dataset(self.art, data)
        ds_dir = Path(self.ds.path)
        maps = (ds_dir / "user_map.parquet", ds_dir / "item_map.parquet")
        has_maps = all(p.is_file() for p in maps)
        self.users_map = IdMap(self.ds.n_users, maps[0] if has_maps else None)
        self.items_map = IdMap(self.ds.n_items, maps[1] if has_maps else None)
        self.scoring = Scoring(self.art, self.ds, comm, device)
        self.comm = self.scoring.comm
        self.seen = seen_matrix(self.ds)

    def dense_users(self, values: Sequence, where: str = "users") -> np.ndarray:
        """Dense ids of ``values`` (original ids for a table dataset)."""
        out = np.empty(len(values), dtype=np.int64)
        first: dict[int, int] = {}
        for j, v in enumerate(values):
            u = self.users_map.dense(v, f"{where}[{j}]")
            if u in first:
                raise UsageError(f"{where}[{j}]: user {v!r} listed twice (first at [{first[u]}])")
            first[u] = j
            out[j] = u
        return out

    def blocks(self, users: np.ndarray, k: int, include_seen: bool = False, batch_size: int = 1024
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(users [n], items [n, k'], scores [n, k'], counts [n])`` per block, in the order
        of ``users`` (dense ids). COLLECTIVE: every rank passes the same ``users``; rank 0 gets
        the gathered blocks, other ranks get empty ones."""
        comm = self.comm
        I = self.ds.n_items
        bs = max(1, min(int(batch_size), MAX_BLOCK_SCORES // max(I, 1)))
        g2l = self.scoring.part.global_to_local
        for start in range(0, len(users), bs):
            ub = np.asarray(users[start:start + bs], dtype=np.int64)
            pos = np.flatnonzero(g2l[ub] >= 0)
            mine = ub[pos]
            kk = min(int(k), I)
            if len(mine):
                s = self.scoring.scores(torch.from_numpy(mine))
                er = ec = None
                if not include_seen:
                    sub = self.seen[mine]
                    er = torch.from_numpy(np.repeat(np.arange(len(mine), dtype=np.int64), np.diff(sub.indptr)))
                    ec = torch.from_numpy(sub.indices.astype(np.int64))
                items, vals, counts = topk_block(s, kk, er, ec, inplace=True)
            else:
                items = torch.zeros(0, kk, dtype=torch.int64)
                vals = torch.zeros(0, kk, dtype=torch.float32)
                counts = torch.zeros(0, dtype=torch.int64)
            p_t = torch.from_numpy((start + pos).astype(np.int64))
            if comm.world_size > 1:
                p_t, items, vals, counts = (comm.all_gather_cat(x.contiguous())
                                            for x in (p_t, items, vals.to(torch.float32), counts))
            if not comm.is_main:
                continue
            order = torch.argsort(p_t)
            p_t, items, vals, counts = p_t[order], items[order], vals[order], counts[order]
            if p_t.numel() != len(ub) or not torch.equal(p_t, torch.arange(start, start + len(ub))):
                raise RuntimeError("ranks did not cover the block's users exactly once")
            yield ub, items.numpy(), vals.to(torch.float32).numpy(), counts.numpy()

    def table(self, users: np.ndarray, items: np.ndarray, vals: np.ndarray, counts: np.ndarray):
        """One block as a pyarrow Table ``user, rank, item, score``."""
        import pyarrow as pa

        kk = items.shape[1] if items.ndim == 2 else 0
        keep = np.arange(kk)[None, :] < counts[:, None]
        u = np.repeat(users, counts)
        rank = np.broadcast_to(np.arange(1, kk + 1, dtype=np.int32), items.shape)[keep]
        return pa.table({"user": self.users_map.to_original(u), "rank": pa.array(rank, pa.int32()),
                         "item": self.items_map.to_original(items[keep]),
                         "score": pa.array(vals[keep].astype(np.float32), pa.float32())})

    def frame(self, users: Sequence, k: int = 50, include_seen: bool = False, batch_size: int = 1024):
        """pandas DataFrame ``user, rank, item, score`` for ``users`` (original ids for a table
        dataset). Single process (the MLflow model's ``predict``)."""
        import pyarrow as pa

        dense = self.dense_users(list(users))
        parts = [self.table(*b) for b in self.blocks(dense, k, include_seen, batch_size)]
        t = pa.concat_tables(parts) if parts else self.table(np.zeros(0, np.int64), np.zeros((0, 0), np.int64),
                                                            np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
        return t.to_pandas()

    def write(self, out: Path, users: np.ndarray, k: int, include_seen: bool = False,
              batch_size: int = 1024) -> int:
        """Stream the lists of ``users`` into ``out`` (Parquet, atomically); rank 0 writes.
        Returns the number of rows written (0 on other ranks)."""
        import pyarrow.parquet as pq

        writer = tmp = None
        n = 0
        try:
            for block in self.blocks(users, k, include_seen, batch_size):
                t = self.table(*block)
                if writer is None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
                    os.close(fd)
                    writer = pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
                n += t.num_rows
            if writer is not None:
                writer.close()
                writer = None
                os.chmod(tmp, 0o644)
                os.replace(tmp, out)
                tmp = None
        finally:
            if writer is not None:
                writer.close()
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return n


def _inside(a: Path, b: Path) -> bool:
    """``a`` equals ``b`` or lies inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_out(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse an --out that is (or is inside / contains) an input, an existing directory, or an
    existing file without --overwrite."""
    o = out.resolve()
    for p in inputs:
        p = p.resolve()
        if _inside(o, p) or _inside(p, o):
            raise UsageError(f"{out}: --out would overwrite an input ({p}); choose another path")
    if o.is_dir():
        raise UsageError(f"{out}: --out is a directory")
    if o.exists() and not overwrite:
        raise UsageError(f"{out}: already exists (pass --overwrite to replace it)")
    anc = o.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK):
        raise UsageError(f"{out}: {anc} is not a writable directory")
    return o


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mbssl_dist.recommend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory (runs/NAME) with a saved model/ (under torchrun write --run-dir: torchrun's "
                        "own parser takes --run for an abbreviation of its --run-path)")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--k", type=int, default=50, help="items per user (default 50)")
    p.add_argument("--users", help="subset of users: text file (one id per line) or Parquet ('user' column)")
    p.add_argument("--include-seen", action="store_true",
                   help="keep the user's known target items (training and validation purchases)")
    p.add_argument("--batch-size", type=int, default=1024, help="users scored per block (default 1024)")
    p.add_argument("--data", help="prepared dataset directory, if it moved since training (checksum-checked)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's train.threads)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .parallel.dist import OpenComm, run_ranked

    def run(open_comm: OpenComm) -> int:
        if args.k < 1:
            raise UsageError(f"--k {args.k}: must be >= 1")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: must be >= 1")
        model_dir = run_model_dir(args.run)
        art = read_model_dir(model_dir)
        # inputs: the model, the dataset (with its id maps), the users file
        inputs = [model_dir, Path(args.data or art.meta["dataset"])]
        if args.users:
            inputs.append(Path(args.users))
        out = check_out(Path(args.out), inputs, args.overwrite)
        comm, device = open_comm(art.cfg.dist.collectives)
        t0 = time.perf_counter()
        rec = Recommender(art, comm, device, data=args.data, threads=args.threads)
        users = (read_users_file(Path(args.users), rec.users_map) if args.users
                 else np.arange(rec.ds.n_users, dtype=np.int64))
        t1 = time.perf_counter()
        n = rec.write(out, users, args.k, args.include_seen, args.batch_size)
        t2 = time.perf_counter()
        if comm.is_main:
            log.info("wrote %d rows for %d users to %s (model, graph and propagation %.2f s; scoring, top-K and "
                     "writing %.2f s = %.0f users/s)", n, len(users), out, t1 - t0, t2 - t1,
                     len(users) / max(t2 - t1, 1e-9))
        return 0

    return run_ranked("recommend", (UsageError, ModelError), run)


if __name__ == "__main__":
    sys.exit(main())
