"""Parallel swing driver: a process pool in one process, or one shard per torchrun rank.

Both modes run the same three steps (see ``core``), all split across the workers:

1. *pairs*: pair enumeration in fixed, data-determined chunks of intermediaries (independent
   of the worker count), each chunk saved as ``.npy`` files in a scratch directory with its
   per-source entry counts;
2. *layout + fill*: from the chunk sizes alone, the offsets of every chunk in the stacked pair
   matrix ``diag(w) M`` (CSR) and in its transpose pattern ``M^T`` (CSR, pairs ascending per
   row) are computed once; then each chunk writes its own slices of both into shared
   memory-mapped ``.npy`` files (a per-chunk stable counting sort gives its part of ``M^T``);
3. *similarity*: contiguous blocks of source nodes, each ``M^T[block] @ (diag(w) M)`` plus
   top-N, read straight from the memory-mapped files (no worker ever assembles ``M``; the
   pages are shared through the page cache).  Pool workers pull blocks from a shared counter
   (dynamic balance) and each writes one Parquet part; torchrun ranks take contiguous shards
   of equal cost.

Because chunks, offsets and summation order never depend on the worker count, the scores are
bit-identical for any number of workers (and equal to ``core.similarity_topk``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp

from ..utils.lpt import lpt_assign
from . import core
from .store import write_part

log = logging.getLogger(__name__)

Task = tuple[int, int, int, int, int]   # (task_id, behavior, mid_lo, mid_hi, n_triples)


@dataclass
class SideJob:
    """Everything a worker needs for one side: one ``n_src x n_mid`` matrix per behavior."""

    side: str                       # "items" | "users"
    behaviors: list[str]
    weights: list[float]
    mats: list[sp.csr_matrix]
    alpha: float = core.DEFAULT_ALPHA
    topn: int = core.DEFAULT_TOPN
    chunk_triples: int = core.CHUNK_TRIPLES
    block_flops: float = core.BLOCK_FLOPS
    _indexes: list[core.SideIndex] | None = field(default=None, repr=False)

    @property
    def n_src(self) -> int:
        return int(self.mats[0].shape[0])

    @property
    def n_mid(self) -> int:
        return int(self.mats[0].shape[1])

    def indexes(self) -> list[core.SideIndex]:
        if self._indexes is None:
            self._indexes = [core.SideIndex.build(X) for X in self.mats]
        return self._indexes

    def chunks(self) -> list[Task]:
        """All phase-1 tasks ``(task_id, behavior, mid_lo, mid_hi, n_triples)`` of the behaviors
        with a nonzero weight, in stacking order (behavior, then intermediary range)."""
        tasks: list[Task] = []
        for b, idx in enumerate(self.indexes()):
            if self.weights[b] == 0.0:
                continue
            for lo, hi, n in core.plan_chunks(idx, self.chunk_triples):
                tasks.append((len(tasks), b, lo, hi, n))
        return tasks


# -------------------------------------------------------------------------------------------
# step 1: pairs
# -------------------------------------------------------------------------------------------

def _chunk_path(scratch: Path, task_id: int, what: str) -> Path:
    return scratch / f"chunk-{task_id:06d}.{what}.npy"


def phase1(job: SideJob, task: Task, scratch: Path) -> dict[str, Any]:
    """Enumerate the pairs of one chunk; save ``lens``, ``srcs`` and per-source entry counts."""
    t0 = time.perf_counter()
    task_id, b, lo, hi, n_triples = task
    lens, srcs = core.enumerate_pairs(job.indexes()[b], lo, hi)
    cnt = np.bincount(srcs, minlength=job.n_src).astype(np.int64)
    np.save(_chunk_path(scratch, task_id, "lens"), lens)
    np.save(_chunk_path(scratch, task_id, "srcs"), srcs)
    np.save(_chunk_path(scratch, task_id, "cnt"), cnt)
    flops = float(np.dot(lens.astype(np.float64), lens.astype(np.float64)))
    return {"task": task_id, "behavior": b, "triples": n_triples, "pairs": int(len(lens)),
            "entries": int(len(srcs)), "flops": flops, "seconds": time.perf_counter() - t0}


# -------------------------------------------------------------------------------------------
# step 2: layout and fill of the shared memory-mapped stacked pair matrix
# -------------------------------------------------------------------------------------------

_ARRAYS = ("indptr", "indices", "data", "t_indptr", "t_indices", "costs")


def _array_path(scratch: Path, name: str) -> Path:
    return scratch / f"stacked.{name}.npy"


def make_layout(job: SideJob, tasks: Sequence[Task], p1: Sequence[dict], scratch: Path) -> dict[str, Any]:
    """Offsets of every chunk in ``M`` and ``M^T``; creates the (empty) memory-mapped arrays.

    Deterministic in the data only.  Returns the layout (also saved as ``layout.json``).
    """
    stats = {r["task"]: r for r in p1}
    tasks = sorted(tasks)
    pairs = np.array([stats[t[0]]["pairs"] for t in tasks], dtype=np.int64)
    entries = np.array([stats[t[0]]["entries"] for t in tasks], dtype=np.int64)
    pbase = np.concatenate([[0], np.cumsum(pairs)])
    ebase = np.concatenate([[0], np.cumsum(entries)])
    P, E, n = int(pbase[-1]), int(ebase[-1]), job.n_src
    it = core.index_dtype(E, P, n)
    # start of each chunk's segment in each row of M^T: rows ordered by source, chunks in order
    tstart = np.zeros((len(tasks), n), dtype=np.int64)
    tot = np.zeros(n, dtype=np.int64)
    for k, t in enumerate(tasks):
        tstart[k] = tot
        tot += np.load(_chunk_path(scratch, t[0], "cnt"))
    t_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(tot, out=t_indptr[1:])
    tstart += t_indptr[:-1][None, :]
    np.save(scratch / "tstart.npy", tstart)
    shapes = {"indptr": (P + 1, it), "indices": (E, it), "data": (E, np.float64),
              "t_indptr": (n + 1, it), "t_indices": (E, it), "costs": (n, np.float64)}
    for name, (size, dt) in shapes.items():
        a = np.lib.format.open_memmap(_array_path(scratch, name), mode="w+", dtype=dt, shape=(size,))
        if name == "indptr":
            a[0] = 0
        elif name == "t_indptr":
            a[:] = t_indptr
        del a
    layout = {"tasks": [list(t) for t in tasks], "pbase": pbase.tolist(), "ebase": ebase.tolist(),
              "P": P, "E": E, "n_src": n}
    _save_json(scratch / "layout.json", layout)
    return layout


def fill(job: SideJob, task: Task, layout: dict[str, Any], scratch: Path, sync: bool = False) -> float:
    """Write one chunk's rows of ``diag(w) M`` and its segments of ``M^T`` (disjoint slices)."""
    t0 = time.perf_counter()
    k = [t[0] for t in layout["tasks"]].index(task[0])
    pb, eb = int(layout["pbase"][k]), int(layout["ebase"][k])
    lens = np.load(_chunk_path(scratch, task[0], "lens"))
    srcs = np.load(_chunk_path(scratch, task[0], "srcs"))
    if len(lens) == 0:
        return time.perf_counter() - t0
    arr = {name: np.load(_array_path(scratch, name), mmap_mode="r+")
           for name in ("indptr", "indices", "data", "t_indices")}
    it = arr["indptr"].dtype
    loc = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=loc[1:])
    arr["indptr"][pb + 1:pb + len(lens) + 1] = loc[1:] + eb
    arr["indices"][eb:eb + len(srcs)] = srcs
    arr["data"][eb:eb + len(srcs)] = core.entry_weights(lens, job.alpha, job.weights[task[1]])
    # this chunk's part of M^T: stable counting sort of its entries by source (pairs ascending)
    Tc = sp.csr_matrix((np.ones(len(srcs), dtype=np.bool_), srcs, loc), shape=(len(lens), job.n_src)).tocsc()
    tstart = np.load(scratch / "tstart.npy", mmap_mode="r")[k]
    cnt = np.diff(Tc.indptr)
    pos = np.repeat(tstart - Tc.indptr[:-1], cnt)
    pos += np.arange(len(pos), dtype=np.int64)
    arr["t_indices"][pos] = (Tc.indices.astype(np.int64) + pb).astype(it)
    if sync:
        for a in arr.values():
            a.flush()
    del arr
    return time.perf_counter() - t0


def finish_layout(job: SideJob, tasks: Sequence[Task], scratch: Path) -> None:
    """Per-source costs (cheap; from the chunk files)."""
    costs = np.load(_array_path(scratch, "costs"), mmap_mode="r+")
    acc = np.zeros(job.n_src)
    for t in sorted(tasks):
        acc += core.source_costs(np.load(_chunk_path(scratch, t[0], "lens")),
                                 np.load(_chunk_path(scratch, t[0], "srcs")), job.n_src)
    costs[:] = acc
    costs.flush()
    del costs


def open_stacked(scratch: Path, n_src: int) -> core.StackedPairs:
    a = {name: np.load(_array_path(scratch, name), mmap_mode="r") for name in _ARRAYS}
    return core.StackedPairs(n_src, a["indptr"], a["indices"], a["data"], a["t_indptr"], a["t_indices"],
                             np.asarray(a["costs"]))


# -------------------------------------------------------------------------------------------
# step 3: similarity rows
# -------------------------------------------------------------------------------------------

def plan_phase2_blocks(costs: np.ndarray, block_flops: float, min_blocks: int = 16) -> float:
    """Block target: at most ``block_flops``, and at least ``min_blocks`` blocks (balance)."""
    total = float(np.sum(costs))
    return max(1.0, min(block_flops, total / min_blocks)) if total > 0 else block_flops


def phase2(job: SideJob, scratch: Path, sources: np.ndarray, part_path: Path,
           next_block: Callable[[], int] | None = None) -> dict[str, Any]:
    """Similarity rows and top-N for ``sources`` (or the blocks handed out by ``next_block``);
    writes one Parquet part."""
    t0 = time.perf_counter()
    st = open_stacked(scratch, job.n_src)
    target = plan_phase2_blocks(st.costs, job.block_flops)
    src, dst, score, rank = core.stacked_topk(st, sources, job.topn, target, next_block)
    rows = write_part(part_path, src, dst, score, rank, job.topn)
    return {"part": part_path.name, "rows": rows, "sources_with_neighbors": int(len(np.unique(src))),
            "seconds": time.perf_counter() - t0}


def contiguous_shards(costs: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """``n_shards`` contiguous ranges of source ids of about equal cost."""
    n = len(costs)
    cum = np.cumsum(np.asarray(costs, dtype=np.float64) + 1e-3)
    cuts = [0] + [int(np.searchsorted(cum, cum[-1] * r / n_shards, side="right")) for r in range(1, n_shards)] + [n]
    cuts = np.maximum.accumulate(np.minimum(cuts, n))
    return [np.arange(cuts[r], cuts[r + 1], dtype=np.int64) for r in range(n_shards)]


# -------------------------------------------------------------------------------------------
# pool worker plumbing (module level so that it pickles)
# -------------------------------------------------------------------------------------------

_JOB: SideJob | None = None
_COUNTER: Any = None


def _init_worker(job: SideJob, counter: Any) -> None:
    global _JOB, _COUNTER
    _JOB = job
    _COUNTER = counter
    logging.getLogger().setLevel(logging.WARNING)


def _next_block() -> int:
    with _COUNTER.get_lock():
        i = int(_COUNTER.value)
        _COUNTER.value = i + 1
    return i


def _phase1_pool(args: tuple[Task, str]) -> dict[str, Any]:
    assert _JOB is not None
    return phase1(_JOB, args[0], Path(args[1]))


def _fill_pool(args: tuple[Task, dict, str]) -> float:
    assert _JOB is not None
    return fill(_JOB, args[0], args[1], Path(args[2]))


def _phase2_pool(args: tuple[str, str]) -> dict[str, Any]:
    assert _JOB is not None
    return phase2(_JOB, Path(args[0]), np.arange(_JOB.n_src, dtype=np.int64), Path(args[1]), _next_block)


def summarize(job: SideJob, p1: list[dict], p2: list[dict], t_enum: float, t_fill: float, t_sim: float
              ) -> dict[str, Any]:
    per_b: dict[str, dict[str, Any]] = {}
    for b, name in enumerate(job.behaviors):
        rs = [r for r in p1 if r["behavior"] == b]
        per_b[name] = {"weight": job.weights[b], "interactions": int(job.mats[b].nnz),
                       "chunks": len(rs), "triples": int(sum(r["triples"] for r in rs)),
                       "pairs": int(sum(r["pairs"] for r in rs)),
                       "pair_entries": int(sum(r["entries"] for r in rs)),
                       "flops": float(sum(r["flops"] for r in rs))}
    p2 = sorted(p2, key=lambda r: r["part"])
    return {"n_src": job.n_src, "n_mid": job.n_mid, "n_parts": len(p2),
            "parts": [r["part"] for r in p2], "rows": int(sum(r["rows"] for r in p2)),
            "sources_with_neighbors": int(sum(r["sources_with_neighbors"] for r in p2)),
            "per_behavior": per_b,
            "timings": {"enumerate_s": round(t_enum, 3), "layout_s": round(t_fill, 3),
                        "similarity_s": round(t_sim, 3),
                        "phase2_part_s": [round(r["seconds"], 3) for r in p2]}}


# -------------------------------------------------------------------------------------------
# drivers
# -------------------------------------------------------------------------------------------

def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="task", disable=not enabled, leave=False)


def run_side_pool(job: SideJob, part_dir: Path, scratch: Path, workers: int,
                  progress: bool = True) -> dict[str, Any]:
    """Compute one side with ``workers`` processes (``workers == 1``: in this process)."""
    scratch.mkdir(parents=True, exist_ok=True)
    part_dir.mkdir(parents=True, exist_ok=True)
    tasks = job.chunks()
    t0 = time.perf_counter()
    order = sorted(tasks, key=lambda t: (-t[4], t[0]))  # biggest first: dynamic load balance
    bar = _progress(2 * len(tasks) + workers, f"swing {job.side}", progress)
    parts = [str(part_dir / f"part-{r:05d}.parquet") for r in range(workers)]
    pool = None
    counter = None

    def tick(x):
        if bar is not None:
            bar.update(1)
        return x

    try:
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            counter = ctx.Value("q", 0)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(job, counter))
            p1 = [tick(r) for r in pool.imap_unordered(_phase1_pool, [(t, str(scratch)) for t in order])]
        else:
            p1 = [tick(phase1(job, t, scratch)) for t in order]
        t_enum = time.perf_counter() - t0
        t1 = time.perf_counter()
        layout = make_layout(job, tasks, p1, scratch)
        if pool is not None:
            for _ in pool.imap_unordered(_fill_pool, [(t, layout, str(scratch)) for t in order]):
                tick(None)
        else:
            for t in order:
                tick(fill(job, t, layout, scratch))
        finish_layout(job, tasks, scratch)
        t_fill = time.perf_counter() - t1
        t2 = time.perf_counter()
        if pool is not None:
            p2 = [tick(r) for r in pool.imap_unordered(_phase2_pool, [(str(scratch), p) for p in parts])]
        else:
            p2 = [tick(phase2(job, scratch, np.arange(job.n_src, dtype=np.int64), Path(parts[0])))]
        t_sim = time.perf_counter() - t2
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize(job, p1, p2, t_enum, t_fill, t_sim)


def run_side_rank(job: SideJob, part_dir: Path, scratch: Path, rank: int, world: int,
                  barrier: Callable[[], None], progress: bool = False) -> dict[str, Any] | None:
    """One torchrun rank's share of one side; returns the summary on rank 0 only.

    ``barrier`` must synchronise all ranks (gloo barrier).  Every rank derives the same
    chunk plan, layout and shards from the data, so no task list is communicated.
    """
    if rank == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        part_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    tasks = job.chunks()
    t0 = time.perf_counter()
    owner = lpt_assign(np.array([t[4] for t in tasks], dtype=np.float64), world)
    mine = [t for t, o in zip(tasks, owner) if o == rank]
    p1 = [phase1(job, t, scratch) for t in mine]
    _save_json(scratch / f"phase1-rank{rank:05d}.json", p1)
    barrier()
    t_enum = time.perf_counter() - t0
    t1 = time.perf_counter()
    all1: list[dict] = []
    for r in range(world):
        all1 += _load_json(scratch / f"phase1-rank{r:05d}.json")
    if rank == 0:
        layout = make_layout(job, tasks, all1, scratch)
    barrier()
    layout = _load_json(scratch / "layout.json")
    for t in mine:
        fill(job, t, layout, scratch, sync=True)
    if rank == 0:
        finish_layout(job, tasks, scratch)
    barrier()
    t_fill = time.perf_counter() - t1
    t2 = time.perf_counter()
    costs = np.load(_array_path(scratch, "costs"))
    shard = contiguous_shards(costs, world)[rank]
    p2 = phase2(job, scratch, shard, part_dir / f"part-{rank:05d}.parquet")
    _save_json(scratch / f"phase2-rank{rank:05d}.json", [p2])
    barrier()
    t_sim = time.perf_counter() - t2
    if rank != 0:
        return None
    all2: list[dict] = []
    for r in range(world):
        all2 += _load_json(scratch / f"phase2-rank{r:05d}.json")
    summary = summarize(job, all1, all2, t_enum, t_fill, t_sim)
    shutil.rmtree(scratch, ignore_errors=True)
    return summary


def _save_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())
