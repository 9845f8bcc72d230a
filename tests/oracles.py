"""Test oracles: slow, literal implementations of the paper's formulas, written independently
of the package's fast code so the tests can compare the two. Tiny inputs only.

* ``naive_nonsampling``: the non-sampling loss of Eq (8)-(9) as a dense O(|B|·|I|) sum,
  against ``NonSamplingLoss`` (which never forms the [B, n_items] score matrix).
* ``swing_bruteforce``: Eq (6) by loops over every pair of sources and every pair of common
  intermediaries, against ``swing_topk`` / ``swing_full`` (pair enumeration + sparse products).
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch


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
