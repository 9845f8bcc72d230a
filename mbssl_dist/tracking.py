"""Run outputs and MLflow logging, on the main rank only.

Every run writes ``OUTPUT/NAME/`` with ``config.toml`` (resolved), ``metrics.jsonl`` (one
record per epoch and per evaluation), ``final.json`` and ``curves.png``, and mirrors the
same to MLflow: a local sqlite store (``sqlite:///mlflow.db``, artifacts in ``mlartifacts/``)
unless ``run.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` says otherwise. MLflow metric names
cannot contain ``@``, so ``recall@10`` is logged as ``recall_10``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def mlflow_name(key: str) -> str:
    return key.replace("@", "_")


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def to_toml(d: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {val(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)
    out = []
    for sec, vals in d.items():
        out.append(f"[{sec}]")
        out.extend(f"{k} = {val(v)}" for k, v in vals.items())
        out.append("")
    return "\n".join(out)


def _lock_run_dir(out_dir: Path):
    """Hold an exclusive lock on ``out_dir`` for this run: two runs with the same run.name
    would otherwise truncate and interleave each other's metrics.jsonl. The lock is an flock,
    so a crashed run never leaves it behind."""
    import fcntl
    import socket

    from .config import ConfigError

    f = open(out_dir / ".run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"run.name: {out_dir} is being written by a running job ({holder}); "
                          f"choose another run.name or run.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


# Config fields that say where and how a run is operated, not what it computes: MLflow tags
# (searchable, but not compared as hyper-parameters).
BOOKKEEPING = ("run.", "checkpoint.", "dist.", "data.path", "data.cache_dir", "train.threads", "train.device",
               "train.eval_batch_size", "swing.workers")


def split_params(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(hyper-parameters, bookkeeping fields) of a flattened config."""
    params = {k: v for k, v in flat.items() if not k.startswith(BOOKKEEPING)}
    return params, {k: v for k, v in flat.items() if k not in params}


def parent_tags() -> dict[str, str]:
    """Tags a launcher (``mbssl_dist.experiments``) hands a run through the environment:
    ``MBSSL_MLFLOW_PARENT_RUN_ID`` nests this run under that MLflow run (tag
    ``mlflow.parentRunId``) and ``MBSSL_MLFLOW_TAGS`` (a JSON object) adds e.g. the grid point."""
    out = {}
    parent = os.environ.get("MBSSL_MLFLOW_PARENT_RUN_ID", "")
    if parent:
        out["mlflow.parentRunId"] = parent
    extra = os.environ.get("MBSSL_MLFLOW_TAGS", "")
    if extra:
        try:
            out.update({str(k): str(v)[:5000] for k, v in json.loads(extra).items()})
        except (ValueError, AttributeError):
            log.warning("MBSSL_MLFLOW_TAGS is not a JSON object; ignored: %r", extra[:200])
    return out


def tracking_uri(uri: str = "") -> str:
    """The store every command of this project uses: ``uri``, else $MLFLOW_TRACKING_URI, else
    ``sqlite:///mlflow.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def connect(uri: str, experiment: str):
    """Point MLflow at :func:`tracking_uri` ``(uri)`` and select ``experiment``, creating it
    with its artifacts beside a SQLite database (``sqlite:///x/mlflow.db`` -> ``x/mlartifacts``)
    so the store is one self-contained folder. Returns (mlflow, the resolved uri)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    with _first_touch_lock(uri):
        if mlflow.get_experiment_by_name(experiment) is None:
            art = None
            if uri.startswith("sqlite:///"):
                art = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
            mlflow.create_experiment(experiment, artifact_location=art)
        mlflow.set_experiment(experiment)
    return mlflow, uri


@contextlib.contextmanager
def _first_touch_lock(uri: str):
    """Serialize, across processes, the first use of a SQLite store: MLflow creates its schema
    (and we the experiment) on first contact, and two runs or grids started at once on a fresh
    store otherwise race ("table latest_metrics already exists", a duplicate experiment). The
    lock file lives in the temp directory, keyed by the database path, so nothing is added
    beside the user's store."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):]).resolve()
    key = hashlib.sha1(str(db).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mbssl-mlflow-{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunLogger:
    """Writes run outputs; a no-op on ranks other than the main one.

    ``runs/NAME/run.json`` says which MLflow run the directory belongs to and its status,
    so that a later start can tell a run that died without recording it (SIGKILL) and mark
    it ``KILLED``; ``final.json`` always describes the latest attempt (``status`` field)."""

    STALE = ("final.json", "curves.png")

    def __init__(self, out_dir: Path, enabled: bool, use_mlflow: bool, tracking_uri: str = "",
                 experiment: str = "mbssl", run_name: str = "run"):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self.timings: list[dict] = []
        self.use_mlflow = use_mlflow
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._mlflow = None
        self._logged: set[tuple[str, int]] = set()  # (key, step) already in a continued MLflow run
        self._lock = None
        self._finished = False
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_run_dir(self.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.timings_path = self.out_dir / "timings.jsonl"

    def _connect(self):
        return connect(self.tracking_uri, self.experiment)

    def previous(self) -> dict:
        """The run.json a previous attempt left in this directory ({} if none)."""
        try:
            return json.loads((self.out_dir / "run.json").read_text())
        except (OSError, ValueError):
            return {}

    def _write_run_json(self, status: str) -> None:
        atomic_write_json(self.out_dir / "run.json", {"mlflow_run_id": self.run_id, "status": status,
                                                      "pid": os.getpid()})

    def start(self, config: dict, flat_params: dict[str, Any], tags: dict[str, str],
              resume: dict | None = None) -> None:
        """Begin (or, with ``resume`` = a checkpoint's logger state, continue) the run:
        stale outputs of an earlier attempt are removed, metrics.jsonl / timings.jsonl hold
        exactly the records up to the checkpoint, and MLflow continues the same run."""
        if not self.enabled:
            return
        for name in self.STALE:
            (self.out_dir / name).unlink(missing_ok=True)
        prev = self.previous()
        self.records = list(resume["records"]) if resume else []
        self.timings = list(resume["timings"]) if resume else []
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))
        atomic_write_text(self.timings_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.timings))
        atomic_write_text(self.out_dir / "config.toml", to_toml(config))
        if self.use_mlflow:
            mlflow, uri = self._connect()
            resume_id = resume.get("mlflow_run_id") if resume else None
            if prev.get("status") == "RUNNING" and prev.get("mlflow_run_id") and prev["mlflow_run_id"] != resume_id:
                # the attempt that wrote run.json died without recording it (we hold the lock now)
                try:
                    mlflow.MlflowClient().set_terminated(prev["mlflow_run_id"], status="KILLED")
                    log.warning("MLflow run %s of an earlier attempt died unrecorded: marked KILLED",
                                prev["mlflow_run_id"])
                except Exception as e:  # noqa: BLE001 - the old run may live in another store
                    log.warning("could not mark earlier MLflow run %s KILLED: %s", prev["mlflow_run_id"], e)
            run = None
            if resume_id:
                try:
                    run = mlflow.start_run(run_id=resume_id)
                except Exception as e:  # noqa: BLE001 - e.g. another tracking store
                    log.warning("cannot continue MLflow run %s (%s); starting a new one", resume_id, e)
            fresh = run is None
            if fresh:
                run = mlflow.start_run(run_name=self.run_name)
            self._mlflow = mlflow
            self.run_id = run.info.run_id
            log.info("MLflow run %s in %s (experiment %r)%s", self.run_id, uri, self.experiment,
                     ", continued" if not fresh else "")
            params, book = split_params(flat_params)
            if fresh:
                enc = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}
                mlflow.log_params({k: str(v)[:6000] for k, v in enc.items()})
            mlflow.set_tags({**{k: str(v)[:5000] for k, v in book.items()}, **tags, **parent_tags(),
                             "resumed_from_step": str(resume.get("step", "")) if resume else ""})
            mlflow.log_artifact(str(self.out_dir / "config.toml"))
            if fresh:
                for r in self.records:  # a new MLflow run for a resumed directory: replay its history
                    self._log_metrics(r, None)
            else:
                self._logged = _logged_points(mlflow.MlflowClient(), self.run_id)
        self._write_run_json("RUNNING")

    def state_dict(self) -> dict:
        """What a checkpoint stores so that a resumed run rewrites these files exactly."""
        return {"records": list(self.records), "timings": list(self.timings), "mlflow_run_id": self.run_id}

    def record(self, rec: dict, step: int | None = None, timing: dict | None = None) -> None:
        """Append one JSON record to metrics.jsonl and log its numeric fields to MLflow.

        Wall-clock and memory figures go in ``timing`` (to timings.jsonl and MLflow), so that
        metrics.jsonl depends only on the seed and is identical between identical runs."""
        if not self.enabled:
            return
        self.records.append(rec)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if timing:
            trec = {"kind": rec.get("kind"), "epoch": rec.get("epoch"), **timing}
            self.timings.append(trec)
            with open(self.timings_path, "a") as f:
                f.write(json.dumps(trec, sort_keys=True) + "\n")
        if self._mlflow:
            self._log_metrics(rec, timing, step)

    def timing(self, rec: dict) -> None:
        """A wall-clock record (checkpoint save / resume load) for timings.jsonl and MLflow only."""
        if not self.enabled:
            return
        self.timings.append(rec)
        with open(self.timings_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self._mlflow:
            vals = {mlflow_name(f"time/{rec['kind']}/{k}"): float(v) for k, v in rec.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step")}
            self._log_new(vals, int(rec.get("step", 0)))

    def _log_metrics(self, rec: dict, timing: dict | None, step: int | None = None) -> None:
        prefix = rec.get("kind", "")
        metrics = {}
        items = list(rec.items()) + [(f"time/{k}", v) for k, v in (timing or {}).items()]
        for k, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step") \
                    and math.isfinite(v):
                metrics[mlflow_name(f"{prefix}/{k}" if prefix else k)] = float(v)
        self._log_new(metrics, step if step is not None else rec.get("epoch", 0))

    def _log_new(self, metrics: dict[str, float], step: int) -> None:
        """log_metrics, minus the (key, step) points a killed attempt of this MLflow run already
        logged: a resumed run redoes the steps after its checkpoint with the same values (same
        seed), and MLflow has no way to delete a point, so re-logging them would draw every
        redone epoch twice in the UI."""
        if self._logged:
            metrics = {k: v for k, v in metrics.items() if (k, int(step)) not in self._logged}
        if metrics:
            self._mlflow.log_metrics(metrics, step=int(step))

    def finish(self, final: dict, status: str = "FINISHED") -> None:
        """Write final.json (with ``status``), log it, end the MLflow run with ``status``
        (FINISHED, FAILED or KILLED) and release the directory. Idempotent."""
        if not self.enabled or self._finished:
            return
        self._finished = True
        final = {"status": status, **final}
        atomic_write_json(self.out_dir / "final.json", final)
        self._write_run_json(status)
        try:
            png = self.plot_curves()
        except Exception as e:  # noqa: BLE001 - a plotting problem must not hide the run's status
            log.warning("curves.png not written: %s", e)
            png = None
        if self._mlflow:
            self._mlflow.log_artifact(str(self.out_dir / "final.json"))
            self._mlflow.log_artifact(str(self.metrics_path))
            self._mlflow.log_artifact(str(self.timings_path))
            if png:
                self._mlflow.log_artifact(str(png))
            for k, v in _flatten(final).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._mlflow.log_metric(mlflow_name(f"final/{k}"), float(v))
            self._mlflow.end_run(status=status)
        self.release()

    def release(self) -> None:
        """Give up the output directory (also happens when the process exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def plot_curves(self) -> Path | None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        epochs = [r for r in self.records if r.get("kind") == "epoch"]
        evals = [r for r in self.records if r.get("kind") == "valid"]
        if not epochs:
            return None
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        tasks = sorted({k for r in epochs for k in r if k.startswith("loss/")})
        for t in tasks:
            a1.plot([r["epoch"] for r in epochs], [r.get(t, float("nan")) for r in epochs], label=t[5:])
        a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.set_title("training losses per task")
        a1.legend(fontsize=7)
        for m in sorted({k for r in evals for k in r if "@" in k}):
            a2.plot([r["epoch"] for r in evals], [r[m] for r in evals], marker="o", label=m)
        a2.set_xlabel("epoch"), a2.set_title("validation")
        a2.legend(fontsize=7)
        fig.tight_layout()
        out = self.out_dir / "curves.png"
        tmp = self.out_dir / ".curves.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, out)
        return out


def _logged_points(client, run_id: str) -> set[tuple[str, int]]:
    """Every (metric key, step) already in MLflow run ``run_id``."""
    keys = client.get_run(run_id).data.metrics.keys()
    return {(k, int(m.step)) for k in keys for m in client.get_metric_history(run_id, k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out
