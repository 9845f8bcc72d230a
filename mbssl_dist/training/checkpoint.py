"""Sharded, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of ``OUTPUT/NAME/checkpoints/``::

    step-000000120/            one complete checkpoint (global step 120)
        .metadata              DCP's index of the tensor chunks
        __0_0.distcp ...       tensor data, one file per writing rank
        trainer.json           everything that is not a tensor, plus a size/sha256 manifest
                               of the files above; written last
    .tmp-step-000000150/       a checkpoint being written (never read; removed on restart)

Tensors: the user rows (and their Adam moments) are saved as a ``DTensor`` sharded on
contiguous global-id chunks, so each rank writes only its chunk, and a run resumed with a
different number of ranks reads exactly its own chunk (DCP reshards); the replicated
parameters and their Adam moments are plain tensors, which DCP writes once. A checkpoint
becomes visible only when complete: every rank writes into the temporary directory, rank 0
adds ``trainer.json`` (with the manifest) and renames the directory in one ``os.rename``.
Loading checks the manifest first (a truncated or corrupted file names itself), then lets
DCP read the tensors; ``trainer.json`` is JSON, so nothing untrusted is unpickled by us
(DCP's own ``.metadata`` index is the one pickle, as in every DCP checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (message names the file); exit code 2."""


def chunk_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank`` in DTensor's ``Shard(0)`` layout (``torch.chunk``
    sizes: ceil(n / world) per rank, the last ones shorter or empty)."""
    size = math.ceil(n / world) if n else 0
    lo = min(rank * size, n)
    return lo, min(lo + size, n)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardedRows:
    """Moves a rank's user rows (any subset of global ids, in local order) to and from its
    contiguous chunk of the global table, and wraps the chunk as a DTensor for DCP."""

    def __init__(self, users: np.ndarray, n_global: int, comm) -> None:
        self.users = torch.from_numpy(np.asarray(users, dtype=np.int64))
        self.n = int(n_global)
        self.comm = comm
        self.lo, self.hi = chunk_bounds(self.n, comm.world_size, comm.rank)
        self._mesh = None
        self._gids: torch.Tensor | None = None  # every rank's global ids in rank order (gathered once)

    def to_chunks(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's contiguous chunk of each of ``tensors`` (local rows, equal dtype): ONE
        all-gather for all of them (the rows stacked side by side; the ids are gathered once per
        object), so a parameter and its two Adam moments cost one collective per save."""
        if not tensors:
            return []
        with torch.no_grad():
            n_loc = self.users.numel()
            flat = torch.cat([t.detach().reshape(n_loc, -1) for t in tensors], 1)
            if self._gids is None:
                self._gids = self.comm.all_gather_cat(self.users)
            rows = self.comm.all_gather_cat(flat.contiguous())
            full = flat.new_zeros((self.n, flat.shape[1]))
            full[self._gids] = rows
            chunk = full[self.lo:self.hi]
        out, col = [], 0
        for t in tensors:
            w = int(np.prod(t.shape[1:], dtype=np.int64))
            out.append(chunk[:, col:col + w].reshape((self.hi - self.lo,) + tuple(t.shape[1:])).clone())
            col += w
        return out

    def from_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        """This rank's rows (in local order) from every rank's chunk (one all-gather: the
        chunks are contiguous in rank order, so their concatenation is the table in global order)."""
        with torch.no_grad():
            return self.comm.all_gather_cat(chunk.contiguous())[self.users].clone()

    def wrap(self, chunk: torch.Tensor, feature_shape: tuple[int, ...]):
        """The chunk as a DTensor sharded on dim 0 (a plain tensor in a single process)."""
        if self.comm.world_size == 1:
            return chunk
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            self._mesh = init_device_mesh(chunk.device.type, (self.comm.world_size,))
        shape = torch.Size((self.n,) + tuple(feature_shape))
        stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        return DTensor.from_local(chunk.contiguous(), self._mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=stride)

    @staticmethod
    def unwrap(t) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t


class CheckpointManager:
    """Writes, lists, verifies and loads the checkpoints of one run directory.

    Every method that touches tensors is collective (all ranks call it in the same order)."""

    def __init__(self, root: str | os.PathLike, comm, keep: int = 2) -> None:
        self.root = Path(root)
        self.comm = comm
        self.keep = int(keep)

    # ------------------------------------------------------------------ listing
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a directory counts once its trainer.json exists)."""
        if not self.root.is_dir():
            return []
        out = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / "trainer.json").is_file()]
        return sorted(out, key=lambda p: p.name)

    def clear(self) -> None:
        """Remove every checkpoint (main rank; used when a run starts fresh on purpose)."""
        if self.comm.is_main and self.root.exists():
            shutil.rmtree(self.root)

    def remove_partial(self) -> None:
        """Remove checkpoints a killed run left half-written (main rank)."""
        if self.comm.is_main and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, tensors: dict[str, Any], meta: dict) -> Path:
        """Write one checkpoint (collective); returns its directory once complete."""
        import torch.distributed.checkpoint as dcp

        name = f"step-{int(step):09d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.comm.barrier()
        with warnings.catch_warnings():  # "assuming ... a single process": yes, at P = 1 without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, checkpoint_id=str(tmp))
        self.comm.barrier()
        if self.comm.is_main:
            files = {p.name: [p.stat().st_size, _sha256(p)] for p in sorted(tmp.iterdir()) if p.is_file()}
            doc = {"format": FORMAT, "step": int(step), "world_size": self.comm.world_size, "files": files, **meta}
            tmp_json = tmp / ".trainer.json.tmp"
            tmp_json.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=True))
            os.replace(tmp_json, tmp / "trainer.json")
            if final.exists():  # the same step written again (a resumed run redoing it)
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.comm.barrier()
        return final

    # ------------------------------------------------------------------ load
    def verify(self, path: Path) -> dict:
        """trainer.json of ``path`` after checking every listed file's size and sha256."""
        doc_path = path / "trainer.json"
        doc = self._read_doc(path)
        if doc.get("format") != FORMAT:
            raise CheckpointError(f"{doc_path}: checkpoint format {doc.get('format')!r}, this code reads {FORMAT}")
        for fname, (size, digest) in doc["files"].items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{f}: missing from the checkpoint")
            if f.stat().st_size != size:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the checkpoint recorded {size} (truncated?)")
            if _sha256(f) != digest:
                raise CheckpointError(f"{f}: content does not match the checksum recorded at save (corrupted)")
        return doc

    def latest_usable(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that verifies; older ones are tried when a newer one is
        damaged (each skip is logged with the file at fault). Raises when checkpoints exist
        but none is usable: a damaged run never silently restarts from scratch. Collective:
        the main rank reads and hashes the files (once, not once per rank) and broadcasts its
        choice; the other ranks then read only that checkpoint's trainer.json."""
        step, errors = -1, []  # -1: no checkpoint at all, -2: all damaged
        found = self.complete()
        if self.comm.is_main:
            for path in reversed(found):
                try:
                    self.verify(path)
                    step = int(_NAME.match(path.name).group(1))
                    break
                except CheckpointError as e:
                    log.warning("skipping damaged checkpoint: %s", e)
                    errors.append(str(e))
            if step < 0 and found:
                step = -2
        if self.comm.world_size > 1:  # by name: another rank's listing may lag the main rank's
            step = int(self.comm.broadcast_(torch.tensor([step]), 0).item())
        if step == -2:
            detail = errors[0] if errors else "see the main rank's log"
            raise CheckpointError(f"no usable checkpoint in {self.root}: {detail} (run.resume = \"never\" "
                                  f"starts over)")
        if step < 0:
            return None
        path = self.root / f"step-{step:09d}"
        return path, self._read_doc(path)

    @staticmethod
    def _read_doc(path: Path) -> dict:
        doc_path = path / "trainer.json"
        try:
            return json.loads(doc_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{doc_path}: unreadable checkpoint state ({e})") from None

    def load(self, path: Path, tensors: dict[str, Any]) -> None:
        """Fill ``tensors`` (same keys and shapes as saved, DTensors for sharded rows) in place."""
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(tensors, checkpoint_id=str(path))
        except Exception as e:  # DCP wraps reader errors in CheckpointException
            raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None


# ---------------------------------------------------------------------- training state <-> tensors
def _param_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def state_tensors(model, step, rows: ShardedRows) -> dict[str, Any]:
    """The tensors of a training state, keyed by name: every parameter and its Adam state
    (user rows as DTensor chunks, the rest replicated) and HMG's EMA norms. Collective."""
    opt, hmg = step.state.optimizer, step.state.hmg
    out: dict[str, Any] = {}
    for name, p, sharded in zip(_param_names(model), step.params, step.sharded):
        entries = {"param": p.detach()}
        entries.update({k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)})
        rowwise = [k for k, t in entries.items() if sharded and t.dim() and t.shape[0] == p.shape[0]
                   and t.dtype == p.dtype]
        for k, c in zip(rowwise, rows.to_chunks([entries[k] for k in rowwise])):
            out[f"{k}/{name}"] = rows.wrap(c, tuple(c.shape[1:]))
        for k, t in entries.items():
            if k not in rowwise:
                out[f"{k}/{name}"] = t.detach().clone()
    if hmg.ema is not None:
        out["hmg/ema"] = hmg.ema.clone()
    return out


def describe_tensors(tensors: dict[str, Any]) -> dict[str, dict]:
    """JSON description (global shape, dtype, sharded) of ``state_tensors``' output, from
    which a resumed run builds the buffers DCP loads into."""
    out = {}
    for k, t in tensors.items():
        sharded = hasattr(t, "to_local")
        out[k] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sharded": sharded}
    return out


def load_state_tensors(manager: CheckpointManager, path: Path, layout: dict[str, dict], model, step,
                       rows: ShardedRows) -> None:
    """Load a checkpoint's tensors into the model, Adam and HMG of this rank (any world size:
    the user rows are re-sharded through their global ids). Collective."""
    bufs: dict[str, Any] = {}
    for k, spec in layout.items():
        dtype = getattr(torch, spec["dtype"])
        shape = tuple(spec["shape"])
        if spec["sharded"]:
            chunk = torch.zeros((rows.hi - rows.lo,) + shape[1:], dtype=dtype)
            bufs[k] = rows.wrap(chunk, shape[1:])
        else:
            bufs[k] = torch.zeros(shape, dtype=dtype)
    manager.load(path, bufs)
    opt, hmg = step.state.optimizer, step.state.hmg
    by_name = dict(zip(_param_names(model), zip(step.params, step.sharded)))
    missing = [n for n in by_name if f"param/{n}" not in bufs]
    if missing:
        raise CheckpointError(f"{path}: no saved values for parameter(s) {missing}")
    with torch.no_grad():
        for k, t in bufs.items():
            kind, _, name = k.partition("/")
            if kind == "hmg":
                hmg.ema = t.clone().to(torch.float64)
                continue
            p, sharded = by_name[name]
            val = ShardedRows.unwrap(t)
            if layout[k]["sharded"]:
                val = rows.from_chunk(val)
            if kind == "param":
                if val.shape != p.shape:
                    raise CheckpointError(f"{path}: parameter {name} has shape {tuple(val.shape)}, "
                                          f"the model {tuple(p.shape)}")
                p.copy_(val)
            else:
                opt.state[p][kind] = val.clone()
