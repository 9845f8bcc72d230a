"""The trained model as an artifact: ``runs/NAME/model/``, written by the trainer each time the
validation metric improves, read back by ``recommend``, ``evaluate`` and the MLflow model.

Layout (``MODEL_FORMAT`` 1)::

    model/
      weights.pt    plain dict of tensors (MBSSL ``state_dict``), user rows in GLOBAL user
                    order (the trainer's ranks each hold only their users; ``save_model``
                    gathers them); load with ``torch.load(weights_only=True)``
      config.toml   the resolved training config
      model.json    format version, best epoch, its valid/test metrics, the prepared dataset
                    path and its manifest checksum, the id maps (``user_map.parquet`` /
                    ``item_map.parquet`` of a ``--format table`` dataset) or null, the sizes,
                    the training world size and the sha256 of weights.pt

The directory is written beside itself under a temporary name and renamed into place, so
``model/`` is always a complete model (an older one is replaced only once the new one is whole).

Scoring needs the graph: MBSSL is a GNN whose user/item representations are propagated over
the training interactions, so ``load_model`` returns the parameters as an ``MBSSL`` and
:class:`Scoring` adds the dataset's graph (this rank's users under torchrun), propagates once in
eval mode and scores blocks of users. No training state (step, optimizer, HMG) is involved.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
WEIGHTS = "weights.pt"
META = "model.json"
CONFIG = "config.toml"


class ModelError(ValueError):
    """A model directory (or a run directory) that cannot be used; ``str()`` names the file."""


# ----------------------------------------------------------------------------- saving


@torch.no_grad()
def gather_user_rows(local_rows: torch.Tensor, users: np.ndarray, n_users: int, comm) -> torch.Tensor:
    """All ranks' rows of a user-sharded tensor in global user order (collective: every rank
    calls it and every rank gets the result; ``users`` are this rank's global ids)."""
    rows = comm.all_gather_cat(local_rows.detach().cpu().contiguous())
    ids = comm.all_gather_cat(torch.as_tensor(np.asarray(users, dtype=np.int64)))
    if ids.numel() != n_users or not torch.equal(torch.sort(ids).values, torch.arange(n_users)):
        raise RuntimeError(f"gathered user ids do not cover 0..{n_users - 1} exactly once")
    out = torch.empty((n_users,) + tuple(rows.shape[1:]), dtype=rows.dtype)
    out[ids] = rows
    return out


def _id_maps(ds_path: Path) -> dict[str, str] | None:
    u, i = ds_path / "user_map.parquet", ds_path / "item_map.parquet"
    if u.is_file() and i.is_file():
        return {"user": str(u.resolve()), "item": str(i.resolve())}
    return None


def save_model(model_dir: str | os.PathLike, run, cfg, ds, comm, info: dict) -> Path | None:
    """Write ``model_dir`` (see the module doc) from a trainer's ``ModelRun``.

    COLLECTIVE: every rank calls it (the user rows are gathered); rank 0 writes. ``info`` is the
    evaluation row of the epoch: ``{"epoch", "valid": {...}, "test": {...}}`` (an
    ``EvalHistory`` row) or ``{"epoch", <valid metrics>, "test": {...}}``. Returns the
    directory on rank 0, None elsewhere.
    """
    from .tracking import to_toml
    from .utils.io import atomic_dir, sha256_file

    model = run.model
    user_rows = gather_user_rows(model.user_embedding, run.part.users, ds.n_users, comm)
    if not comm.is_main:
        return None
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["user_embedding"] = user_rows
    model_dir = Path(model_dir)
    ds_path = Path(ds.path).resolve()
    with atomic_dir(model_dir, overwrite=True) as tmp:
        torch.save(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(to_toml(cfg.to_dict()))
        meta = {
            "format_version": MODEL_FORMAT,
            "kind": "mbssl",
            "best_epoch": int(info["epoch"]),
            "select_metric": cfg.train.select_metric,
            "valid": (dict(info["valid"]) if isinstance(info.get("valid"), dict)
                      else {k: v for k, v in info.items() if k not in ("epoch", "test")}),
            "test": dict(info.get("test") or {}),
            "dataset": str(ds_path),
            "dataset_sha256": ds.checksum(),
            "data_format": cfg.data.format,
            "id_maps": _id_maps(ds_path),
            "n_users": int(ds.n_users),
            "n_items": int(ds.n_items),
            "behaviors": list(ds.behaviors),
            "trained_world_size": int(comm.world_size),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "torch": torch.__version__,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("saved the epoch-%d model to %s", meta["best_epoch"], model_dir)
    return model_dir


# ----------------------------------------------------------------------------- loading


@dataclass
class ModelArtifact:
    """A model directory read back: its metadata, config and (global) parameters."""

    path: Path
    meta: dict
    cfg: Any  # config.Config
    state: dict[str, torch.Tensor] = field(repr=False)


def read_model_dir(model_dir: str | os.PathLike) -> ModelArtifact:
    """Read and check a model directory; any problem is a :class:`ModelError` naming the file."""
    from .config import ConfigError, from_dict
    from .utils.io import sha256_file

    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"{d}: no model directory")
    mp = d / META
    try:
        meta = json.loads(mp.read_text())
    except FileNotFoundError:
        raise ModelError(f"{mp}: missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{mp}: unreadable ({e})") from None
    if meta.get("format_version") != MODEL_FORMAT:
        raise ModelError(f"{mp}: format_version {meta.get('format_version')!r}, this code reads {MODEL_FORMAT}")
    cp = d / CONFIG
    try:
        cfg = from_dict(tomllib.loads(cp.read_text()), str(cp))
    except FileNotFoundError:
        raise ModelError(f"{cp}: missing") from None
    except (tomllib.TOMLDecodeError, ConfigError) as e:
        raise ModelError(f"{cp}: {e}") from None
    wp = d / WEIGHTS
    if not wp.is_file():
        raise ModelError(f"{wp}: missing")
    if meta.get("weights_sha256") and sha256_file(wp) != meta["weights_sha256"]:
        raise ModelError(f"{wp}: sha256 differs from {META} (corrupted or replaced)")
    try:
        state = torch.load(wp, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ModelError(f"{wp}: cannot load ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "user_embedding" not in state:
        raise ModelError(f"{wp}: not an MBSSL weights dict")
    return ModelArtifact(d, meta, cfg, state)


def load_model(model_dir: str | os.PathLike | ModelArtifact, part=None, device: torch.device | str = "cpu"):
    """An eval-mode ``MBSSL`` holding the users of ``part`` (a ``LocalPart``; None = all users,
    P = 1), rebuilt from the directory alone: no step, optimizer or HMG state."""
    from .model import MBSSL

    art = model_dir if isinstance(model_dir, ModelArtifact) else read_model_dir(model_dir)
    m, meta = art.cfg.model, art.meta
    U = int(meta["n_users"])
    users = np.arange(U, dtype=np.int64) if part is None else np.asarray(part.users, dtype=np.int64)
    model = MBSSL(len(users), int(meta["n_items"]), len(meta["behaviors"]), dim=m.dim, n_layers=m.n_layers,
                  att_dim=m.att_dim, dropout=m.dropout, use_cdm=m.use_cdm,
                  interaction_scoring=m.interaction_scoring, interaction_per_item=m.interaction_per_item,
                  item_bias="item_bias" in art.state,  # the weights say (a model saved before model.item_bias has none)
                  init_scale=m.init_scale, n_users_global=U, user_ids=torch.from_numpy(users))
    state = dict(art.state)
    state["user_embedding"] = state["user_embedding"][torch.from_numpy(users)]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{art.path / WEIGHTS}: does not match {CONFIG}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def open_dataset(art: ModelArtifact, data: str | os.PathLike | None = None):
    """The prepared dataset the model was trained on (``data`` overrides the recorded path,
    e.g. after moving it); its manifest checksum must match the model's."""
    from .data import load_prepared
    from .data.errors import DataError

    path = Path(data) if data else Path(art.meta["dataset"])
    try:
        ds = load_prepared(path)
    except DataError as e:
        raise ModelError(f"{art.path / META}: dataset: {e}") from None
    want = art.meta.get("dataset_sha256")
    if want and ds.checksum() != want:
        raise ModelError(f"{path}: dataset checksum {ds.checksum()[:12]}... differs from the model's "
                         f"{want[:12]}... ({art.path / META}); pass the prepared directory it was trained on")
    return ds


def run_model_dir(run: str | os.PathLike) -> Path:
    """``RUN/model`` of a run directory, with one-line errors for a missing run or model."""
    r = Path(run)
    if not r.is_dir():
        raise ModelError(f"{r}: no such run directory")
    d = r / "model"
    if not (d / META).is_file():
        raise ModelError(f"{d}: the run has no saved model (model/ is written when validation improves; "
                         f"runs from before the model export have none)")
    return d


class Scoring:
    """Eval-mode scores of the model over all items for this rank's users.

    Builds this rank's part of the graph (the training's partitioning when the world size
    matches: then the propagation and every score are bit-identical to the trainer's
    evaluation), loads the model's rows of those users, propagates once. Under torchrun the
    constructor is collective.
    """

    def __init__(self, art: ModelArtifact, ds, comm=None, device: torch.device | str = "cpu",
                 propagate: bool = True):
        from .parallel.comm import LocalComm
        from .parallel.layout import shard_users

        self.art, self.ds = art, ds
        self.comm = comm = comm or LocalComm()
        self.device = torch.device(device)
        cfg = art.cfg
        pdir = cfg.dist.partition_dir
        if pdir and not Path(pdir).is_dir():
            log.warning("partition_dir %s of the training config is gone; partitioning in memory", pdir)
            pdir = ""
        try:
            self.part = shard_users(ds, comm, cfg.dist.partition, pdir, cfg.train.seed)
        except ValueError as e:
            if not pdir:
                raise
            log.warning("%s; partitioning in memory (%s)", e, cfg.dist.partition)
            self.part = shard_users(ds, comm, cfg.dist.partition, "", cfg.train.seed)
        self.model = load_model(art, self.part, self.device)
        m = cfg.model
        self.adjs = [self.part.graph.adjacency(k, m.norm, torch.float32, self.device) for k in range(ds.n_behaviors)]
        self.user_items = None
        if m.interaction_scoring:  # the same matrices the trainer scores with (train.build_model)
            self.user_items = [torch.sparse_csr_tensor(g.indptr, g.indices, torch.ones(g.nnz),
                                                       size=(g.n_users, g.n_items))
                               for g in self.part.graph.graphs]
        self.prop = None
        if propagate:
            with torch.no_grad():
                self.prop = self.model(self.adjs, comm)
        self.g2l = torch.from_numpy(self.part.global_to_local)

    def scores(self, users: torch.Tensor) -> torch.Tensor:
        """[len(users), n_items] float32 scores of GLOBAL user ids held by this rank."""
        with torch.no_grad():
            loc = self.g2l[users.cpu()]
            if (loc < 0).any():
                raise ValueError("user not held by this rank")
            return self.model.score(self.prop, loc.to(self.prop.users.device), user_items=self.user_items).cpu()
