"""The saved model (``runs/NAME/model/``) as an MLflow model of the run (MLflow's own pyfunc API).

``log_model_to_mlflow(model_dir)`` logs, into the ACTIVE run, a ``python_function`` model whose
artifacts are the model directory and the prepared dataset it was trained on (the graph is
part of the model: MBSSL propagates over it), with this package as code, so that
``mlflow.pyfunc.load_model(uri)`` rebuilds it on another machine. With MLflow 3 it is listed
under the run's "Logged models".

``predict(model_input, params={"k": 50, "include_seen": False})``: ``model_input`` is a
DataFrame with a ``user`` column (or a list of ids): the dataset's original ids for a table
dataset, else dense ids. Returns the same DataFrame ``user, rank, item, score`` as
``python -m mbssl_dist.recommend`` (training and validation purchases excluded by default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import mlflow.pyfunc

log = logging.getLogger(__name__)

ARTIFACT_NAME = "model"


class MBSSLRecommender(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of :class:`mbssl_dist.recommend.Recommender` (single process, CPU)."""

    def load_context(self, context) -> None:
        from .recommend import Recommender

        self.rec = Recommender(context.artifacts["model"], data=context.artifacts.get("data"))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            col = "user" if "user" in model_input.columns else model_input.columns[0]
            users = model_input[col].tolist()
        elif isinstance(model_input, pd.Series):
            users = model_input.tolist()
        else:
            users = list(model_input)
        return self.rec.frame(users, k=int(params.get("k", 50)), include_seen=bool(params.get("include_seen", False)))


def _signature(original_ids: bool):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    idt = "string" if original_ids else "integer"
    return ModelSignature(
        inputs=Schema([ColSpec("string" if original_ids else "long", "user")]),
        outputs=Schema([ColSpec(idt, "user"), ColSpec("integer", "rank"), ColSpec(idt, "item"),
                        ColSpec("float", "score")]),
        params=ParamSchema([ParamSpec("k", "long", 50), ParamSpec("include_seen", "boolean", False)]))


def _requirements() -> list[str]:
    from importlib.metadata import version

    out = []
    for pkg in ("torch", "numpy", "scipy", "pyarrow", "pandas", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except Exception:  # noqa: BLE001 - not installed as a distribution
            out.append(pkg)
    return out


def log_model_to_mlflow(model_dir: str | os.PathLike, include_data: bool = True):
    """Log ``model_dir`` as a pyfunc model of the active MLflow run; returns MLflow's
    ``ModelInfo`` (``.model_uri``, ``.model_id``), or None when no run is active."""
    from .export import read_model_dir

    run = mlflow.active_run()
    if run is None:
        log.warning("no active MLflow run: %s not logged as an MLflow model", model_dir)
        return None
    model_dir = Path(model_dir)
    meta = read_model_dir(model_dir).meta
    artifacts = {"model": str(model_dir.resolve())}
    if include_data:
        artifacts["data"] = meta["dataset"]
    pkg = Path(__file__).resolve().parent
    info = mlflow.pyfunc.log_model(
        name=ARTIFACT_NAME, python_model=MBSSLRecommender(), artifacts=artifacts, code_paths=[str(pkg)],
        signature=_signature(bool(meta.get("id_maps"))), pip_requirements=_requirements(),
        metadata={"best_epoch": meta["best_epoch"], "dataset_sha256": meta["dataset_sha256"],
                  "select_metric": meta["select_metric"]})
    metrics = {}
    for ph in ("valid", "test"):
        for k, v in (meta.get(ph) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[f"best/{ph}/{k.replace('@', '_')}"] = float(v)
    if metrics:
        mlflow.log_metrics(metrics, step=int(meta["best_epoch"]), model_id=info.model_id)
    log.info("logged %s as MLflow model %s (%s)", model_dir, info.model_id, info.model_uri)
    return info
