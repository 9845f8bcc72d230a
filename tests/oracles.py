"""Test oracles: slow, literal implementations of the paper's formulas, written independently
of the package's fast code so the tests can compare the two. Tiny inputs only.

* ``naive_nonsampling``: the non-sampling loss of Eq (8)-(9) as a dense O(|B|·|I|) sum,
  against ``NonSamplingLoss`` (which never forms the [B, n_items] score matrix).
* ``swing_bruteforce``: Eq (6) by loops over every pair of sources and every pair of common
  intermediaries, against ``swing_topk`` / ``swing_full`` (pair enumeration + sparse products).
* ``evaluate_sums_unblocked``: the full-ranking evaluator before its ranking was blocked
  (dense candidate mask and comparison matrices), against ``evaluate_sums``.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from mbssl_dist.evaluate import HeldOut, _as_csr, _idcg_table, _rows


def naive_nonsampling(users: torch.Tensor, items: torch.Tensor, relations: torch.Tensor,
                      pos: Sequence[tuple[torch.Tensor, torch.Tensor]], weights, c_neg,
                      extra_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k λ_k Σ_u Σ_i c_ui (y_ui − ŷ_ui)² over the dense [B, n_items] score matrix of each
    behavior (c_ui = 1 on positives, c_neg[k] elsewhere). ``extra_scores``: [B, n_items]
    added to the target behavior's ŷ (the interaction term)."""
    K = users.shape[1]
    if isinstance(c_neg, (int, float)):
        c_neg = [float(c_neg)] * K
    total = users.new_zeros(())
    for k in range(K):
        yhat = users[:, k] @ (items[:, k] * relations[k]).T
        if k == K - 1 and extra_scores is not None:
            yhat = yhat + extra_scores
        y = torch.zeros_like(yhat)
        y[pos[k][0], pos[k][1]] = 1.0
        c = torch.where(y > 0, torch.ones_like(y), torch.full_like(y, c_neg[k]))
        total = total + weights[k] * (c * (y - yhat).square()).sum()
    return total


def swing_bruteforce(X: sp.spmatrix | np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Dense ``n_src x n_src`` swing by literal loops over Eq 6: for sources i != j,
    sim(i, j) = Σ over unordered pairs {u, v} of common intermediaries of 1 / (alpha + |I_u ∩ I_v|)."""
    Xd = np.asarray(X.todense() if sp.issparse(X) else X) != 0
    n_src, n_mid = Xd.shape
    U = [set(np.flatnonzero(Xd[s]).tolist()) for s in range(n_src)]
    I = [set(np.flatnonzero(Xd[:, m]).tolist()) for m in range(n_mid)]
    S = np.zeros((n_src, n_src), dtype=np.float64)
    for i in range(n_src):
        for j in range(n_src):
            if i == j:
                continue
            common = sorted(U[i] & U[j])
            total = 0.0
            for u, v in combinations(common, 2):
                total += 1.0 / (alpha + len(I[u] & I[v]))
            S[i, j] = total
    return S


def evaluate_sums_unblocked(score_fn: Callable[[torch.Tensor], torch.Tensor], users, heldout: HeldOut,
                            mask: sp.spmatrix | None = None, ks: Sequence[int] = (10, 50),
                            batch_size: int = 1024, extra_mask: sp.spmatrix | None = None) -> torch.Tensor:
    """``mbssl_dist.evaluate.evaluate_sums`` as it was before the blocked ranking (verbatim
    but for the progress bar and the overlap warning): a dense [B, n_items] candidate mask and
    a [batch, n_items] comparison per chunk. The oracle of the blocked ranking.

    Un-reduced per-rank sums: float64 tensor ordered as ``metric_names(ks)``.

    Entry ``2j`` is the sum over users of Recall@ks[j], ``2j+1`` the sum of NDCG@ks[j], and
    the last entry the number of evaluated users (users with >= 1 held-out item).
    ``extra_mask`` (same shape as ``mask``) is excluded too (union with ``mask``).
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
    for start in range(0, len(users), batch_size):
        ub = users[start:start + batch_size]
        with torch.no_grad():
            scores = score_fn(torch.from_numpy(ub)).detach()
        if scores.dim() != 2 or scores.shape[0] != len(ub):
            raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected ({len(ub)}, n_items)")
        n_items = scores.shape[1]
        if held.shape[1] > n_items or (mask_csr is not None and mask_csr.shape[1] != n_items):
            raise ValueError(f"score_fn gives {n_items} items; held-out has {held.shape[1]} columns, "
                             f"mask {None if mask_csr is None else mask_csr.shape[1]}")
        if torch.isnan(scores).any():
            raise ValueError("score_fn returned NaN scores")
        dev = scores.device
        B = len(ub)
        hr, hc = _rows(held, ub)
        hr_t = torch.from_numpy(hr).to(dev)
        hc_t = torch.from_numpy(hc).to(dev)
        cand = torch.ones(B, n_items, dtype=torch.bool, device=dev)
        if mask_csr is not None:
            mr, mc = _rows(mask_csr, ub)
            cand[torch.from_numpy(mr).to(dev), torch.from_numpy(mc).to(dev)] = False
            n_overlap += int((~cand[hr_t, hc_t]).sum())
        cand[hr_t, hc_t] = True
        item_ids = torch.arange(n_items, device=dev)

        ranks = torch.empty(len(hr), dtype=torch.long, device=dev)
        for e0 in range(0, len(hr), batch_size):  # chunk entries: at most batch_size rows at once
            r = hr_t[e0:e0 + batch_size]
            c = hc_t[e0:e0 + batch_size]
            s = scores[r]
            st = s.gather(1, c[:, None])
            better = (s > st) | ((s == st) & (item_ids[None, :] < c[:, None]))
            better &= cand[r]
            ranks[e0:e0 + batch_size] = better.sum(1)

        ranks = ranks.cpu()
        hr_c = torch.from_numpy(hr)
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
    return out
