"""``python -m mbssl_dist.swing --data PREPARED --out DIR --workers W [...]``

Top-N swing similarity (DESIGN Eq 6) of items and/or users, written atomically as Parquet
parts plus ``manifest.json``.  Under ``torchrun`` (``WORLD_SIZE > 1``) each rank computes its
shard of the source nodes and rank 0 publishes the directory.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import core

log = logging.getLogger("mbssl_dist.swing")


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mbssl_dist.swing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="prepared dataset directory")
    p.add_argument("--out", type=Path, required=True, help="output directory (appears atomically)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (ignored under torchrun)")
    p.add_argument("--side", default="both", help="item | user | both (default both)")
    p.add_argument("--behaviors", help="comma-separated behaviors to use (default: all, or those named "
                                       "in --weights)")
    p.add_argument("--weights", help="per-behavior weights, e.g. buy=1,cart=0.5 (default 1.0 each); "
                                     "a behavior with weight 0 is excluded")
    p.add_argument("--alpha", type=float, default=core.DEFAULT_ALPHA, help="swing alpha > 0 (default 0.5)")
    p.add_argument("--topn", type=int, default=core.DEFAULT_TOPN, help="neighbors kept per node (default 500)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_behaviors(spec_b: str | None, spec_w: str | None, available: list[str]) -> dict[str, float]:
    """Resolve ``--behaviors``/``--weights`` into ``{behavior: weight > 0}`` (dataset order)."""
    def check_name(name: str, opt: str) -> None:
        if name not in available:
            raise UsageError(f"{opt}: unknown behavior {name!r}; expected one of {','.join(available)}")

    chosen: list[str] | None = None
    if spec_b is not None:
        chosen = [x.strip() for x in spec_b.split(",")]
        if any(not x for x in chosen):
            raise UsageError(f"--behaviors {spec_b!r}: empty name; expected e.g. {','.join(available)}")
        for x in chosen:
            check_name(x, "--behaviors")
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"--behaviors {spec_b!r}: a behavior is named twice")
    weights: dict[str, float] = {}
    if spec_w is not None:
        for item in spec_w.split(","):
            name, eq, val = item.partition("=")
            name = name.strip()
            if not eq or not name:
                raise UsageError(f"--weights {spec_w!r}: expected NAME=VALUE[,NAME=VALUE...], e.g. buy=1,cart=0.5")
            check_name(name, "--weights")
            try:
                w = float(val)
            except ValueError:
                raise UsageError(f"--weights: weight of {name!r} is {val.strip()!r}; expected a number >= 0") \
                    from None
            if not math.isfinite(w) or w < 0:
                raise UsageError(f"--weights: weight of {name!r} is {val.strip()!r}; expected a finite number >= 0")
            if name in weights:
                raise UsageError(f"--weights: behavior {name!r} is given twice")
            if chosen is not None and name not in chosen:
                raise UsageError(f"--weights: behavior {name!r} is not in --behaviors {spec_b!r}")
            weights[name] = w
    if chosen is None:
        chosen = [b for b in available if b in weights] if weights else list(available)
    out = {b: weights.get(b, 1.0) for b in available if b in chosen}
    out = {b: w for b, w in out.items() if w != 0.0}
    if not out:
        raise UsageError("--weights: all behavior weights are zero; expected at least one weight > 0")
    return out


def parse_sides(side: str) -> list[str]:
    s = side.strip().lower()
    table = {"item": ["items"], "items": ["items"], "user": ["users"], "users": ["users"],
             "both": ["items", "users"]}
    if s not in table:
        raise UsageError(f"--side {side!r}: expected item, user or both")
    return table[s]


def validate(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise UsageError(f"--alpha {args.alpha}: expected a number > 0 (default 0.5)")
    if args.topn < 1:
        raise UsageError(f"--topn {args.topn}: expected an integer >= 1 (default 500)")
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: expected an integer >= 1")
    parse_sides(args.side)
    if not args.data.is_dir():
        raise UsageError(f"--data {args.data}: no such directory; expected a prepared dataset directory "
                         "(python -m mbssl_dist.data prepare ...)")
    if args.out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out}: already exists; pass --overwrite to replace it")


def side_matrices(ds: Any, side: str, behaviors: list[str]) -> list:
    """One binary ``n_src x n_mid`` CSR per behavior: items x users or users x items."""
    mats = []
    for b in behaviors:
        R = ds.behavior_csr(ds.behavior_index(b), dtype="float64")
        mats.append(R.T.tocsr() if side == "items" else R)
    return mats


def build_manifest(args: argparse.Namespace, ds: Any, weights: dict[str, float], sides: list[str],
                   results: dict[str, Any], workers: int, world: int, mode: str, t_total: float,
                   t_load: float) -> dict[str, Any]:
    from .store import FORMAT_VERSION, rank_dtype
    import numpy as np
    return {
        "kind": "mbssl_swing",
        "format_version": FORMAT_VERSION,
        "sides": sides,
        "behaviors": list(weights),
        "weights": weights,
        "alpha": args.alpha,
        "topn": args.topn,
        "rank_dtype": np.dtype(rank_dtype(args.topn)).name,
        "columns": {"src": "int32", "dst": "int32", "score": "float64",
                    "rank": np.dtype(rank_dtype(args.topn)).name},
        "ordering": "score descending; scores equal up to ~1e-12 relative tie, broken by smaller dst",
        "cap": {"enabled": False, "hub_cap": None, "capped_nodes": 0,
                "note": "exact: no hub neighbor is dropped"},
        "dataset": {"path": str(Path(args.data).resolve()), "content_sha256": ds.checksum(),
                    "n_users": ds.n_users, "n_items": ds.n_items},
        "workers": workers, "world_size": world, "mode": mode,
        "results": results,
        "timings": {"load_s": round(t_load, 3), "total_s": round(t_total, 3)},
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _load(args: argparse.Namespace):
    from ..data.dataset import load_prepared
    from ..data.errors import DataError
    try:
        ds = load_prepared(args.data)
    except DataError as e:
        raise UsageError(f"--data: {e}") from None
    weights = parse_behaviors(args.behaviors, args.weights, list(ds.behaviors))
    return ds, weights


def _jobs(args, ds, weights, sides):
    from .parallel import SideJob
    for side in sides:
        yield SideJob(side=side, behaviors=list(weights), weights=list(weights.values()),
                      mats=side_matrices(ds, side, list(weights)), alpha=args.alpha, topn=args.topn)


def run_local(args: argparse.Namespace) -> int:
    from ..utils.io import atomic_dir, atomic_write_json
    from .parallel import run_side_pool
    t0 = time.perf_counter()
    ds, weights = _load(args)
    sides = parse_sides(args.side)
    t_load = time.perf_counter() - t0
    log.info("swing: %s, behaviors %s, alpha %s, top-%d, %d worker(s)", "+".join(sides), weights,
             args.alpha, args.topn, args.workers)
    results: dict[str, Any] = {}
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        for job in _jobs(args, ds, weights, sides):
            ts = time.perf_counter()
            results[job.side] = run_side_pool(job, tmp / job.side, tmp / f"_scratch-{job.side}",
                                              args.workers, progress=not args.no_progress)
            results[job.side]["timings"]["total_s"] = round(time.perf_counter() - ts, 3)
            log.info("swing %s: %d rows for %d sources in %.1fs", job.side, results[job.side]["rows"],
                     results[job.side]["sources_with_neighbors"], time.perf_counter() - ts)
        mode = "pool" if args.workers > 1 else "inline"
        atomic_write_json(tmp / "manifest.json",
                          build_manifest(args, ds, weights, sides, results, args.workers, 1, mode,
                                         time.perf_counter() - t0, t_load))
    log.info("swing: wrote %s in %.1fs", args.out, time.perf_counter() - t0)
    return 0


def run_torchrun(args: argparse.Namespace) -> int:
    """One rank of ``torchrun --nproc_per_node W -m mbssl_dist.swing ...`` (gloo, through
    ``parallel``: its ``Comm`` barriers and broadcasts the output directory)."""
    from ..parallel.dist import init_distributed, shutdown
    from ..utils.io import atomic_dir, atomic_write_json
    from .parallel import run_side_rank

    t0 = time.perf_counter()
    comm, _ = init_distributed("cpu", "gloo", timeout=datetime.timedelta(hours=2))
    rank, world, barrier = comm.rank, comm.world_size, comm.barrier
    try:
        ds, weights = _load(args)  # every rank validates identically, so all fail together
        sides = parse_sides(args.side)
        t_load = time.perf_counter() - t0
        results: dict[str, Any] = {}
        if comm.is_main:
            with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
                comm.broadcast_object(str(tmp))
                for job in _jobs(args, ds, weights, sides):
                    ts = time.perf_counter()
                    results[job.side] = run_side_rank(job, tmp / job.side, tmp / f"_scratch-{job.side}",
                                                      rank, world, barrier, progress=not args.no_progress)
                    results[job.side]["timings"]["total_s"] = round(time.perf_counter() - ts, 3)
                atomic_write_json(tmp / "manifest.json",
                                  build_manifest(args, ds, weights, sides, results, world, world, "torchrun",
                                                 time.perf_counter() - t0, t_load))
            log.info("swing: wrote %s in %.1fs (%d ranks)", args.out, time.perf_counter() - t0, world)
        else:
            tmp = Path(comm.broadcast_object(None))
            for job in _jobs(args, ds, weights, sides):
                run_side_rank(job, tmp / job.side, tmp / f"_scratch-{job.side}", rank, world, barrier)
        barrier()
    finally:
        shutdown(comm)
    return 0


def tune_malloc() -> bool:
    """Keep large freed blocks in the heap (glibc only).

    The pair enumeration allocates and frees arrays of tens to hundreds of MB per chunk; with
    glibc's defaults each one is a fresh ``mmap`` whose pages fault in again (about 15% of the
    CPU time, all of it system time).  This is a short-lived batch process, so trading some
    retained memory for that is right.  Forked pool workers inherit the setting.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        ok &= libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        ok &= libc.mallopt(M_TOP_PAD, 64 << 20)
        return bool(ok)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        validate(args)
        tune_malloc()
        if world > 1:
            return run_torchrun(args)
        return run_local(args)
    except (UsageError, FileExistsError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
