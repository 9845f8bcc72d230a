"""The autograd implementation of the MBSSL propagation and training step: the oracle the
production code (``mbssl_dist.model.propagation``, ``mbssl_dist.training.step``) is checked
against. Straight autograd over the same math: SpMM (``graph.sparse.spmm``), the layer
transform, CDM, dropout, readout, with autograd-aware collectives (``Comm.reduce_scatter_sum``,
``Comm.all_gather``) for P ranks; per-task gradients by one ``torch.autograd.grad`` per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from mbssl_dist.graph import view_keep
from mbssl_dist.graph.sparse import spmm
from mbssl_dist.model.propagation import ACTIVATION, CDM, Adjacency
from mbssl_dist.parallel.comm import Comm, LocalComm
from mbssl_dist.training import TrainStep
from mbssl_dist.utils.seeding import make_generator

VIEW_MODES = ("target", "full")


@dataclass
class Propagated:
    users: torch.Tensor
    items: torch.Tensor
    relations: torch.Tensor
    layer_h: list[torch.Tensor] = field(default_factory=list, repr=False)
    layer_rel: list[torch.Tensor] = field(default_factory=list, repr=False)


def cdm(model, h: torch.Tensor, only: int | None = None) -> torch.Tensor:
    """Cross-behavior attention on the behavior-major stack h: [K, N, d].
    Returns [K, N, d] (all behaviors i) or [N, d] (behavior ``only``)."""
    if not model.use_cdm:
        return h if only is None else h[only]
    K, n, d = h.shape
    a = model.att_dim
    if only is None:
        w1 = model.att_w1.permute(1, 0, 2).reshape(d, K * a)  # [d, (i, a)]
        t = CDM.squash_(h.reshape(K * n, d) @ w1).view(K, n, K, a)  # [j, n, i, a]
        logits = (t * model.att_w2.unsqueeze(0).unsqueeze(0)).sum(-1)  # [j, n, i]
        att = torch.softmax(logits, dim=0)  # over j
        return torch.einsum("jni,jnd->ind", att, h)
    t = CDM.squash_(h.reshape(K * n, d) @ model.att_w1[only]).view(K, n, a)
    att = torch.softmax(t @ model.att_w2[only], dim=0)  # [j, n]
    return (att.unsqueeze(-1) * h).sum(0)


def messages(model, adjs: Sequence[Adjacency], x_u: torch.Tensor, x_i: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Â x per behavior: x_u [K', n_users, d] (local users), x_i [K', n_items, d] (all
    items). Returns [K', n_users + S, d]: the local users' messages and this rank's item
    slice of the item messages (partial sums over ranks, reduce-scattered)."""
    n_i = model.n_items
    P = comm.world_size
    i0, n_s, S = model.item_rows(comm)
    out = []
    for k, (a_ui, a_iu) in enumerate(adjs):
        mu = spmm(a_ui, x_i[k])
        mi = spmm(a_iu, x_u[k])  # [n_items, d], this rank's partial sum
        if P > 1:
            mi = comm.reduce_scatter_sum(F.pad(mi, (0, 0, 0, P * S - n_i)).view(P, S, -1))
        out.append(torch.cat([mu, mi], 0))
    return torch.stack(out, 0)


def gather_items(model, e_i: torch.Tensor, comm: Comm) -> torch.Tensor:
    """[K', S, d] item slices of every rank -> [K', n_items, d] (all-gather per behavior)."""
    if comm.world_size == 1:
        return e_i
    g = comm.all_gather(e_i.contiguous())  # [P, K', S, d]
    return g.permute(1, 0, 2, 3).reshape(e_i.shape[0], -1, e_i.shape[2])[:, :model.n_items]


def layer(model, m: torch.Tensor, rel_l: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """h = act((m ⊙ r) W) for a [K', N, d] stack with r: [K', d] (= m @ (diag(r) W))."""
    return ACTIVATION(torch.bmm(m, rel_l.unsqueeze(-1) * W.unsqueeze(0)))  # autograd differentiates it here


def forward(model, adjs: Sequence[Adjacency], comm: Comm | None = None,
            generator: torch.Generator | None = None, keep_layers: bool = True) -> Propagated:
    """Propagate over all behaviors.

    adjs: per behavior (A_ui_local, A_iu_local), normalized, constant values.
    generator: source of the dropout masks (required in training mode when dropout > 0).
    keep_layers: keep the per-layer pre-CDM stacks for :meth:`forward_views`.
    Per layer the item half of the messages is reduce-scattered to the rank owning each
    item slice, the dense transform runs on local users + the slice, and the slice is
    all-gathered for the next layer's user messages (and, at the end, the readout).
    """
    comm = comm or LocalComm()
    K, L = model.n_behaviors, model.n_layers
    if len(adjs) != K:
        raise ValueError(f"expected {K} adjacencies, got {len(adjs)}")
    n_u = model.n_users
    rel = model.relation_layers()
    x_u = model.user_embedding.unsqueeze(0).expand(K, -1, -1)
    x_i = model.item_embedding.unsqueeze(0).expand(K, -1, -1)
    acc = None
    layer_h: list[torch.Tensor] = []
    for l in range(L):
        h = layer(model, messages(model, adjs, x_u, x_i, comm), rel[l], model.W_gc[l])  # [K, n_u + S, d]
        if keep_layers:
            layer_h.append(h)
        e = cdm(model, h)
        mask = model.drop_mask((K,), generator, comm, e.dtype, e.device)
        if mask is not None:
            e = e * mask
        acc = e if acc is None else acc + e
        if l < L - 1:
            x_u, x_i = e[:, :n_u], gather_items(model, e[:, n_u:], comm)
    if acc is None:
        out_u = model.user_embedding.unsqueeze(1).expand(-1, K, -1)
        out_i = model.item_embedding.unsqueeze(1).expand(-1, K, -1)
    else:
        out_u = ((acc[:, :n_u] + model.user_embedding) / (L + 1)).permute(1, 0, 2)
        out_i = ((gather_items(model, acc[:, n_u:], comm) + model.item_embedding) / (L + 1)).permute(1, 0, 2)
    relations = torch.stack(rel, 0).mean(0)
    return Propagated(out_u, out_i, relations, layer_h if keep_layers else [], rel)


def forward_views(model, base: Propagated, view_adjs: Sequence[Adjacency],
                  adjs: Sequence[Adjacency] | None = None, comm: Comm | None = None,
                  generator: torch.Generator | None = None, mode: str = "target") -> list[torch.Tensor]:
    """Target-behavior embeddings of the intra-SSL views.

    view_adjs: one (A_ui, A_iu) of the *target* behavior per view.
    mode ``target`` (default, fast): only the target behavior is propagated over the view;
        the auxiliary behaviors' per-layer messages ``h_j`` (j < K) are taken from the main
        propagation ``base`` (same parameters; gradients flow through them), and the CDM of
        the target row mixes them with the view's own ``h_K``. Per view this costs one
        target-behavior SpMM pair, one [N, d] x [d, d] matmul and the target row of the CDM
        per layer, instead of a full K-behavior propagation. Dropout masks: one [N, d] mask
        per layer (only the target row exists).
    mode ``full`` (the authors' code): a full K-behavior propagation per view, auxiliary
        behaviors over their original graphs, the target over the view. Needs ``adjs``.
    Returns per view a [n_local_users + n_items, d] tensor (users first).
    """
    comm = comm or LocalComm()
    if mode not in VIEW_MODES:
        raise ValueError(f"view mode must be one of {VIEW_MODES}, got {mode!r}")
    K, L = model.n_behaviors, model.n_layers
    n_u = model.n_users
    out = []
    if mode == "full":
        if adjs is None:
            raise ValueError("mode='full' needs the main adjacencies")
        for va in view_adjs:
            pv = forward(model, list(adjs[:-1]) + [va], comm, generator, keep_layers=False)
            out.append(torch.cat([pv.users[:, -1], pv.items[:, -1]], 0))
        return out
    if len(base.layer_h) != L:
        raise ValueError("base propagation must be run with keep_layers=True for mode='target'")
    rel = base.layer_rel if base.layer_rel else model.relation_layers()
    for va in view_adjs:
        x_u, x_i = model.user_embedding.unsqueeze(0), model.item_embedding.unsqueeze(0)
        acc = None
        for l in range(L):
            h_t = layer(model, messages(model, [va], x_u, x_i, comm), rel[l][K - 1:], model.W_gc[l])  # [1, n_u + S, d]
            if model.use_cdm and K > 1:
                e = cdm(model, torch.cat([base.layer_h[l][:K - 1], h_t], 0), only=K - 1)
            else:
                e = h_t[0]
            mask = model.drop_mask((), generator, comm, e.dtype, e.device)
            if mask is not None:
                e = e * mask
            acc = e if acc is None else acc + e
            if l < L - 1:
                x_u, x_i = e[:n_u].unsqueeze(0), gather_items(model, e[n_u:].unsqueeze(0), comm)
        if acc is None:
            out.append(torch.cat([model.user_embedding, model.item_embedding], 0))
            continue
        acc_i = gather_items(model, acc[n_u:].unsqueeze(0), comm)[0]
        out.append(torch.cat([acc[:n_u] + model.user_embedding, acc_i + model.item_embedding], 0) / (L + 1))
    return out



def compute_losses(step: TrainStep, batch, adjs: Sequence[Adjacency], view_adjs, generator) -> dict[str, torch.Tensor]:
    """All task losses of ``step`` through the autograd graph of the model."""
    m, comm, mode = step.model, step.comm, step.loss.view_propagation
    prop = forward(m, adjs, comm, generator, keep_layers=step.loss.use_intra and mode == "target")
    views = forward_views(m, prop, view_adjs, adjs, comm, generator, mode) if step.loss.use_intra else None
    return step.losses(prop.users, prop.items, prop.relations, views, batch)


class AutogradStep(TrainStep):
    """The training step with autograd instead of the batched reverse pass: the same losses,
    one ``torch.autograd.grad`` per task, then the same HMG and Adam."""

    def forward(self, batch, adjs, view_adjs, generator):
        return compute_losses(self, batch, adjs, view_adjs, generator), None

    def task_grads(self, losses, fw) -> dict[str, list]:
        names = self.tasks + ["reg"]
        return {n: list(torch.autograd.grad(losses[n], self.params, retain_graph=i < len(names) - 1,
                                            allow_unused=True)) for i, n in enumerate(names)}


def autograd_step(step: TrainStep) -> AutogradStep:
    """An :class:`AutogradStep` sharing ``step``'s model, config, state and gradient reducer."""
    auto = AutogradStep.__new__(AutogradStep)
    auto.__dict__.update(step.__dict__)
    return auto


def make_views(graph, mode: str, p: float, seed: int, epoch: int, norm: str = "sym",
               dtype: torch.dtype = torch.float32, device="cpu") -> list[Adjacency]:
    """Two random views of a whole target ``BehaviorGraph`` (one process) as (A_ui, A_iu)
    pairs, renormalized on the view: the same keep decisions as the trainer's
    ``parallel.layout.target_views`` (``graph.view_keep``)."""
    rows, items = graph.rows().numpy(), graph.indices.numpy()
    return [graph.subgraph_edges(torch.from_numpy(view_keep(rows, items, graph.n_users, graph.n_items, mode, p,
                                                            seed, epoch, view))).adjacency(norm, dtype, device)
            for view in range(2)]
