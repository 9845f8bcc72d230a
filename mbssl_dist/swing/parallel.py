"""Parallel swing driver: a process pool in one process, or one shard per torchrun rank.

Both modes run the same two phases (see ``core``):

1. pair enumeration, in fixed data-determined chunks of intermediaries (independent of the
   worker count), written as ``.npy`` files to a scratch directory;
2. similarity rows + top-N, one shard of source nodes per worker (balanced by the exact
   multiply-add count with a greedy LPT assignment), each shard written as one Parquet part.

Because chunks and summation order never depend on the worker count, the scores are
bit-identical for any number of workers.
"""

from __future__ import annotations

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

from . import core
from .store import write_part

log = logging.getLogger(__name__)


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

    def chunks(self) -> list[tuple[int, int, int, int, int]]:
        """All phase-1 tasks ``(task_id, behavior, mid_lo, mid_hi, n_triples)``."""
        tasks = []
        for b, idx in enumerate(self.indexes()):
            for lo, hi, n in core.plan_chunks(idx, self.chunk_triples):
                tasks.append((len(tasks), b, lo, hi, n))
        return tasks


# -------------------------------------------------------------------------------------------
# worker-side functions (module level so that they pickle)
# -------------------------------------------------------------------------------------------

_JOB: SideJob | None = None


def _init_worker(job: SideJob) -> None:
    global _JOB
    _JOB = job
    logging.getLogger().setLevel(logging.WARNING)


def _chunk_path(scratch: Path, task_id: int, what: str) -> Path:
    return scratch / f"chunk-{task_id:06d}.{what}.npy"


def phase1(job: SideJob, task: tuple[int, int, int, int, int], scratch: Path) -> dict[str, Any]:
    """Enumerate the pairs of one chunk; save ``lens``, ``srcs`` and per-source costs."""
    t0 = time.perf_counter()
    task_id, b, lo, hi, n_triples = task
    lens, srcs, run = core.enumerate_pairs(job.indexes()[b], lo, hi)
    cost = np.bincount(srcs, weights=lens[run].astype(np.float64), minlength=job.n_src)
    np.save(_chunk_path(scratch, task_id, "lens"), lens)
    np.save(_chunk_path(scratch, task_id, "srcs"), srcs)
    np.save(_chunk_path(scratch, task_id, "run"), run)
    np.save(_chunk_path(scratch, task_id, "cost"), cost)
    return {"task": task_id, "behavior": b, "triples": n_triples, "pairs": int(len(lens)),
            "entries": int(len(srcs)), "flops": float(cost.sum()), "seconds": time.perf_counter() - t0}


def _phase1_pool(args: tuple[tuple[int, int, int, int, int], str]) -> dict[str, Any]:
    assert _JOB is not None
    return phase1(_JOB, args[0], Path(args[1]))


def load_pair_matrices(job: SideJob, tasks: Sequence[tuple[int, int, int, int, int]],
                       scratch: Path) -> list[core.PairMatrix]:
    """Assemble each behavior's ``M`` from its chunk files, in chunk order."""
    pms = []
    for b in range(len(job.mats)):
        parts = [tuple(np.load(_chunk_path(scratch, t[0], w)) for w in ("lens", "srcs", "run"))
                 for t in tasks if t[1] == b]
        pms.append(core.PairMatrix.from_chunks(job.n_src, parts))
    return pms


def phase2(job: SideJob, tasks: Sequence[tuple[int, int, int, int, int]], scratch: Path,
           sources: np.ndarray, part_path: Path) -> dict[str, Any]:
    """Similarity rows and top-N for one shard of sources; writes one Parquet part."""
    t0 = time.perf_counter()
    pms = load_pair_matrices(job, tasks, scratch)
    src, dst, score, rank = core.similarity_topk(pms, job.weights, job.alpha, job.topn, sources,
                                                 job.block_flops)
    rows = write_part(part_path, src, dst, score, rank, job.topn)
    return {"part": part_path.name, "sources": int(len(sources)), "rows": rows,
            "sources_with_neighbors": int(len(np.unique(src))), "seconds": time.perf_counter() - t0}


def _phase2_pool(args: tuple[list, str, np.ndarray, str]) -> dict[str, Any]:
    assert _JOB is not None
    return phase2(_JOB, args[0], Path(args[1]), args[2], Path(args[3]))


def total_costs(job: SideJob, tasks: Sequence[tuple[int, int, int, int, int]], scratch: Path) -> np.ndarray:
    cost = np.zeros(job.n_src)
    for t in tasks:
        c = np.load(_chunk_path(scratch, t[0], "cost"))
        if job.weights[t[1]] != 0:
            cost += c
    return cost


def shard_sources(costs: np.ndarray, n_shards: int) -> list[np.ndarray]:
    """Balanced shards of all source ids (LPT on exact cost; zero-cost sources round-robin)."""
    assign = core.lpt_assign(costs + 1e-3, n_shards)  # tiny constant: spreads empty rows too
    return [np.flatnonzero(assign == r) for r in range(n_shards)]


def summarize(job: SideJob, p1: list[dict], p2: list[dict], t_enum: float, t_sim: float) -> dict[str, Any]:
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
            "timings": {"enumerate_s": round(t_enum, 3), "similarity_s": round(t_sim, 3),
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
    bar = _progress(len(tasks) + workers, f"swing {job.side}", progress)
    pool = None
    try:
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(job,))
            p1 = []
            for r in pool.imap_unordered(_phase1_pool, [(t, str(scratch)) for t in order]):
                p1.append(r)
                if bar is not None:
                    bar.update(1)
        else:
            p1 = []
            for t in order:
                p1.append(phase1(job, t, scratch))
                if bar is not None:
                    bar.update(1)
        t_enum = time.perf_counter() - t0
        t1 = time.perf_counter()
        shards = shard_sources(total_costs(job, tasks, scratch), workers)
        args = [(tasks, str(scratch), s, str(part_dir / f"part-{r:05d}.parquet")) for r, s in enumerate(shards)]
        p2 = []
        if pool is not None:
            for r in pool.imap_unordered(_phase2_pool, args):
                p2.append(r)
                if bar is not None:
                    bar.update(1)
        else:
            for a in args:
                p2.append(phase2(job, a[0], Path(a[1]), a[2], Path(a[3])))
                if bar is not None:
                    bar.update(1)
        t_sim = time.perf_counter() - t1
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return summarize(job, p1, p2, t_enum, t_sim)


def run_side_rank(job: SideJob, part_dir: Path, scratch: Path, rank: int, world: int,
                  barrier: Callable[[], None], progress: bool = False) -> dict[str, Any] | None:
    """One torchrun rank's share of one side; returns the summary on rank 0 only.

    ``barrier`` must synchronise all ranks (gloo barrier).  Every rank derives the same
    chunk plan and shard assignment from the data, so no task list is communicated.
    """
    if rank == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        part_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    tasks = job.chunks()
    t0 = time.perf_counter()
    owner = core.lpt_assign(np.array([t[4] for t in tasks], dtype=np.float64), world)
    mine = [t for t, o in zip(tasks, owner) if o == rank]
    p1 = [phase1(job, t, scratch) for t in mine]
    _save_json(scratch / f"phase1-rank{rank:05d}.json", p1)
    barrier()
    t_enum = time.perf_counter() - t0
    t1 = time.perf_counter()
    shards = shard_sources(total_costs(job, tasks, scratch), world)
    p2 = phase2(job, tasks, scratch, shards[rank], part_dir / f"part-{rank:05d}.parquet")
    _save_json(scratch / f"phase2-rank{rank:05d}.json", [p2])
    barrier()
    t_sim = time.perf_counter() - t1
    if rank != 0:
        return None
    all1: list[dict] = []
    all2: list[dict] = []
    for r in range(world):
        all1 += _load_json(scratch / f"phase1-rank{r:05d}.json")
        all2 += _load_json(scratch / f"phase2-rank{r:05d}.json")
    summary = summarize(job, all1, all2, t_enum, t_sim)
    shutil.rmtree(scratch, ignore_errors=True)
    return summary


def _save_json(path: Path, obj: Any) -> None:
    import json
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _load_json(path: Path) -> Any:
    import json
    return json.loads(path.read_text())
