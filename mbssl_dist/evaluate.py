"""Full-ranking evaluation: Recall@K and NDCG@K over all items (DESIGN.md §5).

Protocol
--------
For every evaluated user, *all* items are scored by ``score_fn``; the items in the user's
``mask`` row are removed from the candidates (the user's training target-behavior items;
auxiliary-behavior items stay candidates), and the user's held-out items are ranked
against the remaining candidates.

* **Tie rule (deterministic).** Candidates are ordered by descending score, ties broken by
  ascending item id (a stable sort of ``-score``). The 0-based rank of a held-out item ``t``
  with score ``s_t`` is therefore::

      rank(t) = #{candidates j : s_j > s_t} + #{candidates j : s_j == s_t and j < t}

  Other held-out items of the same user are candidates too, so ``rank(t) < K`` exactly
  when ``t`` is in the user's top-K list.
* **Recall@K** = (#held-out items with rank < K) / #held-out items. With one held-out item
  per user (leave-one-out, our case) this equals HR@K.
* **NDCG@K** = DCG / IDCG with DCG = sum over held-out items with rank < K of
  ``1 / log2(rank + 2)`` and IDCG = sum_{j < min(#held-out, K)} ``1 / log2(j + 2)``.
* Held-out items always stay candidates, even if they also appear in ``mask`` (such an
  overlap would be a data bug; it is logged once per call).
* Users without held-out items are skipped and not counted in ``n_users``.
* ``score_fn`` must not return NaN (``ValueError``). ``-inf`` scores are allowed; masked
  items are excluded by an explicit candidate mask, not by score value.

Masks per phase (``eval_split``)
--------------------------------
* ``valid``: held-out = the validation item carved from the training purchases; mask = the
  training target-behavior items. The test item is *not* masked: at validation time it is
  unknown, so it is an ordinary candidate (masking it would leak the test set).
* ``test``: held-out = the test item; mask = the training target-behavior items **plus the
  validation items**. The validation item is a real purchase of the user that we only moved
  out of training; in the reference protocol (no validation carve-out) it would be a
  training purchase and masked, so masking it mirrors the reference.

Distributed use: each rank evaluates its own ``users``; the per-rank sums and user count
are stacked into one float64 tensor and summed with ONE ``comm.all_reduce_sum_`` call, then
divided. ``evaluate_sums`` exposes the raw (un-reduced) sums.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch

from .parallel.comm import Comm, LocalComm

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 50)
EVAL_BLOCK_ELEMS = 2 ** 23
"""Most score entries held at once by the evaluation (users scored per call x items, and each
comparison block of the ranking): 2**23 float32 = 32 MiB."""
RANK_CHUNK_ELEMS = 2 ** 18
"""Scores compared per pass of the ranking (at most; within EVAL_BLOCK_ELEMS): 1 MiB of float32
stays in cache between its two counts (``>`` and ``>=``); 2**16..2**18 measured ~1.3x faster
than 2**23 per score on one core (39,493 items)."""
PHASES = ("valid", "test")

HeldOut = Union[sp.spmatrix, "tuple[np.ndarray, np.ndarray]"]



class NonFiniteScoresError(ValueError):
    """The model scored NaN: its parameters diverged (a step with a finite loss can still
    leave them non-finite)."""

def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names of the entries of ``evaluate_sums``'s tensor, in order (last: ``n_users``)."""
    names = []
    for k in ks:
        names += [f"recall@{k}", f"ndcg@{k}"]
    return names + ["n_users"]


def pairs_to_csr(users, items, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR (duplicates merged, sorted indices) from (user, item) pairs."""
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    m = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def _as_csr(x, shape_hint: tuple[int, int] | None) -> sp.csr_matrix:
    if sp.issparse(x):
        m = sp.csr_matrix(x)
        m.sort_indices()
        return m
    users, items = x
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    if shape_hint is None:
        shape_hint = (int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1)
    return pairs_to_csr(users, items, shape_hint)


def _idcg_table(kmax: int) -> torch.Tensor:
    """idcg[n] = sum_{j<n} 1/log2(j+2), n = 0..kmax (float64)."""
    disc = 1.0 / torch.log2(torch.arange(2, kmax + 2, dtype=torch.float64))
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(disc, 0)])


def _rows(m: sp.csr_matrix, ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(local row index in ub, column) of the entries of rows ``ub`` of ``m``."""
    sub = m[ub]
    counts = np.diff(sub.indptr)
    return np.repeat(np.arange(len(ub), dtype=np.int64), counts), sub.indices.astype(np.int64)


def _blocked_ranks(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, st: torch.Tensor,
                   block_elems: int) -> torch.Tensor:
    """Per held-out entry ``e``: #{j : s[rows_e, j] > st_e} + #{j < cols_e : s[rows_e, j] == st_e}
    over ALL items (the tie rule of the module doc, no candidate mask), comparing at most
    ``block_elems`` scores at once: blocks of R entries x W items with R·W <= block_elems
    (W < n_items when one row is wider than the block).

    Per block two counts, ``>`` and ``>=`` (int32 sums); their difference is the number of ties
    in the block. Ties count fully in a block left of the held-out item, not at all right of
    it; only in the block holding the item, and only where it has a tie besides itself (rare
    with real scores), are the ties left of it counted one by one."""
    E, n = len(rows), scores.shape[1]
    dev = scores.device
    ranks = torch.zeros(E, dtype=torch.long, device=dev)
    if E == 0:
        return ranks
    W = max(1, min(n, block_elems))
    R = max(1, block_elems // W)
    for e0 in range(0, E, R):
        r, t, s_t = rows[e0:e0 + R], cols[e0:e0 + R], st[e0:e0 + R, None]
        r0 = int(r[0])
        contiguous = int(r[-1]) - r0 == len(r) - 1 and bool((r[1:] > r[:-1]).all()) if len(r) > 1 else True
        acc = torch.zeros(len(r), dtype=torch.long, device=dev)
        for c0 in range(0, n, W):
            if contiguous:  # one held-out item per user (leave-one-out): a view, no copy
                blk = scores[r0:r0 + len(r), c0:c0 + W]
            else:
                blk = scores[:, c0:c0 + W].index_select(0, r)  # [R, W] copy
            c1 = c0 + blk.shape[1]
            gt = (blk > s_t).sum(1, dtype=torch.int32)
            eq = (blk >= s_t).sum(1, dtype=torch.int32) - gt
            acc += gt
            acc += torch.where(t >= c1, eq, torch.zeros_like(eq))  # block left of the item: every tie is before it
            hard = (t >= c0) & (t < c1) & (eq > 1)  # the item's own block, with ties besides itself
            if bool(hard.any()):
                h = hard.nonzero().squeeze(1)
                ids = torch.arange(c0, c1, device=dev)
                acc[h] += ((blk[h] == s_t[h]) & (ids[None, :] < t[h, None])).sum(1)
        ranks[e0:e0 + R] = acc
    return ranks


def evaluate_sums(score_fn: Callable[[torch.Tensor], torch.Tensor], users, heldout: HeldOut,
                  mask: sp.spmatrix | None = None, ks: Sequence[int] = DEFAULT_KS,
                  batch_size: int = 1024, progress: bool = False,
                  extra_mask: sp.spmatrix | None = None, block_elems: int | None = None,
                  timing: dict | None = None) -> torch.Tensor:
    """Un-reduced per-rank sums: float64 tensor ordered as ``metric_names(ks)``.

    Entry ``2j`` is the sum over users of Recall@ks[j], ``2j+1`` the sum of NDCG@ks[j], and
    the last entry the number of evaluated users (users with >= 1 held-out item).
    ``extra_mask`` (same shape as ``mask``) is excluded too (union with ``mask``).

    Memory is bounded by ``block_elems`` (default ``EVAL_BLOCK_ELEMS``) score entries, not by
    users x items: ``score_fn`` is called on at most ``min(batch_size, block_elems // n_items)``
    users (at least one), and the ranking compares at most ``block_elems`` scores at once
    (``_blocked_ranks``; column blocks narrower than one row when n_items > block_elems). The
    masked items are not removed from a dense candidate matrix: a held-out item's rank over
    all items, minus the masked non-held-out items that beat it (a sparse count over the
    mask's entries), is its rank among the candidates. Integer ranks, and the metric sums still
    run over batches of ``batch_size`` users: the result is bit-identical to the dense ranking
    it replaced (``tests/oracles.evaluate_sums_unblocked``) for every block size. ``timing``, if given, accumulates the seconds
    spent in ``score_fn`` (``score_s``) and in the ranking (``rank_s``).
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    block = EVAL_BLOCK_ELEMS if block_elems is None else int(block_elems)
    if block < 1:
        raise ValueError(f"block_elems must be >= 1, got {block}")
    users = torch.as_tensor(users).cpu().numpy().astype(np.int64).reshape(-1)
    mask_csr = None if mask is None else _as_csr(mask, None)
    if extra_mask is not None:
        extra = _as_csr(extra_mask, None)
        mask_csr = extra if mask_csr is None else _as_csr(mask_csr + extra, None)
    hint = None
    if mask_csr is not None and not sp.issparse(heldout):
        hint = (max(mask_csr.shape[0], int(np.max(heldout[0], initial=-1)) + 1), mask_csr.shape[1])
    held = _as_csr(heldout, hint)

    out = torch.zeros(2 * len(ks) + 1, dtype=torch.float64)
    # Users with at least one held-out item (users beyond the held-out matrix have none).
    inside = users < held.shape[0]
    users = users[inside]
    users = users[np.diff(held.indptr)[users] > 0]
    if len(users) == 0:
        return out
    if mask_csr is not None and users.max() >= mask_csr.shape[0]:
        raise ValueError(f"user id {int(users.max())} outside the mask ({mask_csr.shape[0]} rows)")

    kmax = max(ks)
    idcg = _idcg_table(kmax)
    n_overlap = 0
    t_score = t_rank = 0.0
    # items per row: the mask's width, else the held-out's (a lower bound, raised by the first call)
    width = mask_csr.shape[1] if mask_csr is not None else held.shape[1]
    from tqdm import tqdm

    bar = tqdm(total=len(users), desc="eval", unit="user", disable=not progress, leave=False)
    # Metric sums run over batches of batch_size users (so they do not depend on the block size);
    # score_fn is called on sub-batches of at most block_elems // n_items users.
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        parts_hr, parts_rank = [], []
        sub0 = 0
        while sub0 < len(batch):
            ub = batch[sub0:sub0 + max(1, block // max(width, 1))]
            t0 = time.perf_counter()
            with torch.no_grad():
                scores = score_fn(torch.from_numpy(ub)).detach()
            t1 = time.perf_counter()
            t_score += t1 - t0
            if scores.dim() != 2 or scores.shape[0] != len(ub):
                raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected ({len(ub)}, n_items)")
            n_items = scores.shape[1]
            width = max(width, n_items)
            if held.shape[1] > n_items or (mask_csr is not None and mask_csr.shape[1] != n_items):
                raise ValueError(f"score_fn gives {n_items} items; held-out has {held.shape[1]} columns, "
                                 f"mask {None if mask_csr is None else mask_csr.shape[1]}")
            if scores.numel() and bool(torch.isnan(scores.amax())):  # max propagates NaN: no bool matrix
                raise NonFiniteScoresError("score_fn returned NaN scores")
            dev = scores.device
            B = len(ub)
            hsub = held[ub]  # structure only (like the mask), as wide as the scores
            hsub = sp.csr_matrix((np.ones(hsub.nnz, dtype=np.float32), hsub.indices, hsub.indptr), shape=(B, n_items))
            hr = np.repeat(np.arange(B, dtype=np.int64), np.diff(hsub.indptr))
            hc = hsub.indices.astype(np.int64)
            hr_t = torch.from_numpy(hr).to(dev)
            hc_t = torch.from_numpy(hc).to(dev)
            st = scores[hr_t, hc_t]
            ranks = _blocked_ranks(scores, hr_t, hc_t, st, min(block, RANK_CHUNK_ELEMS))
            if mask_csr is not None:
                msub = mask_csr[ub]
                msub.data = np.ones_like(msub.data)
                both = msub.multiply(hsub).tocsr()  # held-out items that are also masked stay candidates
                n_overlap += int(both.nnz)
                excl = (msub - both).tocsr()
                excl.eliminate_zeros()
                excl.sort_indices()
                # every (held-out entry e, excluded item j of e's user): subtract j if it beats e
                per = np.diff(excl.indptr)[hr]
                n_pairs = int(per.sum())
                if n_pairs:
                    e_idx = np.repeat(np.arange(len(hr), dtype=np.int64), per)
                    offs = np.arange(n_pairs, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per) \
                        + np.repeat(excl.indptr[hr].astype(np.int64), per)
                    j_all = excl.indices[offs].astype(np.int64)
                    for p0 in range(0, n_pairs, block):
                        e = torch.from_numpy(e_idx[p0:p0 + block]).to(dev)
                        j = torch.from_numpy(j_all[p0:p0 + block]).to(dev)
                        sj, se = scores[hr_t[e], j], st[e]
                        beats = (sj > se) | ((sj == se) & (j < hc_t[e]))
                        ranks.index_add_(0, e, -beats.long())
            ranks = ranks.cpu()
            parts_hr.append(torch.from_numpy(hr) + sub0)
            parts_rank.append(ranks)
            sub0 += len(ub)
            bar.update(len(ub))
            t_rank += time.perf_counter() - t1
        t1 = time.perf_counter()
        B = len(batch)
        hr_c = torch.cat(parts_hr)
        ranks = torch.cat(parts_rank)
        n_held = torch.bincount(hr_c, minlength=B).to(torch.float64)
        disc = 1.0 / torch.log2(ranks.to(torch.float64) + 2.0)
        for j, k in enumerate(ks):
            hit = (ranks < k).to(torch.float64)
            hits_u = torch.zeros(B, dtype=torch.float64).index_add_(0, hr_c, hit)
            dcg_u = torch.zeros(B, dtype=torch.float64).index_add_(0, hr_c, hit * disc)
            ideal = idcg[torch.clamp(n_held, max=k).long()]
            out[2 * j] += (hits_u / n_held).sum()
            out[2 * j + 1] += (dcg_u / ideal).sum()
        out[-1] += B
        t_rank += time.perf_counter() - t1
    bar.close()
    if n_overlap:
        log.warning("%d held-out (user, item) pairs were also in the mask; they were kept as candidates",
                    n_overlap)
    if timing is not None:
        timing["score_s"] = timing.get("score_s", 0.0) + t_score
        timing["rank_s"] = timing.get("rank_s", 0.0) + t_rank
    log.debug("evaluated %d users: %.2fs scoring, %.2fs ranking", len(users), t_score, t_rank)
    return out


def sums_to_metrics(sums: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Divide the (reduced) sums by the user count; ``n_users`` is reported as a number."""
    sums = sums.detach().cpu().to(torch.float64)
    n = float(sums[-1])
    res = {}
    for j, name in enumerate(metric_names(ks)[:-1]):
        res[name] = float(sums[j]) / n if n > 0 else float("nan")
    res["n_users"] = int(round(n))
    return res


def evaluate(score_fn: Callable[[torch.Tensor], torch.Tensor], users, heldout: HeldOut,
             mask: sp.spmatrix | None = None, ks: Sequence[int] = DEFAULT_KS, batch_size: int = 1024,
             comm: Comm | None = None, progress: bool = False,
             reduce_device: torch.device | str | None = None,
             extra_mask: sp.spmatrix | None = None) -> dict[str, float]:
    """Recall@K / NDCG@K (mean over all ranks' users) plus ``n_users``.

    ``score_fn(users: LongTensor[B]) -> [B, n_items]`` scores (called under ``no_grad``).
    ``users``: the users evaluated on this rank. ``heldout``: user x item CSR, or a
    ``(users, items)`` pair of arrays. ``mask``: user x item CSR of excluded items (or None);
    ``extra_mask``: more excluded items (union with ``mask``).
    The sums travel through ONE ``comm.all_reduce_sum_`` on a stacked float64 tensor placed
    on ``reduce_device`` (default: ``comm.device`` if the comm has one, else CPU; nccl
    needs a CUDA device).
    """
    comm = comm if comm is not None else LocalComm()
    sums = evaluate_sums(score_fn, users, heldout, mask, ks=ks, batch_size=batch_size, progress=progress,
                         extra_mask=extra_mask)
    dev = reduce_device if reduce_device is not None else getattr(comm, "device", None)
    if dev is not None:
        sums = sums.to(dev)
    comm.all_reduce_sum_(sums)
    return sums_to_metrics(sums, ks)


# --------------------------------------------------------------------------- dataset helpers

def eval_masks(ds) -> dict[str, sp.csr_matrix]:
    """Per-phase user x item CSR of excluded items (see the module doc).

    ``valid``: training target-behavior items. ``test``: those plus the validation items.
    """
    shape = (ds.n_users, ds.n_items)
    tu, ti = ds.pairs(ds.n_behaviors - 1)
    train = pairs_to_csr(tu, ti, shape)
    test = pairs_to_csr(np.concatenate([tu, ds.valid_user]).astype(np.int64),
                        np.concatenate([ti, ds.valid_item]).astype(np.int64), shape)
    return {"valid": train, "test": test}


def heldout_sets(ds) -> dict[str, sp.csr_matrix]:
    """Per-phase user x item CSR of held-out items (validation / test)."""
    shape = (ds.n_users, ds.n_items)
    return {"valid": pairs_to_csr(ds.valid_user, ds.valid_item, shape),
            "test": pairs_to_csr(ds.test_user, ds.test_item, shape)}


def eval_split(ds, phase: str, masks: dict | None = None, held: dict | None = None
               ) -> tuple[np.ndarray, sp.csr_matrix, sp.csr_matrix]:
    """``(users, heldout_csr, mask_csr)`` for ``phase`` in ``("valid", "test")``.

    ``users`` are all users with a held-out item in that phase (sorted); a distributed
    caller keeps only its own. Pass precomputed ``masks``/``held`` to avoid rebuilding.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    masks = masks if masks is not None else eval_masks(ds)
    held = held if held is not None else heldout_sets(ds)
    h = held[phase]
    users = np.flatnonzero(np.diff(h.indptr) > 0).astype(np.int64)
    return users, h, masks[phase]


def format_metrics(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    """``python -m mbssl_dist.evaluate --run runs/NAME [--split valid|test|both]`` (``mbssl-evaluate``).

    Re-evaluates the run's saved model (``runs/NAME/model/``, the best-validation epoch) with
    the trainer's evaluator (train.Evaluator: same masks, tie rule, batching, partitioning and
    threads), prints a JSON object with the metrics and whether they equal ``final.json``'s
    (test at the best validation epoch) and ``model.json``'s. Bit-identical when run with the
    training's number of processes (``final.json`` ``world_size``; under torchrun for P > 1).
    ``--check`` exits 1 when they differ: exactly at the training's world size, by more than
    ``--rtol`` (default 1e-4) relative at another one, where the sums run in another order.
    The output gives the largest relative difference. Bad input: one line on stderr, exit 2.
    """
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m mbssl_dist.evaluate", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run directory (runs/NAME) with a saved model/ (under torchrun write --run-dir: torchrun's "
                        "own parser takes --run for an abbreviation of its --run-path)")
    p.add_argument("--split", choices=["valid", "test", "both"], default="both")
    p.add_argument("--data", help="prepared dataset directory, if it moved since training (checksum-checked)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's train.threads)")
    p.add_argument("--check", action="store_true", help="exit 1 unless the metrics equal final.json's")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance of --check (default: 0 at the training's world size, 1e-4 at another)")
    args = p.parse_args(argv)

    from .export import ModelError, Scoring, open_dataset, read_model_dir, run_model_dir
    from .parallel.dist import OpenComm, run_ranked
    from .train import Evaluator

    def run(open_comm: OpenComm) -> int:
        art = read_model_dir(run_model_dir(args.run))
        cfg = art.cfg
        threads = args.threads if args.threads is not None else cfg.train.threads
        if threads:
            torch.set_num_threads(threads)
        ds = open_dataset(art, args.data)
        comm, device = open_comm(cfg.dist.collectives)
        other_world = comm.world_size != art.meta.get("trained_world_size", comm.world_size)
        rtol = args.rtol if args.rtol is not None else (1e-4 if other_world else 0.0)
        if other_world:
            log.warning("trained with %s processes, evaluating with %d: the propagation sums in another order, "
                        "so metrics may differ in the last digits", art.meta.get("trained_world_size"), comm.world_size)
        sc = Scoring(art, ds, comm, device, propagate=False)
        phases = ("valid", "test") if args.split == "both" else (args.split,)
        ev = Evaluator(ds, sc.part, list(cfg.train.ks), cfg.train.eval_batch_size)
        res = ev(sc.model, sc.adjs, comm, phases=phases, user_items=sc.user_items)
        if not comm.is_main:
            return 0
        final_path = Path(args.run) / "final.json"
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        out = {"run": str(args.run), "best_epoch": art.meta["best_epoch"], "world_size": comm.world_size}
        same = True
        worst = 0.0
        for ph in phases:
            got = {k: v for k, v in res[ph].items() if k != "n_users"}
            out[ph] = {**got, "n_users": res[ph]["n_users"]}
            for src, ref in (("final.json", final.get(ph)), ("model.json", art.meta.get(ph))):
                if ref is None:
                    continue
                rel = [abs(v - ref[k]) / max(abs(ref[k]), 1e-12) if isinstance(ref.get(k), (int, float)) else
                       float("inf") for k, v in got.items()]
                worst = max([worst] + rel)
                eq = all(r <= rtol for r in rel) if rtol else got == {k: ref.get(k) for k in got}
                out.setdefault("equal", {})[f"{ph} vs {src}"] = eq
                same &= eq
        out["max_relative_difference"] = worst
        out["rtol"] = rtol
        if final and final.get("best_epoch") != art.meta["best_epoch"]:
            out["note"] = (f"final.json's best_epoch {final.get('best_epoch')} is not the saved model's "
                           f"{art.meta['best_epoch']} (a run still in progress or an older model/)")
            same = False
        print(json.dumps(out, indent=2))
        return 1 if (args.check and not same) else 0

    return run_ranked("evaluate", (ModelError,), run)


if __name__ == "__main__":
    raise SystemExit(main())
