"""``python -m mbssl_dist.experiments NAME --data CONFIG_OR_DATASET [--seeds N] [--epochs N] [--processes P]``

The paper's experiments as one command each. NAME is one of

* ``ablation``: full, w/o CDM, w/o inter, w/o intra, w/o HMG (paper Table 3);
* ``hmg``: HMG strategies hmg, A, B, C, none (Table 4);
* ``fn-sweep``: false-negative count N for users and items (Fig 4);
* ``relax-sweep``: HMG relax factor r in 0, 0.1, ..., 1 (Fig 5);
* ``compare``: the MBSSL config and the built-in default recipe on the same data against the
  in-harness baselines (Table 2 shape);
* ``sparsity``: test metrics per user group by number of training purchases (Fig 3), from one
  trained model per seed (its saved best-validation model; ``sparsity.json`` per run);
* ``search``: an Optuna TPE search over a TOML search space (``--space FILE``), pruned on the
  validation metric per epoch, stored in SQLite (``OUT/search/study.db``) so it resumes.

Every grid point x seed is one training run (``python -m mbssl_dist.train`` in a subprocess, or
under ``torch.distributed.run`` with ``--processes P``) named ``POINT/seedS`` under
``OUT/NAME/``. The grid is resumable: a point whose ``final.json`` says FINISHED is skipped, a
killed one continues from its checkpoint (``run.resume = "auto"`` in the trainer). Each run is
an MLflow run nested under one parent run of the experiment (tag ``mlflow.parentRunId``) and
tagged with its grid point. ``--data synthetic`` uses the built-in synthetic generator; ``--data
DIR`` (a dataset directory, text or prepared) runs the built-in default recipe on it, as
``python -m mbssl_dist.train --set data.format=... --set data.path=DIR`` would.

``OUT/NAME/experiment.json`` records the grid (points, overrides, seeds, the parent MLflow run)
for ``python -m mbssl_dist.report OUT/NAME``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import tracking
from .config import (Config, ConfigError, apply_overrides, from_dict, load_config, read_toml,
                     resolve_against_data)
from .data.errors import DataError
from .utils.io import atomic_write_json
from .utils.signals import HandleStopSignals

log = logging.getLogger("mbssl_dist.experiments")

EXPERIMENTS = ("ablation", "hmg", "fn-sweep", "relax-sweep", "compare", "sparsity", "search")


@dataclass
class Point:
    """One grid point: a name (directory-safe), its ``--set`` overrides, and the swept value
    (for sweeps, the x of the figure)."""

    name: str
    overrides: list[str] = field(default_factory=list)
    value: float | None = None
    kind: str = "mbssl"  # "mbssl": the --data config; "defaults": the built-in defaults on its data; "baseline"


def grid(name: str) -> list[Point]:
    """The grid points of experiment ``name`` (config field names as in ``config.py``)."""
    if name == "ablation":
        return [Point("full"), Point("wo_cdm", ["model.use_cdm=false"]),
                Point("wo_inter", ["loss.use_inter=false"]), Point("wo_intra", ["loss.use_intra=false"]),
                Point("wo_hmg", ['hmg.strategy="none"'])]
    if name == "hmg":
        return [Point(f"hmg_{s}", [f'hmg.strategy="{s}"']) for s in ("hmg", "A", "B", "C", "none")]
    if name == "relax-sweep":
        return [Point(f"r{r / 10:.1f}", [f"hmg.relax={r / 10:.1f}"], r / 10) for r in range(11)]
    if name == "fn-sweep":
        # the paper's Fig 4 varies N over a handful of values; N = 0 is "no false-negative removal"
        return [Point(f"N{n}", [f"loss.fn_users={n}", f"loss.fn_items={n}"], float(n))
                for n in (0, 5, 10, 20, 50)]
    if name == "sparsity":
        return [Point("mbssl")]
    if name == "compare":
        from .baselines import BASELINES

        # MBSSL as configured (e.g. a paper-faithful config), MBSSL with the built-in default
        # recipe on the same data, then the in-harness baselines
        return [Point("mbssl"), Point("mbssl_defaults", kind="defaults")] + \
            [Point(b, kind="baseline") for b in BASELINES]
    raise ConfigError(f"unknown experiment {name!r}; choose from {list(EXPERIMENTS)}")


# ----------------------------------------------------------------------------- MLflow parent


def tracking_uri(cfg: Config) -> str:
    """The same store the trainer's RunLogger uses for this config."""
    return tracking.tracking_uri(cfg.run.tracking_uri)


def parent_run(cfg: Config, exp_name: str, previous: str | None, tags: dict[str, str]) -> str | None:
    """Create (or reuse, on a rerun) the experiment's parent MLflow run; returns its id."""
    if not cfg.run.mlflow:
        return None
    mlflow, _ = tracking.connect(cfg.run.tracking_uri, cfg.run.experiment)
    client = mlflow.MlflowClient()
    if previous:
        try:
            run = client.get_run(previous)
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        except Exception as e:  # noqa: BLE001 - e.g. another tracking store now
            log.warning("cannot reuse parent MLflow run %s (%s); creating a new one", previous, e)
    exp = mlflow.get_experiment_by_name(cfg.run.experiment)
    run = client.create_run(exp.experiment_id, run_name=exp_name, tags=tags)
    return run.info.run_id


def end_parent(cfg: Config, run_id: str | None, status: str) -> None:
    if not run_id:
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.MlflowClient().set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- one run


def run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "final.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def saved_config(run_dir: Path) -> dict | None:
    try:
        return tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None


def train_command(config: str | None, sets: list[str], processes: int) -> list[str]:
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "mbssl_dist.train"]
    else:
        cmd = [sys.executable, "-m", "mbssl_dist.train"]
    if config:
        cmd += ["--config", config]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def start_training(config: str | None, sets: list[str], processes: int, log_path: Path,
                   env_extra: dict[str, str]) -> subprocess.Popen:
    """Start one training run; its stdout/stderr go to ``log_path`` (appended, so a resumed run's
    log keeps the earlier attempt's)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **env_extra)
    with open(log_path, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(train_command(config, sets, processes))}\n"
                .encode())
        return subprocess.Popen(train_command(config, sets, processes), stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


_stopping = False  # True while stop() waits for a training child: signals are then only counted
_held: list[int] = []  # signals that arrived meanwhile


def stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM the run (the trainer records it KILLED and exits), SIGKILL if it hangs.

    A SIGTERM / Ctrl-C that arrives while it waits (a second Ctrl-C, Slurm signalling every
    process of the step) cannot cut the wait short, so the child gets to record itself; if the
    stop was not itself caused by a signal (a pruned trial), the held signal is raised after."""
    global _stopping
    if proc.poll() is not None:
        return
    cause = sys.exc_info()[1]
    _stopping = True
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    finally:
        _stopping = False
        held = list(_held)
        _held.clear()
    if held:
        names = ", ".join(signal.Signals(x).name for x in held)
        if isinstance(cause, (KeyboardInterrupt, Terminated)):
            log.warning("%s while the running point stopped: held, so it could record itself KILLED", names)
        else:
            _raise_for(held[0])


class Terminated(BaseException):
    """SIGTERM reached the runner (``kill``, Slurm's preemption): unwinds like Ctrl-C, so the
    training child is stopped and the parent run is recorded KILLED, not left RUNNING."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_for(signum: int) -> None:
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum, _frame) -> None:
    """The runner's SIGTERM / SIGINT handler: unwind the grid, except while ``stop`` waits."""
    if _stopping:
        _held.append(signum)
        return
    _raise_for(signum)


def StopSignals() -> HandleStopSignals:
    """The runner's handlers for a ``with`` block (a SIGINT it inherited ignored stays ignored)."""
    return HandleStopSignals(_on_signal, keep_ignored_sigint=True)


def ending_status(e: BaseException) -> str:
    """The parent run's status when the grid ends with ``e``: KILLED only when it was stopped."""
    return "KILLED" if isinstance(e, (KeyboardInterrupt, Terminated)) else "FAILED"


# ----------------------------------------------------------------------------- the grid


@dataclass
class Experiment:
    name: str
    config: str | None
    base_sets: list[str]
    seeds: int
    processes: int
    out: Path
    epochs: int | None = None
    label: str = ""
    """What --data named, for the records (the config file, the dataset directory or synthetic)."""

    def __post_init__(self) -> None:
        self.label = self.label or self.config or "synthetic"

    @property
    def dir(self) -> Path:
        return self.out / self.name

    def sets_for(self, point: Point, seed_index: int, base: Config) -> list[str]:
        """--set list of one run: the user's, the point's, then name/dir/seed (last wins)."""
        sets = list(self.base_sets)
        if self.epochs is not None:
            sets.append(f"train.epochs={self.epochs}")
        sets += point.overrides
        sets += [f'run.name="{point.name}/seed{seed_index}"', f'run.output_dir="{self.dir}"',
                 f"train.seed={base.train.seed + seed_index}"]
        return sets

    def resolved(self, sets: list[str], point: Point | None = None) -> Config:
        return load_config(self.config_for(point), sets)

    def config_for(self, point: Point | None) -> str | None:
        return None if point is not None and point.kind == "defaults" else self.config

    def defaults_sets(self, point: Point, seed_index: int, base: Config) -> list[str]:
        """--set list of a "defaults" point: no config file, only what says where the data, the
        outputs and the hardware are (sections data, run, checkpoint, dist; train.threads and
        --epochs) taken from the resolved base config; every hyperparameter is the built-in one."""
        raw = base.to_dict()
        sets = [f"{sec}.{k}={_toml_value(v)}" for sec in ("data", "run", "checkpoint", "dist")
                for k, v in raw.get(sec, {}).items() if v is not None]
        if raw.get("train", {}).get("threads") is not None:
            sets.append(f"train.threads={raw['train']['threads']}")
        if self.epochs is not None:
            sets.append(f"train.epochs={self.epochs}")
        return sets + [f'run.name="{point.name}/seed{seed_index}"', f'run.output_dir="{self.dir}"',
                       f"train.seed={Config().train.seed + seed_index}"]


def _toml_value(v: Any) -> str:
    """A config value as the right-hand side of ``--set`` (TOML)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # strings and lists of numbers/strings: JSON's syntax is TOML's here


def check_reusable(run_dir: Path, cfg: Config) -> bool:
    """True when ``run_dir`` holds a FINISHED run of this same config (skip it); raises
    ConfigError when it holds a run of a different config (the grid changed under the same
    --out); False otherwise (train or resume it)."""
    from .data.cache import ensure_prepared
    from .data.dataset import MANIFEST
    from .train import config_differences

    saved = saved_config(run_dir)
    if saved is None:
        return False
    # the saved config holds what its ``auto`` settings became on the data: settle ours the same way
    cfg = copy.deepcopy(cfg)
    manifest = json.loads((ensure_prepared(cfg.data) / MANIFEST).read_text())
    resolve_against_data(cfg, manifest, list(manifest["behaviors"]))
    diff = config_differences(saved, cfg.to_dict())
    if diff:
        raise ConfigError(f"{run_dir} holds a run of a different config: {'; '.join(diff)} "
                          f"(use another --out, or remove that run directory yourself)")
    return run_status(run_dir) == "FINISHED" and saved.get("train", {}).get("epochs") == cfg.train.epochs


def select_points(points: list[Point], only: Sequence[str] | None) -> set[str]:
    """The names of the points to train now: all, or ``--points`` (checked against the grid, so a
    typo is an error rather than a grid that trains nothing)."""
    names = [p.name for p in points]
    if not only:
        return set(names)
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--points {','.join(only)}: no point named {', '.join(unknown)} in this grid; "
                          f"choose from {','.join(names)}")
    return set(only)


def run_grid(exp: Experiment, points: list[Point], only: Sequence[str] | None = None) -> int:
    """Train every point x seed not already finished (of the ``only`` points when given: the
    record keeps the whole grid, so the report shows every point that has runs); returns the
    number of failed runs."""
    chosen = select_points(points, only)
    base = exp.resolved(list(exp.base_sets))
    exp.dir.mkdir(parents=True, exist_ok=True)
    meta_path = exp.dir / "experiment.json"
    prev = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    parent = parent_run(base, exp.name, prev.get("mlflow_parent_run_id"),
                        {"mbssl.experiment": exp.name, "mbssl.config": exp.label})
    meta = {"experiment": exp.name, "config": exp.config, "data": exp.label, "sets": exp.base_sets, "seeds": exp.seeds,
            "epochs": exp.epochs, "processes": exp.processes, "select_metric": base.train.select_metric,
            "mlflow_parent_run_id": parent, "tracking_uri": tracking_uri(base) if parent else None,
            "points": [{"name": p.name, "overrides": p.overrides, "value": p.value, "kind": p.kind}
                       for p in points]}
    atomic_write_json(meta_path, meta)
    failed, ran, skipped = [], 0, 0
    try:
        for p in points:
            if p.name not in chosen:
                continue
            for s in range(exp.seeds):
                run_name = f"{p.name}/seed{s}"
                run_dir = exp.dir / p.name / f"seed{s}"
                if p.kind == "baseline":
                    try:
                        run_baseline(exp, p, s, base, run_dir, parent)
                    except (ConfigError, KeyboardInterrupt):
                        raise
                    except Exception as e:  # noqa: BLE001 - one failed point must not stop the grid
                        log.error("%s failed: %s: %s", run_name, type(e).__name__, e)
                        failed.append(run_name)
                    continue
                sets = exp.defaults_sets(p, s, base) if p.kind == "defaults" else exp.sets_for(p, s, base)
                cfg = exp.resolved(sets, p)
                if check_reusable(run_dir, cfg):
                    log.info("%s: FINISHED earlier, skipped", run_name)
                    skipped += 1
                    continue
                log.info("%s: training (%s)", run_name, " ".join(p.overrides) or "base config")
                tags = {"mbssl.experiment": exp.name, "mbssl.point": p.name, "mbssl.seed": str(s),
                        "mbssl.overrides": " ".join(p.overrides)}
                env = {"MBSSL_MLFLOW_TAGS": json.dumps(tags)}
                if parent:
                    env["MBSSL_MLFLOW_PARENT_RUN_ID"] = parent
                proc = start_training(exp.config_for(p), sets, exp.processes,
                                      exp.dir / "logs" / f"{p.name}_seed{s}.log", env)
                try:
                    rc = proc.wait()
                except BaseException:
                    stop(proc)
                    if proc.returncode is not None and proc.returncode < 0:  # died of the signal itself
                        log.warning("%s: stopped by %s during its start-up, before the trainer could record "
                                    "anything: this attempt left no record, and the same command starts it again",
                                    run_name, signal.Signals(-proc.returncode).name)
                    raise
                ran += 1
                if rc != 0 or run_status(run_dir) != "FINISHED":
                    log.error("%s failed (exit %s, status %s); see %s", run_name, rc, run_status(run_dir),
                              exp.dir / "logs" / f"{p.name}_seed{s}.log")
                    failed.append(run_name)
    except BaseException as e:
        end_parent(base, parent, ending_status(e))
        raise
    end_parent(base, parent, "FINISHED" if not failed else "FAILED")
    log.info("%s: %d run(s) trained, %d skipped as finished, %d failed%s", exp.name, ran, skipped, len(failed),
             f": {failed}" if failed else "")
    return len(failed)


def run_baseline(exp: Experiment, p: Point, seed_index: int, base: Config, run_dir: Path,
                 parent: str | None) -> bool:
    """One baseline x seed, trained in this process and recorded like a training run
    (``final.json`` with status, valid/test metrics; an MLflow child run)."""
    from .baselines import run_baselines
    from .data import load_prepared
    from .data.cache import ensure_prepared, prepared_dir_for

    if run_status(run_dir) == "FINISHED":
        log.info("%s/seed%d: FINISHED earlier, skipped", p.name, seed_index)
        return True
    cfg = exp.resolved(list(exp.base_sets) + ([f"train.epochs={exp.epochs}"] if exp.epochs else []))
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    ensure_prepared(cfg.data)
    ds = load_prepared(prepared_dir_for(cfg.data))
    seed = cfg.train.seed + seed_index
    log.info("%s/seed%d: baseline", p.name, seed_index)
    # LightGCN keeps its own recipe (BPR pair batches, lr, 3 layers: baselines.py); it shares the
    # epochs, embedding size, seed, cut-offs and early-stopping patience of the MBSSL runs
    res = run_baselines(ds, [p.name], ks=cfg.train.ks, epochs=cfg.train.epochs, dim=cfg.model.dim, seed=seed,
                        eval_every=cfg.train.eval_every, patience=cfg.train.patience,
                        eval_batch_size=cfg.train.eval_batch_size)[p.name]
    final = {"status": "FINISHED", "baseline": p.name, "seed": seed,
             "valid": {k: v for k, v in res.get("valid", {}).items() if k != "n_users"} or None,
             "test": {k: v for k, v in res.get("test", {}).items() if k != "n_users"} or None,
             "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run"), "world_size": 1}
    atomic_write_json(run_dir / "final.json", final)
    if parent:
        import mlflow

        from .tracking import mlflow_name

        mlflow.set_tracking_uri(tracking_uri(cfg))
        client = mlflow.MlflowClient()
        exp_id = client.get_run(parent).info.experiment_id
        run = client.create_run(exp_id, run_name=f"{exp.name}/{p.name}/seed{seed_index}",
                                tags={"mlflow.parentRunId": parent, "mbssl.experiment": exp.name,
                                      "mbssl.point": p.name, "mbssl.seed": str(seed_index)})
        for ph in ("valid", "test"):
            for k, v in (final[ph] or {}).items():
                client.log_metric(run.info.run_id, mlflow_name(f"final/{ph}/{k}"), float(v))
        client.log_artifact(run.info.run_id, str(run_dir / "final.json"))
        client.set_terminated(run.info.run_id, "FINISHED")
    return True


# ----------------------------------------------------------------------------- sparsity (Fig 3)


def target_counts(ds) -> np.ndarray:
    """Training target-behavior (purchase) interactions per user (int64 [n_users])."""
    users, _ = ds.pairs(ds.n_behaviors - 1)
    return np.bincount(np.asarray(users, dtype=np.int64), minlength=ds.n_users)


def sparsity_groups(counts: np.ndarray, users: np.ndarray, n_groups: int = 5) -> list[tuple[int, int]]:
    """Inclusive purchase-count ranges [lo, hi] splitting ``users`` into ``n_groups`` groups of
    (as nearly as ties allow) equal size, sparsest first. The paper (Sec 4.4.1) splits the test
    users into five groups by their number of target interactions; its bin edges are only
    drawn in Fig 3, so equal-size quantile groups are used here. Ties can merge groups (fewer
    than ``n_groups`` are then returned)."""
    c = np.sort(counts[users])
    if len(c) == 0:
        return []
    cuts = sorted({int(c[min(len(c) - 1, (i * len(c)) // n_groups)]) for i in range(1, n_groups)})
    bounds, lo = [], int(c[0])
    for cut in cuts:
        if cut > lo:
            bounds.append((lo, cut - 1))
            lo = cut
    bounds.append((lo, int(c[-1])))
    return bounds


def load_trained(run_dir: Path):
    """(cfg, ds, model run, LocalComm) of ``run_dir`` rebuilt in this process (1 rank, CPU) from
    its newest complete checkpoint, i.e. the state after the last trained epoch."""
    import torch

    from .data import load_prepared
    from .data.cache import prepared_dir_for
    from .parallel.comm import LocalComm
    from .parallel.layout import shard_users
    from .train import build_model
    from .training import CheckpointManager
    from .training.checkpoint import ShardedRows, load_state_tensors

    cfg = load_config(run_dir / "config.toml")
    comm = LocalComm()
    ds = load_prepared(prepared_dir_for(cfg.data))
    part = shard_users(ds, comm, "range", "", cfg.train.seed)
    run = build_model(cfg, ds, part, comm, torch.device("cpu"))
    ckpts = CheckpointManager(run_dir / "checkpoints", comm, cfg.checkpoint.keep)
    found = ckpts.latest_usable()
    if found is None:
        raise ConfigError(f"{run_dir / 'checkpoints'}: no complete checkpoint to rebuild the model from")
    path, doc = found
    load_state_tensors(ckpts, path, doc["tensors"], run.model, run.step, ShardedRows(part.users, ds.n_users, comm))
    return cfg, ds, run, comm, dict(doc, path=str(path))


def trained_scorer(run_dir: Path):
    """(cfg, ds, score_fn over global user ids, source) of the model of ``run_dir``: its saved
    best-validation model (``RUN/model``, the one ``final.json``'s test metrics belong to), or,
    for runs without one, the state of its newest checkpoint (after the last trained epoch)."""
    import torch

    from .export import ModelError, Scoring, open_dataset, read_model_dir, run_model_dir

    try:
        art = read_model_dir(run_model_dir(run_dir))
    except ModelError as e:
        log.warning("%s; using the last checkpoint instead", e)
        art = None
    if art is not None:
        ds = open_dataset(art)
        sc = Scoring(art, ds)
        return art.cfg, ds, sc.scores, {"source": "model", "path": str(art.path), "epoch": int(art.meta["best_epoch"])}
    cfg, ds, run, comm, doc = load_trained(run_dir)
    g2l = torch.from_numpy(run.part.global_to_local)
    run.model.eval()
    with torch.no_grad():
        prop = run.model(run.adjs, comm)

    def score(users: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return run.model.score(prop, g2l[users.cpu()], user_items=run.user_items).cpu()

    # checkpoint "epoch" = the next epoch to train, i.e. the last trained one + 1
    return cfg, ds, score, {"source": "checkpoint", "path": doc["path"], "epoch": int(doc["epoch"]) - 1}


def sparsity_metrics(run_dir: Path, n_groups: int = 5) -> dict:
    """Test metrics per purchase-count group (and over all test users) of the model of
    ``run_dir`` (see ``trained_scorer``), with the project's evaluator; written to sparsity.json."""
    import torch

    from .evaluate import eval_masks, evaluate, heldout_sets

    cfg, ds, score, source = trained_scorer(run_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    masks, held = eval_masks(ds), heldout_sets(ds)
    test_users = np.flatnonzero(np.diff(held["test"].indptr) > 0)
    counts = target_counts(ds)

    def ev(users: np.ndarray) -> dict:
        return evaluate(score, users, held["test"], masks["test"], ks=cfg.train.ks,
                        batch_size=cfg.train.eval_batch_size)

    out = {**source, "grouping": "equal-size quantile groups of test users by training purchase count",
           "all": ev(test_users), "groups": []}
    for lo, hi in sparsity_groups(counts, test_users, n_groups):
        members = test_users[(counts[test_users] >= lo) & (counts[test_users] <= hi)]
        out["groups"].append({"label": f"{lo}-{hi}" if lo != hi else f"{lo}", "lo": lo, "hi": hi,
                              "n_users": int(len(members)), "test": ev(members)})
    atomic_write_json(run_dir / "sparsity.json", out)
    return out


# ----------------------------------------------------------------------------- Optuna search


def load_space(path: str) -> dict[str, dict]:
    """The ``[space]`` table of a search-space TOML: ``"section.field" = {low, high[, log, step]}``
    or ``{choices = [...]}``; each entry is checked against the config's fields."""
    p = Path(path)
    doc = read_toml(p, "search space")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f'{p}: needs a [space] table, e.g. [space] "train.lr" = {{low = 1e-3, high = 1e-1, log = true}}')
    for key, spec in space.items():
        where = f"{p}: space.{key!r}"
        if not isinstance(spec, dict) or not ({"low", "high"} <= set(spec) or "choices" in spec):
            raise ConfigError(f"{where}: expected {{low = .., high = ..}} or {{choices = [..]}}")
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        sample = spec["choices"][0] if "choices" in spec else spec["low"]
        try:
            from_dict(apply_overrides({}, [f"{key}={json.dumps(sample)}"]))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return space


def suggest(trial, key: str, spec: dict) -> Any:
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    lo, hi = spec["low"], spec["high"]
    if all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi, spec.get("step", 1))):
        return trial.suggest_int(key, lo, hi, step=spec.get("step", 1), log=bool(spec.get("log", False)))
    return trial.suggest_float(key, float(lo), float(hi), log=bool(spec.get("log", False)),
                               step=spec.get("step"))


def read_valid(run_dir: Path, metric: str) -> dict[int, float]:
    """epoch -> validation ``metric`` from a (possibly still growing) metrics.jsonl."""
    out = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line being written
        if r.get("kind") == "valid" and metric in r:
            out[int(r["epoch"])] = float(r[metric])
    return out


def run_search(exp: Experiment, space_path: str, n_trials: int, poll: float = 0.5) -> int:
    """TPE search with median pruning on the per-epoch validation metric; the study lives in
    ``OUT/search/study.db`` so a rerun continues it until ``n_trials`` trials are complete or
    pruned in total. Returns the number of failed trials of this invocation."""
    import optuna

    space = load_space(space_path)
    base = exp.resolved(list(exp.base_sets))
    metric = base.train.select_metric
    exp.dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(exp.dir / 'study.db').resolve()}",
                                         heartbeat_interval=30, grace_period=90)
    study = optuna.create_study(study_name="search", storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=base.train.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    # a trial whose invocation was killed stays RUNNING until its heartbeat is older than the
    # grace period; Optuna then marks it FAIL (fail_stale_trials, called by optimize)
    meta_path = exp.dir / "experiment.json"
    prev = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    parent = parent_run(base, exp.name, prev.get("mlflow_parent_run_id"),
                        {"mbssl.experiment": "search", "mbssl.config": exp.label})
    atomic_write_json(meta_path, {"experiment": "search", "config": exp.config, "data": exp.label, "sets": exp.base_sets,
                                  "seeds": 1, "epochs": exp.epochs, "processes": exp.processes, "space": space,
                                  "select_metric": metric, "mlflow_parent_run_id": parent,
                                  "tracking_uri": tracking_uri(base) if parent else None, "points": []})
    failures = []

    def objective(trial) -> float:
        params = {k: suggest(trial, k, spec) for k, spec in space.items()}
        point = Point(f"trial{trial.number:04d}", [f"{k}={json.dumps(v)}" for k, v in params.items()])
        sets = exp.sets_for(point, 0, base)
        run_dir = exp.dir / point.name / "seed0"
        tags = {"mbssl.experiment": "search", "mbssl.point": point.name, "mbssl.trial": str(trial.number),
                "mbssl.overrides": " ".join(point.overrides)}
        env = {"MBSSL_MLFLOW_TAGS": json.dumps(tags)}
        if parent:
            env["MBSSL_MLFLOW_PARENT_RUN_ID"] = parent
        log.info("trial %d: %s", trial.number, params)
        proc = start_training(exp.config, sets, exp.processes, exp.dir / "logs" / f"{point.name}.log", env)
        reported: set[int] = set()
        try:
            while True:
                done = proc.poll() is not None
                for epoch, v in sorted(read_valid(run_dir, metric).items()):
                    if epoch not in reported:
                        reported.add(epoch)
                        trial.report(v, epoch)
                        if trial.should_prune():
                            log.info("trial %d pruned at epoch %d (%s = %.4f)", trial.number, epoch, metric, v)
                            stop(proc)
                            raise optuna.TrialPruned()
                if done:
                    break
                time.sleep(poll)
        except BaseException:
            stop(proc)
            raise
        if proc.returncode != 0 or run_status(run_dir) != "FINISHED":
            failures.append(trial.number)
            raise RuntimeError(f"trial {trial.number}: training failed (exit {proc.returncode}); "
                               f"see {exp.dir / 'logs' / (point.name + '.log')}")
        final = json.loads((run_dir / "final.json").read_text())
        return float(final["valid"][metric])

    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    todo = n_trials - len(study.get_trials(deepcopy=False, states=counted))
    log.info("search: %d trial(s) done earlier, %d to run", n_trials - max(todo, 0), max(todo, 0))
    try:
        if todo > 0:
            study.optimize(objective, n_trials=todo, catch=(RuntimeError,))
    except BaseException as e:
        end_parent(base, parent, ending_status(e))
        raise
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if done:
        best = study.best_trial
        log.info("best trial %d: %s = %.4f with %s", best.number, metric, best.value, best.params)
        atomic_write_json(exp.dir / "best.json", {"trial": best.number, "value": best.value, "params": best.params,
                                                  "metric": metric})
    end_parent(base, parent, "FINISHED" if not failures else "FAILED")
    return len(failures)


# ----------------------------------------------------------------------------- CLI


def data_source(data: str) -> tuple[str | None, list[str], str]:
    """``--data`` as (config file or None, the --set lines it implies, a label for the records):
    ``synthetic``; a directory (prepared when it holds a manifest, else text: the built-in
    defaults on it); otherwise a config file."""
    if data == "synthetic":
        return None, [], "synthetic"
    p = Path(data)
    if p.is_dir():
        from .data.dataset import MANIFEST

        fmt = "prepared" if (p / MANIFEST).is_file() else "text"
        return None, [f'data.format="{fmt}"', f"data.path={json.dumps(str(p.resolve()))}"], str(p.resolve())
    return data, [], data


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mbssl_dist.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=EXPERIMENTS)
    p.add_argument("--data", required=True, help="config TOML (configs/NAME.toml), a dataset directory (the "
                   "built-in defaults on it; pv-less data also needs --set data.behaviors=... etc.) or 'synthetic'")
    p.add_argument("--seeds", type=int, default=3, help="seeds per grid point (train.seed + 0..N-1)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: the config's)")
    p.add_argument("--processes", type=int, default=1, help="ranks per run (torchrun when > 1)")
    p.add_argument("--out", default="experiments", help="parent directory; runs go to OUT/NAME/POINT/seedS")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override applied to every run, repeatable")
    p.add_argument("--points", help="comma-separated grid points to train now (default: all); the "
                   "others keep what they have, and the report shows every point with runs")
    p.add_argument("--space", help="search: TOML file with a [space] table")
    p.add_argument("--trials", type=int, default=20, help="search: total number of trials (a rerun tops up)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, data_sets, label = data_source(a.data)
    try:
        with StopSignals():  # inside the try: a signal at any point is caught below
            for opt, v in (("--seeds", a.seeds), ("--processes", a.processes), ("--trials", a.trials)):
                if v < 1:
                    raise ConfigError(f"{opt} = {v}: must be >= 1")
            if a.epochs is not None and a.epochs < 1:
                raise ConfigError(f"--epochs = {a.epochs}: must be >= 1")
            exp = Experiment(a.name, config, data_sets + list(a.set), a.seeds, a.processes, Path(a.out), a.epochs,
                             label=label)
            exp.resolved(list(a.set))  # validate the base config before anything runs
            if a.name == "search":
                if not a.space:
                    raise ConfigError("search needs --space FILE (a TOML [space] table)")
                if a.points:
                    raise ConfigError("--points selects grid points; search has trials, not points")
                failed = run_search(exp, a.space, a.trials)
            else:
                only = [x.strip() for x in a.points.split(",") if x.strip()] if a.points else None
                failed = run_grid(exp, grid(a.name), only)
                if a.name == "sparsity":
                    for s in range(exp.seeds):
                        run_dir = exp.dir / "mbssl" / f"seed{s}"
                        if run_status(run_dir) == "FINISHED":
                            res = sparsity_metrics(run_dir)
                            log.info("%s: test metrics of %d user groups in sparsity.json (tabulated by "
                                     "python -m mbssl_dist.report %s)", run_dir, len(res["groups"]), exp.dir)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        log.error("interrupted by %s: the running point was stopped (recorded KILLED; rerun the same "
                  "command to continue the grid)", signal.Signals(signum).name)
        return 128 + signum
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
