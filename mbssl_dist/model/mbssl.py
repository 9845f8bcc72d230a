"""The MBSSL encoder (behavior-aware GNN + cross-behavior attention), its score and interaction
term, distributed-ready.

Behavior of the authors' code (``Scofield666/MBSSL``, ``MBSSL.py``, class ``GHCF.forward``) that
this module reproduces, per layer ``l`` and behavior ``k`` (target = last):

* message: ``m_k = Â_k · E_k^l`` over the bipartite graph, then ``h_k = LeakyReLU((m_k ⊙ r_k^l) W^l)``
  (slope 0.01) with ``W^l`` shared by all behaviors;
* CDM (GATNE-style self attention, one head): ``a_i = softmax_j(w2_iᵀ tanh(W1_iᵀ h_j))``,
  ``e_i = Σ_j a_ij h_j``;
* message dropout (inverted, p = 0.3) on the CDM output: the dropped embedding is both the next
  layer's input and what the readout accumulates;
* relation vectors ``r_k^{l+1} = r_k^l W_b^l``;
* readout = mean over layers 0..L (layer 0 = the raw embedding), relation readout = mean of r^0..r^L;
* score(u, i) = ⟨e_u,K , e_i,K ⊙ r_K⟩.

The propagation itself (forward and reverse) is :mod:`.propagation`; the module holds the
parameters: the embedding rows of its *local* users and all item rows (replicated).
Randomness comes from ``torch.Generator`` objects the caller passes; user rows are drawn for the
*global* user set and the local rows selected, so P ranks draw what one process would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..graph.sparse import dense_rows
from ..parallel.comm import Comm, LocalComm
from ..utils.seeding import block_uniform
from .propagation import Adjacency, Propagation, Workspace, relation_chain


@dataclass
class Propagated:
    """Readouts of one propagation: ``users`` [n_local_users, K, d], ``items`` [n_items, K, d],
    ``relations`` [K, d]."""

    users: torch.Tensor
    items: torch.Tensor
    relations: torch.Tensor


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


class MBSSL(nn.Module):
    """MBSSL encoder + scorer.

    Args:
        n_users: number of user rows held by this module (the local users of this rank).
        n_items: number of items (replicated on every rank).
        n_behaviors: K, target behavior last.
        dim: embedding size d. n_layers: L. att_dim: CDM attention size d'.
        dropout: message dropout after CDM (0 disables). use_cdm: cross-behavior attention
            on/off (off: e_k = h_k, ablation "w/o CDM").
        interaction_scoring: add ``Σ_k w_k 1[(u,i) ∈ E_k] + b_i`` to the score (see
            :meth:`interaction_term`); ``interaction_include_target`` lets the target
            behavior's own indicator in (off by default: on training positives it is a
            label leak and on evaluation candidates it is always 0).
        item_bias: a learned per-item bias ``b_i`` in the score without the indicator terms
            (``interaction_scoring`` always includes it): the popularity a model can learn in its
            first steps.
        interaction_per_item: with interaction scoring, the weight of behavior k's indicator
            is ``w_k + v_{k,i}``: a learned per-item conversion (an item that is often bought
            once carted gets a large ``v_{cart,i}``); K x n_items more replicated parameters.
        n_users_global / user_ids: the global user count and the global ids of the local rows
            (default: all users, identity), used so that init and dropout draws do not depend on
            the number of ranks.
        init_generator: generator for the xavier-uniform init (default: seeded with 2020).
        init_scale: multiplier on the xavier bound of the user and item embeddings (1 = the
            authors' init). Xavier over ~10^4 rows gives entries of about 0.01, which makes
            the InfoNCE gradients (∝ 1/||e||) dwarf the target's at the start; measured effect
            in the README ("Large batches").
    """

    def __init__(self, n_users: int, n_items: int, n_behaviors: int, dim: int = 64, n_layers: int = 4,
                 att_dim: int = 16, dropout: float = 0.3, use_cdm: bool = True,
                 interaction_scoring: bool = False, interaction_include_target: bool = False,
                 interaction_per_item: bool = False, item_bias: bool = False, n_users_global: int | None = None, user_ids: torch.Tensor | None = None,
                 init_generator: torch.Generator | None = None, init_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if n_behaviors < 1:
            raise ValueError("n_behaviors must be >= 1")
        self.n_users, self.n_items, self.n_behaviors = int(n_users), int(n_items), int(n_behaviors)
        self.dim, self.n_layers, self.att_dim = int(dim), int(n_layers), int(att_dim)
        self.dropout, self.use_cdm, self.interaction_scoring = float(dropout), bool(use_cdm), bool(interaction_scoring)
        self.interaction_include_target = bool(interaction_include_target)
        self.interaction_per_item = bool(interaction_per_item) and self.interaction_scoring
        self.use_item_bias = bool(item_bias) or self.interaction_scoring
        self.n_users_global = int(n_users_global if n_users_global is not None else n_users)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.init_scale = float(init_scale)
        if user_ids is None:
            if self.n_users_global != self.n_users:
                raise ValueError("user_ids (global ids of the local rows) are required when n_users_global != n_users")
            self.register_buffer("user_ids", None, persistent=False)
        else:
            user_ids = torch.as_tensor(user_ids, dtype=torch.int64)
            if user_ids.numel() != self.n_users:
                raise ValueError(f"user_ids has {user_ids.numel()} entries, expected n_users={self.n_users}")
            self.register_buffer("user_ids", user_ids.clone(), persistent=False)

        K, d, L = self.n_behaviors, self.dim, self.n_layers
        self.user_embedding = nn.Parameter(torch.empty(self.n_users, d, dtype=dtype))
        self.item_embedding = nn.Parameter(torch.empty(self.n_items, d, dtype=dtype))
        self.relation_embedding = nn.Parameter(torch.empty(K, d, dtype=dtype))
        self.W_gc = nn.ParameterList([nn.Parameter(torch.empty(d, d, dtype=dtype)) for _ in range(L)])
        self.W_rel = nn.ParameterList([nn.Parameter(torch.empty(d, d, dtype=dtype)) for _ in range(L)])
        optional = [("att_w1", (K, d, self.att_dim), self.use_cdm), ("att_w2", (K, self.att_dim), self.use_cdm),
                    ("behavior_weight", (K,), self.interaction_scoring),
                    ("item_bias", (self.n_items,), self.use_item_bias),
                    ("behavior_item_weight", (K, self.n_items), self.interaction_per_item)]
        for name, shape, on in optional:  # absent ones stay None (ablations, plain scoring)
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)) if on else None)
        self.reset_parameters(init_generator)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform init as in the reference (``GHCF.reset_parameters``). User rows use the
        global fan (n_users_global) and are drawn for all global users, then the local rows are
        selected, so any number of ranks reproduces the single-process init."""
        g = generator if generator is not None else torch.Generator().manual_seed(2020)
        d = self.dim

        def uni(shape, bound):
            return (torch.rand(shape, generator=g, dtype=torch.float64) * 2.0 - 1.0) * bound

        s = self.init_scale
        full_u = uni((self.n_users_global, d), s * _xavier_bound(self.n_users_global, d))
        if self.user_ids is not None:
            full_u = full_u[self.user_ids]
        self.user_embedding.copy_(full_u)
        self.item_embedding.copy_(uni((self.n_items, d), s * _xavier_bound(self.n_items, d)))
        self.relation_embedding.copy_(uni((self.n_behaviors, d), _xavier_bound(self.n_behaviors, d)))
        for W in list(self.W_gc) + list(self.W_rel):
            W.copy_(uni((d, d), _xavier_bound(d, d)))
        if self.use_cdm:
            K, a = self.n_behaviors, self.att_dim
            # torch's xavier on a 3-D [K, d, a] tensor uses fan_in = d * a, fan_out = K * a.
            self.att_w1.copy_(uni((K, d, a), _xavier_bound(d * a, K * a)))
            self.att_w2.copy_(uni((K, a), _xavier_bound(a * 1, K * 1)))
        if self.interaction_scoring:
            self.behavior_weight.zero_()
        if self.use_item_bias:
            self.item_bias.zero_()
        if self.interaction_per_item:
            self.behavior_item_weight.zero_()

    # ------------------------------------------------------------ parameters
    def sharded_flags(self) -> list[bool]:
        """One flag per ``self.parameters()`` entry: True for tensors whose rows are split over
        ranks (the user embedding), False for replicated ones."""
        return [p is self.user_embedding for p in self.parameters()]

    # ------------------------------------------------------------- pieces
    def relation_layers(self) -> list[torch.Tensor]:
        """[r^0, ..., r^L], each [K, d]."""
        return relation_chain(self.relation_embedding, list(self.W_rel))

    def item_rows(self, comm: Comm) -> tuple[int, int, int]:
        """(first item, number of items, padded slice size S) of this rank's item slice: the
        per-layer dense work on items (⊙r, W, LeakyReLU, CDM, dropout) is split over ranks;
        layer stacks hold ``n_users + S`` rows (local users, then the slice, zero-padded)."""
        sl = comm.slices(self.n_items)
        return sl.start(comm.rank), sl.count(comm.rank), sl.size

    def drop_mask(self, head: tuple[int, ...], generator: torch.Generator | None, comm: Comm,
                  dtype, device, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Inverted-dropout multipliers, shape head + [n_users + S, d] (local users, this rank's
        item slice, zero padding), written into ``out`` when given; None when not training. One
        draw from ``generator`` seeds the call; rows come from per-block generators keyed by
        global ids (:func:`block_uniform`), so every rank draws what one process would."""
        if not self.training or self.dropout <= 0.0:
            return None
        if generator is None:
            raise ValueError("training-mode forward with dropout needs a torch.Generator (rank-consistent randomness)")
        dev, p, ax, n_u = generator.device, self.dropout, len(head), self.n_users
        base = int(torch.randint(0, 1 << 62, (1,), generator=generator, device=dev).item())
        i0, n_s, S = self.item_rows(comm)
        uids = self.user_ids if self.user_ids is not None else torch.arange(n_u)
        out = torch.empty(head + (n_u + S, self.dim), dtype=dtype, device=device) if out is None else out
        out.narrow(ax, 0, n_u).copy_(block_uniform(head, uids, self.n_users_global, self.dim, base, 0, dev) >= p)
        mi = block_uniform(head, torch.arange(i0, i0 + n_s), self.n_items, self.dim, base, 1, dev)
        out.narrow(ax, n_u, n_s).copy_(mi >= p)
        out.narrow(ax, n_u + n_s, S - n_s).zero_()
        return out.mul_(1.0 / (1.0 - p))

    @torch.no_grad()
    def forward(self, adjs: Sequence[Adjacency], comm: Comm | None = None,
                generator: torch.Generator | None = None) -> Propagated:
        """Forward-only propagation over all behaviors (evaluation, recommendation): the same
        :class:`~.propagation.Propagation` the training step runs, with its own scratch space
        (freed on return). adjs: per behavior (A_ui_local, A_iu_local), normalized.
        ``generator``: dropout masks, needed in training mode when dropout > 0."""
        comm = comm or LocalComm()
        if len(adjs) != self.n_behaviors:
            raise ValueError(f"expected {self.n_behaviors} adjacencies, got {len(adjs)}")
        rel = self.relation_layers()
        ego0 = torch.cat([self.user_embedding, self.item_embedding], 0)
        out = Propagation(self, adjs, comm, "eval", ws=Workspace()).forward(rel[:-1], ego0, generator)
        n_u = self.n_users
        return Propagated(out[:, :n_u].permute(1, 0, 2), out[:, n_u:].permute(1, 0, 2), torch.stack(rel, 0).mean(0))

    # ------------------------------------------------------------- scoring
    def interaction_term(self, indicators: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """s = Σ_k ind_k (w_k + v_{k,i}) for pairs with a [n_pairs, K] 0/1 indicator matrix and
        their ``items`` (needed with ``interaction_per_item``); the target column is masked
        unless ``interaction_include_target``."""
        w = self.behavior_weight
        keep = w.new_ones(self.n_behaviors)
        if not self.interaction_include_target:
            keep[-1] = 0.0
        ind = indicators.to(w.dtype) * keep
        s = ind @ w
        if self.interaction_per_item:
            if items is None:
                raise ValueError("interaction_per_item needs the item of every pair")
            s = s + (ind * self.behavior_item_weight[:, items].T).sum(1)
        return s

    def score(self, prop: Propagated, users: torch.Tensor, items: torch.Tensor | None = None,
              user_items: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Scores of local ``users`` against ``items`` (default: all items), [B, n_items].

        user_items: with interaction scoring, per behavior a binary sparse CSR (or dense)
        [n_local_users x n_items] interaction matrix (rows are selected by ``users``).
        """
        eu = prop.users[users, -1]
        ei = prop.items[:, -1] if items is None else prop.items[items, -1]
        s = eu @ (ei * prop.relations[-1]).T
        if self.use_item_bias:
            b = self.item_bias if items is None else self.item_bias[items]
            s = s + b.unsqueeze(0)
        if self.interaction_scoring:
            if user_items is not None:
                w = self.behavior_weight
                for k, X in enumerate(user_items):
                    if k == self.n_behaviors - 1 and not self.interaction_include_target:
                        continue
                    rows = dense_rows(X, users, s.dtype)
                    if items is not None:
                        rows = rows[:, items]
                    wk = w[k]
                    if self.interaction_per_item:
                        v = self.behavior_item_weight[k]
                        wk = wk + (v if items is None else v[items])
                    s = s + rows * wk
        return s
