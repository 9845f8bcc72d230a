"""Baseline recommenders scored with the same evaluator as MBSSL (``mbssl_dist.evaluate``).

Every baseline is a *scorer*: ``scorer(users: LongTensor[B]) -> FloatTensor[B, n_items]``.

* ``PopularityScorer`` ("popularity"): score(u, i) = number of training target-behavior
  interactions of item i (same for every user). Ties are broken by ascending item id by the
  evaluator's tie rule.
* ``AuxPopularityScorer`` ("aux_popularity"): items the user had in an auxiliary behavior
  first, ordered by the *closest* such behavior (``ds.behaviors`` is in ascending closeness
  to the target, target last, so the last auxiliary behavior ranks highest), then by
  popularity; then all other items by popularity. As a score::

      score(u, i) = level(u, i) + pop(i) / (max_pop + 1)     (float64)
      level(u, i) = 1 + max{k < n_behaviors - 1 : (u, i) in behavior k}, or 0 if none

  The popularity term is in [0, 1), so it only orders items within one level. Training
  target items are removed by the evaluator's mask, so "hasn't bought" holds at ranking time.
* ``LightGCN`` (He et al., SIGIR'20): ego embeddings propagated with the symmetric-normalized
  bipartite adjacency, no transforms or nonlinearities, final embedding = mean of layers
  0..L; trained with BPR and uniform negative sampling (``train_lightgcn``). Two variants:
  "lightgcn" (target behavior graph only) and "lightgcn_all" (union of all behaviors' pairs,
  de-duplicated, as one graph; positives for BPR are the union's pairs).

Runner: ``python -m mbssl_dist.baselines --data PREPARED_DIR --out results.json`` (each baseline
is also an MLflow run named after it, in ``--experiment``, with the trainer's metric names;
``--no-mlflow`` skips it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .graph.multigraph import BehaviorGraph
from .graph.sparse import spmm
from .tracking import connect
from .utils.seeding import epoch_generator

log = logging.getLogger(__name__)

BASELINES = ("popularity", "aux_popularity", "lightgcn", "lightgcn_all")


# --------------------------------------------------------------------------- popularity

def item_popularity(ds) -> np.ndarray:
    """Training target-behavior interaction count per item (int64 [n_items])."""
    _, items = ds.pairs(ds.n_behaviors - 1)
    return np.bincount(items.astype(np.int64), minlength=ds.n_items).astype(np.int64)


class PopularityScorer:
    """score(u, i) = #training target interactions of item i (ties: item id, by the evaluator)."""

    def __init__(self, ds, device: torch.device | str = "cpu"):
        self.scores = torch.from_numpy(item_popularity(ds).astype(np.float64)).to(device)

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return self.scores.unsqueeze(0).expand(len(users), -1)


class AuxPopularityScorer:
    """Auxiliary-behavior items of the user (closest behavior first), then popularity.
    ``within`` (finite, non-negative, per item) replaces popularity as the order inside each
    auxiliary level; the items in no auxiliary behavior keep the popularity order
    (``tools/split_shift.py`` orders the levels by conversion rate and by cart count)."""

    def __init__(self, ds, device: torch.device | str = "cpu", within: np.ndarray | None = None):
        pop = item_popularity(ds).astype(np.float64)
        self.pop = torch.from_numpy(pop / (pop.max(initial=0.0) + 1.0)).to(device)
        if within is None:
            self.within = self.pop
        else:
            w = np.asarray(within, dtype=np.float64)
            if w.shape != (ds.n_items,) or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"within: need {ds.n_items} finite non-negative values, got shape {w.shape}")
            self.within = torch.from_numpy(w / (w.max(initial=0.0) + 1.0)).to(device)
        # level matrix: 1 + max aux behavior index, as a CSR (0 = absent)
        level = sp.csr_matrix((ds.n_users, ds.n_items), dtype=np.float64)
        for k in range(ds.n_behaviors - 1):
            m = ds.behavior_csr(k, dtype=np.float64) * float(k + 1)
            level = level.maximum(m)
        level = sp.csr_matrix(level)
        level.sort_indices()
        self.level = level
        self.device = device

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        u = users.cpu().numpy()
        sub = self.level[u]
        out = self.pop.unsqueeze(0).repeat(len(u), 1)
        rows = torch.from_numpy(np.repeat(np.arange(len(u)), np.diff(sub.indptr))).to(out.device)
        cols = torch.from_numpy(sub.indices.astype(np.int64)).to(out.device)
        out[rows, cols] = self.within[cols] + torch.from_numpy(sub.data).to(out.device)
        return out


# --------------------------------------------------------------------------- LightGCN

class LightGCN(nn.Module):
    """LightGCN embeddings. ``forward(A_ui, A_iu)`` needs ``A_iu == A_ui.T`` (symmetric
    normalization D_u^-1/2 A D_i^-1/2, as built by ``BehaviorGraph.adjacency("sym")``)."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, n_layers: int = 3,
                 init_std: float = 0.1, seed: int = 0):
        super().__init__()
        self.n_users, self.n_items, self.dim, self.n_layers = n_users, n_items, dim, n_layers
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            self.user_emb.weight.normal_(0.0, init_std, generator=g)
            self.item_emb.weight.normal_(0.0, init_std, generator=g)
        self._cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def forward(self, a_ui: torch.Tensor, a_iu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, i = self.user_emb.weight, self.item_emb.weight
        su, si = u, i
        for _ in range(self.n_layers):
            u, i = spmm(a_ui, i), spmm(a_iu, u)
            su, si = su + u, si + i
        if torch.is_grad_enabled():
            self._cache = None  # parameters are about to change
        return su / (self.n_layers + 1), si / (self.n_layers + 1)

    @torch.no_grad()
    def refresh(self, a_ui: torch.Tensor, a_iu: torch.Tensor) -> None:
        """Compute and cache the final embeddings for ``recommend``."""
        self._cache = self.forward(a_ui, a_iu)

    @torch.no_grad()
    def recommend(self, users: torch.Tensor) -> torch.Tensor:
        """Scores [len(users), n_items] from the embeddings cached by ``refresh``."""
        if self._cache is None:
            raise RuntimeError("call refresh(A_ui, A_iu) before recommend()")
        u, i = self._cache
        return u[users.to(u.device)] @ i.T


class BPRLoss(nn.Module):
    """Mean BPR loss plus ``reg/2 * (|u0|^2 + |p0|^2 + |n0|^2) / batch`` on ego embeddings."""

    def __init__(self, reg: float = 1e-4):
        super().__init__()
        self.reg = reg

    def forward(self, u, p, n, u0, p0, n0) -> torch.Tensor:
        x = (u * p).sum(1) - (u * n).sum(1)
        loss = -nn.functional.logsigmoid(x).mean()
        if self.reg:
            loss = loss + self.reg * 0.5 * (u0.pow(2).sum() + p0.pow(2).sum() + n0.pow(2).sum()) / len(u)
        return loss


def sample_negatives(users: torch.Tensor, pos_keys: torch.Tensor, n_items: int, g: torch.Generator,
                     max_rounds: int = 50) -> torch.Tensor:
    """Uniform items not among the user's positives (rejection; ``pos_keys`` = sorted
    ``user * n_items + item``). After ``max_rounds`` leftovers keep their last draw."""
    neg = torch.randint(n_items, (len(users),), generator=g)
    todo = torch.arange(len(users))
    for _ in range(max_rounds):
        keys = users[todo] * n_items + neg[todo]
        pos = torch.searchsorted(pos_keys, keys).clamp(max=len(pos_keys) - 1)
        bad = pos_keys[pos] == keys
        todo = todo[bad]
        if len(todo) == 0:
            break
        neg[todo] = torch.randint(n_items, (len(todo),), generator=g)
    return neg


@dataclass
class TrainResult:
    model: LightGCN
    graph: BehaviorGraph
    best_epoch: int
    best_metric: float
    history: list = field(default_factory=list)
    seconds: float = 0.0

    def scorer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.model.recommend


def merged_pairs(ds, behaviors: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Union of the training pairs of ``behaviors`` (default: all), de-duplicated, sorted."""
    ks = range(ds.n_behaviors) if behaviors is None else behaviors
    us, its = zip(*(ds.pairs(k) for k in ks))
    key = np.unique(np.concatenate(us).astype(np.int64) * ds.n_items + np.concatenate(its).astype(np.int64))
    return key // ds.n_items, key % ds.n_items


def train_lightgcn(graph_pairs: tuple[np.ndarray, np.ndarray], n_users: int, n_items: int,
                   epochs: int = 100, batch_size: int = 2048, lr: float = 1e-3, reg: float = 1e-4,
                   seed: int = 0, dim: int = 64, n_layers: int = 3,
                   eval_fn: Callable[[int, LightGCN], float] | None = None, eval_every: int = 1,
                   patience: int | None = None, device: torch.device | str = "cpu",
                   progress: bool = False) -> TrainResult:
    """Train LightGCN with BPR on the graph of ``graph_pairs`` (de-duplicated).

    Each epoch is one pass over all positive pairs in an order drawn from
    ``epoch_generator(seed, epoch)``, which also draws the negatives: training is a pure
    function of the arguments (on CPU). Every ``eval_every`` epochs (and after the last),
    ``eval_fn(epoch, model)`` (model in eval mode, ``refresh`` done) returns a metric where
    higher is better; the best state is kept and restored at the end, and training stops
    after ``patience`` evaluations without strict improvement. Without ``eval_fn`` the final
    state is returned (best_epoch = last epoch, best_metric = nan).
    """
    from tqdm import tqdm

    t0 = time.time()
    graph = BehaviorGraph.from_pairs(graph_pairs[0], graph_pairs[1], n_users, n_items)
    a_ui, a_iu = graph.adjacency("sym", torch.float32, device)
    pu, pi = graph.rows(), graph.indices.clone()
    if len(pu) == 0:
        raise ValueError("empty training graph")
    pos_keys = pu * n_items + pi  # sorted: CSR rows ascending, items sorted within a row
    model = LightGCN(n_users, n_items, dim, n_layers, seed=seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bpr = BPRLoss(reg)
    best_state, best_metric, best_epoch, bad = None, float("-inf"), -1, 0
    history = []
    n = len(pu)
    for epoch in range(epochs):
        model.train()
        g = epoch_generator(seed, epoch)
        perm = torch.randperm(n, generator=g)
        u_all, p_all = pu[perm], pi[perm]
        n_all = sample_negatives(u_all, pos_keys, n_items, g)
        total = 0.0
        batches = range(0, n, batch_size)
        for s in tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False):
            ub = u_all[s:s + batch_size].to(device)
            pb = p_all[s:s + batch_size].to(device)
            nb = n_all[s:s + batch_size].to(device)
            eu, ei = model(a_ui, a_iu)
            loss = bpr(eu[ub], ei[pb], ei[nb], model.user_emb.weight[ub], model.item_emb.weight[pb],
                       model.item_emb.weight[nb])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ub)
        rec = {"epoch": epoch, "loss": total / n}
        last = epoch == epochs - 1
        if eval_fn is not None and ((epoch + 1) % eval_every == 0 or last):
            model.eval()
            model.refresh(a_ui, a_iu)
            metric = float(eval_fn(epoch, model))
            rec["metric"] = metric
            if metric > best_metric:
                best_metric, best_epoch, bad = metric, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            log.info("lightgcn epoch %d loss %.5f metric %.5f (best %.5f @ %d)", epoch, rec["loss"], metric,
                     best_metric, best_epoch)
            history.append(rec)
            if patience is not None and bad >= patience:
                log.info("early stop at epoch %d", epoch)
                break
        else:
            log.info("lightgcn epoch %d loss %.5f", epoch, rec["loss"])
            history.append(rec)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch, best_metric = len(history) - 1, float("nan")
    model.eval()
    model.refresh(a_ui, a_iu)
    return TrainResult(model, graph, best_epoch, best_metric, history, time.time() - t0)


# --------------------------------------------------------------------------- runner

def run_baselines(ds, which: Sequence[str] = BASELINES, ks: Sequence[int] = (10, 50), epochs: int = 200,
                  batch_size: int = 2048, batch_size_all: int | None = None, lr: float = 1e-3,
                  reg: float = 1e-4, dim: int = 64, n_layers: int = 3, seed: int = 0, eval_every: int = 5,
                  patience: int = 5, eval_batch_size: int = 1024, progress: bool = False) -> dict:
    """Evaluate each baseline on validation and test; returns ``{name: {...}}``.

    LightGCN variants select the epoch on validation recall@10 and report test at it.
    """
    from .evaluate import eval_masks, eval_split, evaluate, heldout_sets

    masks, held = eval_masks(ds), heldout_sets(ds)
    splits = {ph: eval_split(ds, ph, masks, held) for ph in ("valid", "test")}

    def run_eval(score_fn, phase, ks_=ks):
        users, h, m = splits[phase]
        return evaluate(score_fn, users, h, m, ks=ks_, batch_size=eval_batch_size, progress=progress)

    out = {}
    for name in which:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        t0 = time.time()
        rec: dict = {}
        if name == "popularity":
            scorer = PopularityScorer(ds)
        elif name == "aux_popularity":
            scorer = AuxPopularityScorer(ds)
        else:
            pairs = ds.pairs(ds.n_behaviors - 1) if name == "lightgcn" else merged_pairs(ds)
            has_valid = len(splits["valid"][0]) > 0
            eval_fn = (lambda ep, model: run_eval(model.recommend, "valid", (10,))["recall@10"]) \
                if has_valid else None
            bs = batch_size_all if (name == "lightgcn_all" and batch_size_all) else batch_size
            res = train_lightgcn(pairs, ds.n_users, ds.n_items, epochs=epochs, batch_size=bs, lr=lr,
                                 reg=reg, seed=seed, dim=dim, n_layers=n_layers, eval_fn=eval_fn,
                                 eval_every=eval_every, patience=patience, progress=progress)
            scorer = res.scorer()
            best = res.best_metric if res.best_metric == res.best_metric else None  # NaN -> null
            rec.update({"best_epoch": res.best_epoch, "best_valid_recall@10": best,
                        "epochs_run": len(res.history), "train_edges": res.graph.nnz, "history": res.history,
                        "train_seconds": round(res.seconds, 2),
                        "config": {"epochs": epochs, "batch_size": bs, "lr": lr, "reg": reg, "dim": dim,
                                   "n_layers": n_layers, "seed": seed, "eval_every": eval_every,
                                   "patience": patience}})
        for phase in ("valid", "test"):
            if len(splits[phase][0]):
                rec[phase] = run_eval(scorer, phase)
                log.info("%s %s: %s", name, phase,
                         " ".join(f"{k}={v:.4f}" for k, v in rec[phase].items() if k != "n_users"))
        rec["seconds"] = round(time.time() - t0, 2)
        out[name] = rec
    return out


def log_baselines_to_mlflow(results: dict, ds, data: str, ks: Sequence[int], tracking_uri: str = "",
                            experiment: str = "mbssl", results_file: str | None = None) -> dict[str, str]:
    """One MLflow run per baseline in ``experiment`` (run name = the baseline's name), with the
    trainer's metric names so they line up with MBSSL runs in the UI: ``valid/recall_10``,
    ``test/recall_10`` ... and ``final/test/recall_10`` ... (the test metrics at the selected
    epoch, as in the trainer's final.json); LightGCN's validation curve as ``valid/recall_10``
    per epoch. Bookkeeping (dataset path, checksum, kind) goes to tags. Returns name -> run id."""
    from .tracking import git_commit, mlflow_name

    mlflow, _ = connect(tracking_uri, experiment)
    ids = {}
    for name, rec in results.items():
        with mlflow.start_run(run_name=name) as run:
            params = {"baseline": name, "ks": ",".join(str(k) for k in ks)}
            params.update({f"baseline.{k}": v for k, v in (rec.get("config") or {}).items()})
            mlflow.log_params({k: str(v) for k, v in params.items()})
            mlflow.set_tags({"kind": "baseline", "dataset": str(data), "dataset_sha256": ds.checksum(),
                             "git_commit": git_commit()})
            step = int(rec["best_epoch"]) if isinstance(rec.get("best_epoch"), int) else 0
            for h in rec.get("history") or []:  # LightGCN's validation curve (the best epoch below)
                if "metric" in h and h["epoch"] != step:
                    mlflow.log_metric("valid/recall_10", float(h["metric"]), step=int(h["epoch"]))
            metrics = {}
            for ph in ("valid", "test"):
                for k, v in (rec.get(ph) or {}).items():
                    if k != "n_users" and isinstance(v, float) and v == v:
                        metrics[mlflow_name(f"final/{ph}/{k}")] = v
                        metrics[mlflow_name(f"{ph}/{k}")] = v
            for k in ("best_epoch", "seconds", "train_seconds"):
                if isinstance(rec.get(k), (int, float)):
                    metrics[f"final/{k}"] = float(rec[k])
            mlflow.log_metrics(metrics, step=step)
            if results_file:
                mlflow.log_artifact(results_file)
            ids[name] = run.info.run_id
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    from .data.dataset import load_prepared
    from .utils.io import atomic_write_json

    p = argparse.ArgumentParser(prog="python -m mbssl_dist.baselines", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="results JSON (written atomically)")
    p.add_argument("--which", default=",".join(BASELINES), help=f"comma list from {','.join(BASELINES)}")
    p.add_argument("--ks", default="10,50")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--batch-size-all", type=int, default=None, help="batch size for lightgcn_all")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reg", type=float, default=1e-4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="log each baseline as an MLflow run (default: on; --no-mlflow to skip)")
    p.add_argument("--tracking-uri", default="",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db here)")
    p.add_argument("--experiment", default="mbssl",
                   help="MLflow experiment: use the MBSSL config's run.experiment to compare in one view")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_prepared(a.data)
    which = [w.strip() for w in a.which.split(",") if w.strip()]
    ks = [int(k) for k in a.ks.split(",")]
    t0 = time.time()
    results = run_baselines(ds, which, ks=ks, epochs=a.epochs, batch_size=a.batch_size,
                            batch_size_all=a.batch_size_all, lr=a.lr, reg=a.reg, dim=a.dim,
                            n_layers=a.layers, seed=a.seed, eval_every=a.eval_every, patience=a.patience,
                            progress=a.progress)
    doc = {
        "data": os.fspath(a.data), "content_sha256": ds.checksum(), "n_users": ds.n_users,
        "n_items": ds.n_items, "behaviors": list(ds.behaviors),
        "protocol": "full ranking over all items; mask = training target items (+ validation items at "
                    "test); ties broken by ascending item id; LightGCN epoch selected on valid recall@10",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "results": results, "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(a.out, doc)
    log.info("wrote %s", a.out)
    if a.mlflow:
        ids = log_baselines_to_mlflow(results, ds, os.fspath(a.data), ks, a.tracking_uri, a.experiment,
                                      results_file=os.fspath(a.out))
        log.info("MLflow runs in experiment %r: %s", a.experiment, ids)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
