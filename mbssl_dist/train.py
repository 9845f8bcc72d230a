"""``python -m mbssl_dist.train --config configs/NAME.toml [--set section.field=value ...]``

One loop that reads top-down in build order: config -> process group -> data (prepared on
first use) -> swing false negatives -> this rank's users -> model -> training step (losses,
per-task gradients, HMG, Adam) -> epochs with validation, early stopping and test at the
best validation epoch -> final.json and MLflow. Under ``torchrun`` every rank runs this same
function; everything distributed goes through ``parallel``.
"""

from __future__ import annotations

import argparse
import resource
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from .config import (Config, ConfigError, auto_batch_size, check_runtime, describe, load_config,
                     resolve_against_data, validate_against_data)
from .data import load_prepared
from .data.dataset import PreparedDataset
from .data.cache import ensure_prepared, prepared_dir_for
from .data.errors import DataError
from .evaluate import NonFiniteScoresError, eval_masks, evaluate, heldout_sets
from .export import save_model
from .graph.sparse import csr_rows_table, set_sparse_backend
from .model import MBSSL
from .parallel.comm import Comm
from .parallel.dist import init_distributed, shutdown
from .parallel.layout import GradReducer, shard_users, target_views
from .parallel.part import LocalPart
from .swing.cache import ensure_swing, load_topn_csr
from .tracking import RunLogger, git_commit
from .training import CheckpointError, CheckpointManager, EvalHistory, NonFiniteLossError, TrainStep, build_batch
from .training.checkpoint import ShardedRows, describe_tensors, load_state_tensors, state_tensors
from .utils.allocator import keep_freed_memory
from .utils.seeding import make_generator
from .utils.signals import HandleStopSignals

log = logging.getLogger("mbssl_dist.train")


def setup_logging(rank: int | None = None) -> None:
    """Log lines labelled with the process's real rank: ``rank`` or, before the process group
    exists, torchrun's ``RANK`` environment variable (0 outside torchrun). Rank 0 logs INFO,
    the others WARNING and above."""
    if rank is None:
        try:
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            rank = 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mbssl_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML config file (configs/*.toml); omitted = all defaults (synthetic)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (TOML value syntax), repeatable")
    p.add_argument("--prepare-only", action="store_true", help="prepare data and swing into the cache, then exit")
    p.add_argument("--help-config", action="store_true", help="list every config field with its meaning")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- pieces


def false_negative_tables(cfg: Config, ds, comm):
    """(user_fn, item_fn) CSR tables (indptr, indices) of the top-N swing neighbors, or None
    where not used. Swing is computed once into the cache by rank 0."""
    lo = cfg.loss
    if not lo.use_inter or (lo.fn_users == 0 and lo.fn_items == 0):
        return None, None
    if comm.is_main:
        ensure_swing(cfg, ds)
    comm.barrier()
    swing_dir = ensure_swing(cfg, ds, compute=False)
    user_fn = load_topn_csr(swing_dir, "user", lo.fn_users, ds.n_users) if lo.fn_users else None
    item_fn = load_topn_csr(swing_dir, "item", lo.fn_items, ds.n_items) if lo.fn_items else None
    return user_fn, item_fn


@dataclass
class Evaluator:
    """Validation / test evaluation of this rank's users (sums all-reduced inside)."""

    ds: PreparedDataset
    part: LocalPart
    ks: list[int]
    batch_size: int

    def __post_init__(self):
        self.masks = eval_masks(self.ds)
        self.held = heldout_sets(self.ds)
        mine = np.zeros(self.ds.n_users, dtype=bool)
        mine[self.part.users] = True
        self.users = {ph: np.flatnonzero((np.diff(self.held[ph].indptr) > 0) & mine) for ph in ("valid", "test")}

    def __call__(self, model: MBSSL, adjs: list, comm: Comm, phases=("valid", "test"), user_items: list | None = None,
                 progress: bool = False) -> dict:
        g2l = torch.from_numpy(self.part.global_to_local)
        model.eval()
        with torch.no_grad():
            prop = model(adjs, comm)

            def score(users: torch.Tensor) -> torch.Tensor:
                return model.score(prop, g2l[users.cpu()].to(prop.users.device), user_items=user_items).cpu()

            out = {ph: evaluate(score, self.users[ph], self.held[ph], self.masks[ph], ks=self.ks,
                                batch_size=self.batch_size, comm=comm, progress=progress) for ph in phases}
        model.train()
        return out


def mean_stats(results: list[dict]) -> dict:
    """Per-epoch means of the per-step task losses and HMG statistics (``results``: one
    ``{"losses", "hmg"}`` dict per step, JSON-able so a mid-epoch checkpoint can hold them)."""
    out: dict[str, float] = {}
    n = len(results)
    if not n:
        return out
    first = results[0]["hmg"]
    for t, s in zip(first.get("aux_tasks", []), first.get("aux", [])):
        for k in ("norm_ratio", "applied_ratio"):
            if k in s and math.isfinite(s[k]):
                out[f"hmg/{t}/{k}_first_step"] = s[k]
    for r in results:
        b = r["hmg"].get("aux_total_bound")
        if b is not None and math.isfinite(b):
            out["hmg/aux_total_bound"] = out.get("hmg/aux_total_bound", 0.0) + b / n
        for k, v in r["losses"].items():
            out[f"loss/{k}"] = out.get(f"loss/{k}", 0.0) + v / n
        for t, s in zip(r["hmg"].get("aux_tasks", []), r["hmg"].get("aux", [])):
            for k, v in s.items():
                if math.isfinite(v):
                    out[f"hmg/{t}/{k}"] = out.get(f"hmg/{t}/{k}", 0.0) + v / n
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@dataclass
class ModelRun:
    """What one rank trains: its model, step, adjacencies and batch builder."""

    model: MBSSL
    step: TrainStep
    adjs: list
    csr: list
    part: LocalPart
    n_items: int
    user_fn: tuple | None
    item_fn: tuple | None
    user_items: list | None
    dtype: torch.dtype = torch.float32

    def batch(self, global_users: np.ndarray):
        """This rank's share of a global batch of user ids (may be empty on some ranks)."""
        local = self.part.global_to_local[np.asarray(global_users, dtype=np.int64)]
        rows = torch.from_numpy(np.sort(local[local >= 0]))
        batch = build_batch(self.csr, rows, self.n_items, user_ids=torch.from_numpy(self.part.users),
                            user_fn=self.user_fn, item_fn=self.item_fn,
                            interaction=self.model.interaction_scoring)
        device = self.model.user_embedding.device
        return batch if device.type == "cpu" else batch.to(device)


def epoch_permutation(n_users: int, seed: int, epoch: int) -> np.ndarray:
    """Global batch order of an epoch: the same on every rank and for any number of ranks."""
    return torch.randperm(n_users, generator=make_generator(seed, epoch, -1, "batches")).numpy()


def build_model(cfg: Config, ds, part, comm, device: torch.device, user_fn_all=None, item_fn=None,
                dtype: torch.dtype = torch.float32) -> ModelRun:
    """Model (local user rows, replicated items), training step with the gradient all-reduce
    hook, and the local adjacencies/false-negative tables of ``part``."""
    for note in resolve_against_data(cfg, ds.manifest, list(ds.behaviors)):
        log.info(note)
    m, K = cfg.model, ds.n_behaviors
    adjs = [part.graph.adjacency(k, m.norm, dtype, device) for k in range(K)]
    csr = [(g.indptr, g.indices) for g in part.graph.graphs]
    # the rows of this rank's users, in local order (false negatives keep global ids)
    user_fn = csr_rows_table((torch.from_numpy(np.asarray(user_fn_all[0], dtype=np.int64)),
                              torch.from_numpy(np.asarray(user_fn_all[1], dtype=np.int64))),
                             torch.from_numpy(part.users)) if user_fn_all is not None else None
    item_fn_t = (torch.from_numpy(np.asarray(item_fn[0], dtype=np.int64)),
                 torch.from_numpy(np.asarray(item_fn[1], dtype=np.int64))) if item_fn is not None else None
    model = MBSSL(part.n_local, ds.n_items, K, dim=m.dim, n_layers=m.n_layers, att_dim=m.att_dim,
                  dropout=m.dropout, use_cdm=m.use_cdm, interaction_scoring=m.interaction_scoring,
                  interaction_per_item=m.interaction_per_item, item_bias=m.item_bias, init_scale=m.init_scale,
                  n_users_global=ds.n_users, user_ids=torch.from_numpy(part.users),
                  init_generator=make_generator(cfg.train.seed, 0, 0, "init")).to(device)
    step = TrainStep(model, cfg.loss, cfg.hmg, cfg.train, comm, aux_names=list(ds.behaviors)[:-1])
    step.reduce_grads = GradReducer(step.params, comm)
    if cfg.loss.negatives == "sampled" and cfg.loss.negative_sampler == "popularity":
        step.popularity = (torch.from_numpy(np.bincount(ds.train_user, minlength=ds.n_users)),
                           torch.from_numpy(np.bincount(ds.train_item, minlength=ds.n_items)))
    user_items = None
    if m.interaction_scoring:
        user_items = [torch.sparse_csr_tensor(g.indptr, g.indices, torch.ones(g.nnz), size=(g.n_users, g.n_items))
                      for g in part.graph.graphs]
    return ModelRun(model, step, adjs, csr, part, ds.n_items, user_fn, item_fn_t, user_items, dtype)


# ----------------------------------------------------------------------------- resume


class RunInterrupted(Exception):
    """SIGTERM / SIGINT arrived (Slurm preemption, torchrun tearing workers down, Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


_SIGNALS: list[int] = []  # signals received by this process's run (a library may wrap our exception)


def _raise_interrupted(signum, _frame) -> None:
    first = not _SIGNALS
    _SIGNALS.append(signum)
    if first:  # a repeated signal must not interrupt the recording of the first one
        raise RunInterrupted(signum)


def _note_signal(signum, _frame) -> None:
    _SIGNALS.append(signum)


# Config fields a resumed run may change: how it is operated, not what it computes
# (train.epochs may grow to train longer).
RESUMABLE_CHANGES = ("train.epochs", "train.threads", "train.device", "train.eval_batch_size", "run.",
                     "dist.", "checkpoint.", "data.path", "data.cache_dir", "swing.workers")


# Fields added since a checkpoint may have been written: what a saved config without the field
# ran with, as a function of that (settled) config. Before ``model.item_bias`` the target score
# had a bias exactly when the interaction term was on; before ``train.lr_decay`` the rate was
# constant.
ABSENT_MEANS = {
    "model.item_bias": lambda saved: bool(saved.get("model", {}).get("interaction_scoring")),
    "train.lr_decay": lambda saved: 1.0,
    "train.lr_patience": lambda saved: 2,
    # before the field, sampled negatives always had the in-batch candidates
    "loss.in_batch_negatives": lambda saved: saved.get("loss", {}).get("negatives") == "sampled",
}


def config_differences(saved: dict, now: dict) -> list[str]:
    """Fields (section.field) whose values differ between a checkpoint's config and this run's,
    ignoring those listed in ``RESUMABLE_CHANGES``; a field the checkpoint's config lacks counts
    as the value it ran with (``ABSENT_MEANS``). Both must be settled against the data
    (``config.resolve_against_data``): the saved config holds what its ``auto`` fields became."""
    out = []
    for sec in sorted(set(saved) | set(now)):
        a, b = saved.get(sec, {}), now.get(sec, {})
        for k in sorted(set(a) | set(b)):
            key = f"{sec}.{k}"
            was = a[k] if k in a else ABSENT_MEANS[key](saved) if key in ABSENT_MEANS else None
            if not key.startswith(RESUMABLE_CHANGES) and was != b.get(k):
                out.append(f"{key} ({was!r} in the checkpoint, {b.get(k)!r} now)")
    return out


def find_resume_point(cfg: Config, ckpts: CheckpointManager, dataset_sha: str) -> tuple[Path, dict] | None:
    """The checkpoint this run continues from, per ``run.resume``; raises ConfigError on a
    checkpoint of another config or dataset and CheckpointError when only damaged ones exist."""
    mode = cfg.run.resume
    if mode == "never":
        return None
    found = ckpts.latest_usable()
    if found is None:
        if mode == "require":
            raise ConfigError(f"run.resume = \"require\" but {ckpts.root} holds no complete checkpoint")
        return None
    path, doc = found
    diff = config_differences(doc["config"], cfg.to_dict())
    if diff:
        raise ConfigError(f"run.resume: {path} was written by a different config: {'; '.join(diff)} "
                          f"(use another run.name, or run.resume = \"never\" to start over)")
    if doc.get("dataset_sha256") != dataset_sha:
        raise ConfigError(f"run.resume: {path} was trained on another dataset (sha256 {doc.get('dataset_sha256')}, "
                          f"now {dataset_sha}); use another run.name or run.resume = \"never\"")
    return path, doc


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, comm, device: torch.device, prepare_only: bool = False) -> int:
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.keep_freed_memory:
        keep_freed_memory()

    # 1. data: prepared once by rank 0, then loaded by every rank (a bad input found by rank 0
    # stops every rank with exit 2, not the others with a gloo error at the next collective)
    bad: DataError | None = None
    if comm.is_main:
        try:
            ensure_prepared(cfg.data)
        except DataError as e:
            bad = e
    failed = comm.all_reduce_sum_(torch.tensor([1.0 if bad else 0.0]))
    if bad is not None:
        raise bad
    if failed.item():
        raise DataError("the data could not be prepared (rank 0 says why)")
    ds = load_prepared(prepared_dir_for(cfg.data))
    validate_against_data(cfg, ds.behaviors)
    log.info("data %s: %d users x %d items, behaviors %s (target %r), train counts %s", ds.path, ds.n_users,
             ds.n_items, ds.behaviors, ds.behaviors[-1], ds.counts())

    # 2. swing false negatives (cached)
    user_fn_all, item_fn = false_negative_tables(cfg, ds, comm)
    if prepare_only:
        log.info("prepare-only: data and swing are cached")
        return 0

    # 3. this rank's users and their graph (global degrees)
    part = shard_users(ds, comm, cfg.dist.partition, cfg.dist.partition_dir, tc.seed)
    log.info("rank %d holds %d users, %d edges", comm.rank, part.n_local, sum(g.nnz for g in part.graph.graphs))

    # 4. model and training step
    run = build_model(cfg, ds, part, comm, device, user_fn_all, item_fn)
    model, step, adjs = run.model, run.step, run.adjs
    state = step.state
    evaluator = Evaluator(ds, part, list(tc.ks), tc.eval_batch_size)
    history = EvalHistory(tc.select_metric, tc.patience)

    # 5. run directory (locked by the main rank), then resume from its newest checkpoint
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    logger = RunLogger(run_dir, comm.is_main, cfg.run.mlflow, cfg.run.tracking_uri, cfg.run.experiment,
                       cfg.run.name)
    comm.barrier()
    ckpts = CheckpointManager(run_dir / "checkpoints", comm, cfg.checkpoint.keep)
    rows = ShardedRows(part.users, ds.n_users, comm)
    resume = find_resume_point(cfg, ckpts, ds.checksum())
    start_epoch, start_batch, partial = 0, 0, []
    if resume is None:
        if comm.is_main:
            if ckpts.root.exists() or (run_dir / "model").exists():
                log.info("starting fresh in %s: removing the earlier run's checkpoints and model", run_dir)
            ckpts.clear()
            shutil.rmtree(run_dir / "model", ignore_errors=True)
        comm.barrier()
    else:
        path, doc = resume
        t_load = time.time()
        load_state_tensors(ckpts, path, doc["tensors"], model, step, rows)
        load_seconds = time.time() - t_load
        # state.epoch = the last epoch trained (the loop sets it again before each step)
        state.step = int(doc["step"])
        state.epoch = int(doc["epoch"]) - (1 if int(doc["batch"]) == 0 else 0)
        state.hmg.steps = int(doc["hmg_steps"])
        state.load_lr_state(doc.get("lr_schedule"))
        history.load_state_dict(doc["history"])
        start_epoch, start_batch, partial = int(doc["epoch"]), int(doc["batch"]), list(doc["partial"])
        log.info("resuming from %s (written by %d rank(s)): epoch %d, batch %d, global step %d", path,
                 doc["world_size"], start_epoch, start_batch, state.step)
    ckpts.remove_partial()

    def save_checkpoint(epoch: int, batch: int, partial_results: list[dict]) -> None:
        t0 = time.time()
        tensors = state_tensors(model, step, rows)
        meta = {"epoch": epoch, "batch": batch, "partial": partial_results, "hmg_steps": state.hmg.steps,
                "lr_schedule": state.lr_state(),
                "history": history.state_dict(), "logger": logger.state_dict(), "config": cfg.to_dict(),
                "dataset_sha256": ds.checksum(), "tensors": describe_tensors(tensors)}
        path = ckpts.save(state.step, tensors, meta)
        seconds = time.time() - t0
        size = sum(f.stat().st_size for f in path.iterdir()) if comm.is_main else 0
        log.info("checkpoint %s (%.2fs, %.1f MB)", path, seconds, size / 1e6)
        logger.timing({"kind": "checkpoint", "epoch": epoch, "step": state.step, "seconds": round(seconds, 4),
                       "bytes": size})

    # 6. epochs; every exit is recorded (FINISHED / FAILED / KILLED) in run.json, final.json and MLflow
    U, B = ds.n_users, auto_batch_size(tc.batch_size, ds.n_users)
    n_batches = math.ceil(U / B)
    if not tc.batch_size:
        log.info("train.batch_size = 0 (auto): %d users per step, %d steps per epoch", B, n_batches)
    if tc.max_steps_per_epoch:
        n_batches = min(n_batches, tc.max_steps_per_epoch)
    progress = cfg.run.progress and comm.is_main
    every_steps = cfg.checkpoint.every_steps
    _SIGNALS.clear()

    def finish(doc: dict, status: str) -> None:
        """Write the run's record: a signal meanwhile is noted, never cuts it short (an MLflow
        run left RUNNING, or a FAILED run recorded over as KILLED)."""
        before = len(_SIGNALS)
        with HandleStopSignals(_note_signal):
            logger.finish(doc, status=status)
        if len(_SIGNALS) > before:
            log.warning("%s arrived while the %s run was being recorded; recorded %s",
                        signal.Signals(_SIGNALS[-1]).name, status.lower(), status)

    with HandleStopSignals(_raise_interrupted):  # restored when the block ends, however it ends
        try:
            # the start writes run.json and opens the MLflow run: a signal during it is noted,
            # then raised once both exist, so it is recorded KILLED like one in the loop
            with HandleStopSignals(_note_signal):
                logger.start(cfg.to_dict(), cfg.flat(),
                             {"git_commit": git_commit(), "dataset_sha256": ds.checksum(), "dataset": str(ds.path),
                              "world_size": str(comm.world_size), "device": str(device),
                              "config_file": cfg.source},
                             resume=dict(resume[1]["logger"], step=resume[1]["step"]) if resume else None)
            if _SIGNALS:
                raise RunInterrupted(_SIGNALS[-1])
            if resume:
                logger.timing({"kind": "resume", "epoch": start_epoch, "step": state.step,
                               "seconds": round(load_seconds, 4), "from_world_size": resume[1]["world_size"]})
            for epoch in range(start_epoch, tc.epochs):
                if history.should_stop():
                    break
                state.epoch = epoch
                t0 = time.time()
                views = None
                if cfg.loss.use_intra:
                    views = target_views(part, cfg.loss.intra_view, cfg.loss.intra_dropout, tc.seed, epoch, comm,
                                         cfg.model.norm, run.dtype, device)
                perm = epoch_permutation(U, tc.seed, epoch)
                first = start_batch if epoch == start_epoch else 0
                results = list(partial) if epoch == start_epoch else []
                bar = range(first, n_batches)
                if progress:
                    bar = tqdm(bar, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, initial=first,
                               total=n_batches)
                for b in bar:
                    batch = run.batch(perm[b * B:(b + 1) * B])
                    try:
                        res = step(batch, adjs, views)
                    except NonFiniteLossError as e:
                        msg = f"non-finite loss in task {e.task!r} at epoch {epoch}, step {b} (global step {state.step})"
                        log.error("%s: %s; stopping", msg, e.value)
                        logger.record({"kind": "error", "epoch": epoch, "step": b, "task": e.task, "message": msg})
                        finish({"error": msg, "exit_code": 3, "evaluations": history.rows}, "FAILED")
                        return 3
                    results.append({"losses": res.losses, "hmg": {"aux_tasks": res.hmg.get("aux_tasks", []),
                                                                  "aux": res.hmg.get("aux", []),
                                                                  "aux_total_bound": res.hmg.get("aux_total_bound")}})
                    if progress:
                        bar.set_postfix(rec=f"{res.losses['rec']:.4g}")
                    if every_steps and state.step % every_steps == 0 and b + 1 < n_batches:
                        save_checkpoint(epoch, b + 1, results)
                rec = {"kind": "epoch", "epoch": epoch, "steps": len(results), "lr": state.lr}
                timing = {"seconds": round(time.time() - t0, 3), "peak_rss_mb": peak_rss_mb()}
                if device.type == "cuda":
                    timing["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                rec.update(mean_stats(results))
                logger.record(rec, step=epoch, timing=timing)
                log.info("epoch %d: %.1fs, %s", epoch, timing["seconds"],
                         ", ".join(f"{k[5:]}={v:.4g}" for k, v in rec.items() if k.startswith("loss/")))

                last = epoch == tc.epochs - 1
                if (epoch + 1) % tc.eval_every == 0 or last:
                    t1 = time.time()
                    try:
                        res = evaluator(model, adjs, comm, user_items=run.user_items, progress=progress)
                    except NonFiniteScoresError:
                        msg = (f"non-finite scores at the evaluation after epoch {epoch} (global step {state.step}): "
                               f"the parameters diverged; lower train.lr")
                        log.error("%s; stopping", msg)
                        logger.record({"kind": "error", "epoch": epoch, "step": None, "task": "evaluation",
                                       "message": msg})
                        finish({"error": msg, "exit_code": 3, "evaluations": history.rows}, "FAILED")
                        return 3
                    eval_seconds = round(time.time() - t1, 3)
                    for ph in ("valid", "test"):
                        logger.record({"kind": ph, "epoch": epoch, **res[ph]}, step=epoch,
                                      timing={"eval_seconds": eval_seconds} if ph == "valid" else None)
                    scores = {ph: {k: v for k, v in res[ph].items() if k != "n_users"} for ph in ("valid", "test")}
                    improved = history.add(epoch, scores["valid"], scores["test"])
                    if improved:  # the best-validation model -> runs/NAME/model (collective)
                        save_model(run_dir / "model", run, cfg, ds, comm, history.rows[-1])
                    log.info("epoch %d valid: %s | test: %s%s | eval %.1fs beside the epoch's %.1fs", epoch,
                             " ".join(f"{k}={v:.4f}" for k, v in scores["valid"].items()),
                             " ".join(f"{k}={v:.4f}" for k, v in scores["test"].items()), " *" if improved else "",
                             eval_seconds, timing["seconds"])
                    if state.after_evaluation(scores["valid"][tc.select_metric]):
                        log.info("learning rate lowered to %.3g after %d evaluations without a validation improvement",
                                 state.lr, tc.lr_patience)
                    if history.should_stop():
                        log.info("early stop: no validation improvement in %d evaluations", history.bad)
                every = cfg.checkpoint.every_epochs
                if (every and (epoch + 1) % every == 0) or history.should_stop() or last:
                    save_checkpoint(epoch + 1, 0, [])
            # 7. final report: test at the best validation epoch; the reference protocol separately
            best, ref = history.best, history.reference_best
            final = {
                "select_metric": tc.select_metric,
                "best_epoch": best["epoch"] if best else None,
                "valid": best["valid"] if best else None,
                "test": best["test"] if best else None,
                "reference_protocol_best_test_epoch": {"epoch": ref["epoch"], "test": ref["test"]} if ref else None,
                "epochs_run": state.epoch + 1,
                "steps": state.step,
                "world_size": comm.world_size,
                "dataset": str(ds.path),
                "dataset_sha256": ds.checksum(),
            }
            if comm.is_main and cfg.run.mlflow and (run_dir / "model").is_dir():
                from .mlflow_model import log_model_to_mlflow  # mlflow.pyfunc: imported only when used

                try:
                    log_model_to_mlflow(run_dir / "model")
                except Exception as e:  # noqa: BLE001 - the run itself finished; say what is missing
                    if isinstance(e, RunInterrupted) or _SIGNALS:
                        raise
                    log.warning("the model was not logged to MLflow (%s: %s); it is in %s", type(e).__name__, e,
                                run_dir / "model")  # the best-validation model under the run's "Logged models"
            # the run has finished: a signal now must not cut its recording short (nor be recorded
            # as KILLED over a FINISHED final.json); noted, and the process exits as it would anyway
            finish(final, "FINISHED")
        except BaseException as e:
            if isinstance(e, RunInterrupted) or _SIGNALS:  # also when e.g. MLflow wrapped our RunInterrupted
                signum = e.signum if isinstance(e, RunInterrupted) else _SIGNALS[-1]
                msg = f"interrupted by {signal.Signals(signum).name}"
                log.error("%s at epoch %d, global step %d; recorded as KILLED", msg, state.epoch, state.step)
                finish({"error": msg, "exit_code": 128 + signum, "evaluations": history.rows}, "KILLED")
                return 128 + signum
            finish({"error": f"{type(e).__name__}: {e}", "exit_code": 1, "evaluations": history.rows}, "FAILED")
            raise

    if comm.is_main:
        log.info("best epoch %s: test %s (outputs in %s)", final["best_epoch"], final["test"], run_dir)
    return 0


# Test hook (tests/test_launch.py): the rank named here raises right after the process group
# is up, to prove that a failing rank's traceback reaches the console.
_RAISE_ON_RANK_ENV = "MBSSL_TEST_RAISE_ON_RANK"


@record
def main(argv=None) -> int:
    """Entry point; ``@record`` (torch elastic) writes an uncaught exception's traceback to
    the error file torchrun gives each worker, so the launcher can show it for any rank."""
    args = parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    setup_logging()
    try:
        cfg = load_config(args.config, args.set)
        check_runtime(cfg)  # train.device = "cuda" without a GPU
        prepared_dir_for(cfg.data)  # a missing data.path fails here, on every rank
    except (ConfigError, DataError) as e:
        what = "data error" if isinstance(e, DataError) else "config error"
        log.error("%s: %s", what, e)
        print(f"{what}: {e}", file=sys.stderr)
        return 2

    set_sparse_backend(cfg.train.sparse_backend)
    comm, device = init_distributed(cfg.train.device, cfg.dist.collectives)
    setup_logging(comm.rank)
    try:
        if os.environ.get(_RAISE_ON_RANK_ENV, "") == str(comm.rank):
            raise RuntimeError(f"{_RAISE_ON_RANK_ENV}={comm.rank}: test failure on rank {comm.rank}")
        return train(cfg, comm, device, prepare_only=args.prepare_only)
    except (ConfigError, DataError) as e:
        what = "data error" if isinstance(e, DataError) else "config error"
        log.error("%s: %s", what, e)
        print(f"{what}: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        log.error("checkpoint error: %s", e)
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown(comm)


if __name__ == "__main__":
    sys.exit(main())
