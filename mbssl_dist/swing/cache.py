"""Swing on first use for the trainer: a cache directory keyed by the dataset content and
the swing parameters, computed by ``python -m mbssl_dist.swing`` when missing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .store import load_swing_topn

log = logging.getLogger(__name__)
TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def swing_dir_for(cfg, ds) -> Path:
    sc = cfg.swing
    key = {"data": ds.checksum(), "alpha": sc.alpha, "weights": sorted(sc.weights.items()), "topn": sc.topn}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.data.cache_dir) / f"swing-{digest}"


def ensure_swing(cfg, ds, compute: bool = True) -> Path:
    """Directory of the swing top-N of ``ds``; computed (both sides) if absent and ``compute``."""
    out = swing_dir_for(cfg, ds)
    if (out / "manifest.json").is_file():
        return out
    if not compute:
        raise FileNotFoundError(f"swing output {out} missing (rank 0 should have computed it)")
    sc = cfg.swing
    cmd = [sys.executable, "-m", "mbssl_dist.swing", "--data", str(ds.path), "--out", str(out),
           "--workers", str(sc.workers), "--side", "both", "--alpha", repr(sc.alpha), "--topn", str(sc.topn),
           "--overwrite"]
    if sc.weights:
        used = {b: w for b, w in sc.weights.items() if w > 0}
        cmd += ["--behaviors", ",".join(used), "--weights", ",".join(f"{b}={w}" for b, w in used.items())]
    log.info("computing swing similarity: %s", " ".join(cmd))
    # The trainer may itself run under torchrun: hide its rendezvous variables, or the swing
    # CLI would take itself for one rank of a distributed swing job and wait for the others.
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC")}
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"swing computation failed (exit {r.returncode}): {' '.join(cmd)}")
    return out


def load_topn_csr(swing_dir: Path, side: str, n: int, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``n`` neighbors per node as (indptr int64 [n_nodes+1], indices int64)."""
    indptr, indices = load_swing_topn(swing_dir, side, n)
    if len(indptr) != n_nodes + 1:
        raise ValueError(f"{swing_dir}: {side} side has {len(indptr) - 1} nodes, dataset has {n_nodes}")
    return indptr.astype(np.int64), indices.astype(np.int64)
