"""Synthetic multi-behavior data with planted structure (the embedded default dataset).

Users and items belong to latent clusters. Each user buys items mostly from its own
cluster (``noise`` is the share bought uniformly at random); auxiliary behaviors are noisy
supersets of the target: each contains the user's purchases with probability
``aux_keep`` per purchase plus extra in-cluster and random items, more for weaker
behaviors. A test item per user is drawn from the same process and never in train.
Everything is deterministic per ``seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class SyntheticSpec:
    n_users: int = 600
    n_items: int = 400
    n_clusters: int = 8
    behaviors: list[str] = field(default_factory=lambda: ["view", "cart", "buy"])
    target_per_user: float = 8.0   # mean purchases per user (train + held-out test)
    aux_extra: list[float] = field(default_factory=lambda: [3.0, 1.0])  # extra items per purchase, per aux behavior
    aux_keep: float = 0.8           # chance a purchase also appears in an aux behavior
    noise: float = 0.1              # share of out-of-cluster (uniform) picks
    popularity_skew: float = 1.0    # Zipf-like exponent of item popularity within a cluster
    seed: int = 0

    def validate(self) -> None:
        if len(self.behaviors) < 2:
            raise ValueError("synthetic: need at least one auxiliary behavior and the target")
        if len(self.aux_extra) != len(self.behaviors) - 1:
            raise ValueError(f"synthetic: aux_extra needs {len(self.behaviors) - 1} values (one per auxiliary "
                             f"behavior), got {len(self.aux_extra)}")
        if self.n_users < 2 or self.n_items < self.n_clusters or self.n_clusters < 1:
            raise ValueError("synthetic: need n_users >= 2 and n_items >= n_clusters >= 1")
        if not (0 <= self.noise <= 1 and 0 <= self.aux_keep <= 1):
            raise ValueError("synthetic: noise and aux_keep must be in [0, 1]")
        if self.target_per_user < 2:
            raise ValueError("synthetic: target_per_user must be >= 2 (one is held out for test)")

    def to_dict(self) -> dict:
        return asdict(self)


def generate(spec: SyntheticSpec):
    """Return (behavior pairs per behavior [(users, items)], test_users, test_items)."""
    spec.validate()
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x5E7]))
    ucl = rng.integers(0, spec.n_clusters, spec.n_users)
    icl = np.arange(spec.n_items) % spec.n_clusters
    rng.shuffle(icl)
    members = [np.flatnonzero(icl == c) for c in range(spec.n_clusters)]
    weights = []
    for m in members:
        w = 1.0 / np.arange(1, len(m) + 1) ** spec.popularity_skew
        weights.append(w / w.sum())
    glob = 1.0 / np.arange(1, spec.n_items + 1) ** spec.popularity_skew
    glob_items = rng.permutation(spec.n_items)
    glob = glob / glob.sum()

    def draw(u: int, n: int) -> np.ndarray:
        c = ucl[u]
        out = set()
        tries = 0
        while len(out) < n and tries < 50 * n + 100:
            tries += 1
            if rng.random() < spec.noise:
                out.add(int(glob_items[rng.choice(spec.n_items, p=glob)]))
            else:
                out.add(int(members[c][rng.choice(len(members[c]), p=weights[c])]))
        return np.fromiter(out, dtype=np.int64)

    n_aux = len(spec.behaviors) - 1
    pairs = [([], []) for _ in spec.behaviors]
    test_u, test_i = [], []
    for u in range(spec.n_users):
        n_buy = max(2, int(rng.poisson(spec.target_per_user - 2)) + 2)
        bought = draw(u, n_buy)
        rng.shuffle(bought)
        test_u.append(u)
        test_i.append(int(bought[0]))
        train = np.sort(bought[1:])
        pairs[-1][0].extend([u] * len(train))
        pairs[-1][1].extend(train.tolist())
        for k in range(n_aux):
            kept = bought[rng.random(len(bought)) < spec.aux_keep]
            extra = draw(u, int(rng.poisson(spec.aux_extra[k] * n_buy)))
            s = np.union1d(kept, extra)
            pairs[k][0].extend([u] * len(s))
            pairs[k][1].extend(s.tolist())
    out = [(np.asarray(us, dtype=np.int64), np.asarray(its, dtype=np.int64)) for us, its in pairs]
    return out, np.asarray(test_u, dtype=np.int64), np.asarray(test_i, dtype=np.int64)
