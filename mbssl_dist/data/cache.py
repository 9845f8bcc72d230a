"""Prepare-on-first-use: map a ``DataConfig`` to a cached prepared directory.

The cache key covers everything that changes the prepared content: importer, input path,
the size and mtime of each input file, behavior order, declared shape and split options.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .dataset import MANIFEST
from .errors import DataError

log = logging.getLogger(__name__)


def _fingerprint(path: Path) -> list:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def prepared_dir_for(dc) -> Path:
    """Directory where the prepared data of ``dc`` (a ``config.DataConfig``) lives."""
    if dc.format == "prepared":
        return Path(dc.path)
    key = {"format": dc.format, "behaviors": dc.behaviors, "target": dc.target, "valid": dc.valid,
           "valid_aux": dc.valid_aux, "split_seed": dc.split_seed,
           # v2: valid_aux = "auto" mirrors the test's share of pairs in an auxiliary behavior
           "split_version": 2}
    if dc.format == "synthetic":
        key.update(users=dc.synthetic_users, items=dc.synthetic_items, clusters=dc.synthetic_clusters)
        name = "synthetic"
    else:
        p = Path(dc.path)
        if not p.exists():
            raise DataError(f"does not exist (data.format = {dc.format!r})", file=str(p), field="data.path")
        key.update(path=str(p.resolve()), files=_fingerprint(p), n_users=dc.n_users, n_items=dc.n_items)
        name = p.stem.split(".")[0] or "data"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(dc.cache_dir) / f"{name}-{digest}"


def ensure_prepared(dc) -> Path:
    """Prepare the data of ``dc`` unless its cached directory exists; return the directory."""
    from . import prepare as P
    from .synthetic import SyntheticSpec

    out = prepared_dir_for(dc)
    if (out / MANIFEST).is_file():
        return out
    if dc.format == "prepared":
        raise DataError(f"not a prepared dataset directory (no {MANIFEST}); run `python -m mbssl_dist.data "
                        "prepare` or set data.format to text/table", file=str(out), field="data.path")
    log.info("preparing %s data from %s into %s", dc.format, dc.path or "the generator", out)
    behaviors = list(dc.behaviors) or None
    target = dc.target or None
    if dc.format == "synthetic":
        spec = SyntheticSpec(n_users=dc.synthetic_users, n_items=dc.synthetic_items,
                             n_clusters=dc.synthetic_clusters, seed=dc.split_seed)
        if behaviors:
            spec.behaviors = behaviors
            spec.aux_extra = [float(len(behaviors) - 1 - k) for k in range(len(behaviors) - 1)]
        P.prepare_synthetic(out, spec, valid=dc.valid, valid_aux=dc.valid_aux, overwrite=True)
    elif dc.format == "text":
        P.prepare_text(Path(dc.path), out, behaviors=behaviors, target=target, n_users=dc.n_users or None,
                       n_items=dc.n_items or None, seed=dc.split_seed, valid=dc.valid, valid_aux=dc.valid_aux,
                       overwrite=True)
    else:
        P.prepare_table(Path(dc.path), out, behaviors=behaviors, target=target, seed=dc.split_seed,
                        valid=dc.valid, valid_aux=dc.valid_aux, overwrite=True)
    return out
