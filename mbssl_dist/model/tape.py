"""Fast path of the training step: a forward that records what the reverse pass needs, and
ONE hand-written reverse pass for a stack of T task cotangents.

Why: the step needs a separate gradient per task (rec, intra, inter_k, plus the decay term)
for HMG, i.e. T vector-Jacobian products through the same graph propagation. Every operation
of the propagation is linear in the cotangent with a Jacobian that does not depend on the
task (SpMM, matmul, dropout mask, LeakyReLU slope, tanh derivative, softmax Jacobian), so the
T products are computed together: cotangents are laid out ``[K, N, T, d]`` so that each SpMM
runs once over ``T·d`` columns and each matmul once over ``N·T`` rows, instead of T separate
autograd passes (each with its own allocations and elementwise kernels).

The math is exactly the autograd graph of :meth:`MBSSL.forward` / :meth:`MBSSL.forward_views`
(tests compare against autograd to ~1e-12 in float64). Randomness: the dropout masks are drawn
from the caller's generator in the same order as the autograd path (main propagation, then
view 1, then view 2), so both paths see the same masks. Distributed: the item half of every
message is all-reduced in the forward; its cotangent is all-reduced in the reverse pass (one
collective per layer for all tasks), mirroring ``comm.all_reduce_sum``'s backward.

Layouts: node rows are users first (``n_users`` local rows), then items. ``rel`` is the list
of per-layer relation matrices r^0..r^{L-1} ([K, d]); the relation chain itself (tiny) is
differentiated by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..parallel.comm import Comm
from .mbssl import MBSSL, Adjacency, sparse_op

SLOPE = 0.01  # F.leaky_relu's default negative slope (what MBSSL._layer uses)


def _slope(h: torch.Tensor) -> torch.Tensor:
    """LeakyReLU derivative from its output (the sign is preserved: h > 0 iff z > 0)."""
    return torch.full_like(h, SLOPE).masked_fill_(h > 0, 1.0)


def _drop_mask(model: MBSSL, head: tuple[int, ...], generator, dtype, device) -> torch.Tensor | None:
    """Inverted-dropout multipliers [*head, N, d] (users first): the same draws as
    ``MBSSL._drop_mask`` (global user rows drawn, local rows selected), without the extra cat."""
    if not model.training or model.dropout <= 0.0:
        return None
    if generator is None:
        raise ValueError("training-mode forward with dropout needs a torch.Generator (rank-consistent randomness)")
    p, d = model.dropout, model.dim
    n_u, n_i = model.n_users, model.n_items
    scale = 1.0 / (1.0 - p)
    dev = generator.device
    out = torch.empty(head + (n_u + n_i, d), dtype=dtype, device=device)
    ax = len(head)
    mu = torch.rand(head + (model.n_users_global, d), generator=generator, device=dev)
    if model.user_ids is not None and not _identity_ids(model):
        mu = mu.index_select(ax, model.user_ids.to(dev))
    mi = torch.rand(head + (n_i, d), generator=generator, device=dev)
    out.narrow(ax, 0, n_u).copy_(mu >= p)
    out.narrow(ax, n_u, n_i).copy_(mi >= p)
    return out.mul_(scale)


def _identity_ids(model: MBSSL) -> bool:
    """True when the local user rows are all global users in order (single process)."""
    flag = getattr(model, "_ids_identity", None)
    ids = model.user_ids
    if flag is None or flag[0] is not ids:
        ok = ids.numel() == model.n_users_global and bool(
            torch.equal(ids.cpu(), torch.arange(model.n_users_global, dtype=ids.dtype)))
        flag = (ids, ok)
        model._ids_identity = flag  # type: ignore[attr-defined]
    return flag[1]


@dataclass
class _Saved:
    m: torch.Tensor  # messages, [K, N, d] (views: [N, d])
    h: torch.Tensor  # LeakyReLU output (pre-CDM)
    mask: torch.Tensor | None  # dropout multipliers
    t: torch.Tensor | None = None  # tanh activations of the CDM
    att: torch.Tensor | None = None  # attention weights
    logits: torch.Tensor | None = None  # main: [K(j), N, K(i)] attention logits


class _Messages:
    """Â x per behavior (users from items, items from users) and its transpose, for a list of
    (A_ui, A_iu) pairs; the item half goes through ``comm`` (partial sums over ranks)."""

    def __init__(self, adjs: Sequence[Adjacency], n_users: int, comm: Comm) -> None:
        self.ops = [(sparse_op(a_ui), sparse_op(a_iu)) for a_ui, a_iu in adjs]
        self.n_u = n_users
        self.comm = comm

    def forward(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """x: [K, N, d], or [N, d] used by every behavior when ``shared``. Returns [K, N, d]."""
        n_u, K = self.n_u, len(self.ops)
        d = x.shape[-1]
        N = x.shape[-2]
        out = torch.empty(K, N, d, dtype=x.dtype, device=x.device)
        for k, (op_ui, op_iu) in enumerate(self.ops):
            xk = x if shared else x[k]
            out[k, :n_u] = op_ui.mm(xk[n_u:])
            out[k, n_u:] = op_iu.mm(xk[:n_u])
        if self.comm.world_size > 1:
            mi = out[:, n_u:].contiguous()
            self.comm.all_reduce_sum_(mi)
            out[:, n_u:] = mi
        return out

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """g: [K, N, C] cotangent of the messages (C = T·d columns). Returns [K, N, C]."""
        n_u = self.n_u
        K, N, C = g.shape
        gi = g[:, n_u:]
        if self.comm.world_size > 1:
            gi = gi.contiguous()
            self.comm.all_reduce_sum_(gi)
        out = torch.empty_like(g)
        for k, (op_ui, op_iu) in enumerate(self.ops):
            out[k, n_u:] = op_ui.mm(g[k, :n_u], transpose=True)
            out[k, :n_u] = op_iu.mm(gi[k], transpose=True)
        return out


@dataclass
class TapeGrads:
    """Per-task gradients from the reverse pass (T = number of stacked cotangents)."""

    ego: torch.Tensor  # [N, T, d] (users first)
    W_gc: torch.Tensor  # [L, T, d, d]
    rel: torch.Tensor  # [L, T, K, d] cotangent of r^l (l < L) through the layers
    att_w1: torch.Tensor | None  # [T, K, d, a]
    att_w2: torch.Tensor | None  # [T, K, a]


def zero_grads(model: MBSSL, T: int, N: int, dtype, device) -> TapeGrads:
    K, L, d, a = model.n_behaviors, model.n_layers, model.dim, model.att_dim
    z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    return TapeGrads(z(N, T, d), z(L, T, d, d), z(L, T, K, d), z(T, K, d, a) if model.use_cdm else None,
                     z(T, K, a) if model.use_cdm else None)


def add_grads(into: TapeGrads, other: TapeGrads, task: int | None = None) -> None:
    """into += other (other with T = 1 goes into slot ``task``)."""
    sl = (lambda x: x) if task is None else (lambda x: x.narrow(0, task, 1))  # noqa: E731
    into.ego.narrow(1, task, 1).add_(other.ego) if task is not None else into.ego.add_(other.ego)
    into.W_gc.narrow(1, task, 1).add_(other.W_gc) if task is not None else into.W_gc.add_(other.W_gc)
    into.rel.narrow(1, task, 1).add_(other.rel) if task is not None else into.rel.add_(other.rel)
    if into.att_w1 is not None:
        sl(into.att_w1).add_(other.att_w1)
        sl(into.att_w2).add_(other.att_w2)


class MainTape:
    """The K-behavior propagation of :meth:`MBSSL.forward` with a batched reverse pass."""

    def __init__(self, model: MBSSL, adjs: Sequence[Adjacency], comm: Comm) -> None:
        self.model = model
        self.msg = _Messages(adjs, model.n_users, comm)
        self.layers: list[_Saved] = []

    @torch.no_grad()
    def forward(self, rel: Sequence[torch.Tensor], ego0: torch.Tensor, generator) -> torch.Tensor:
        """rel: r^0..r^{L-1} ([K, d], detached); ego0: [N, d]. Returns the readout [K, N, d]."""
        m = self.model
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        N = ego0.shape[0]
        self.rel = [r.detach() for r in rel]
        self.layers = []
        x = ego0
        acc = None
        for l in range(L):
            msg = self.msg.forward(x, shared=l == 0)
            Wp = self.rel[l].unsqueeze(-1) * m.W_gc[l].detach().unsqueeze(0)  # [K, d, d]
            h = torch.bmm(msg, Wp)
            F.leaky_relu_(h, SLOPE)
            sv = _Saved(msg, h, None)
            if m.use_cdm:
                a = m.att_dim
                w1 = m.att_w1.detach().permute(1, 0, 2).reshape(d, K * a)
                t = torch.tanh(h.view(K * N, d) @ w1)  # [(j, n), (i, a)]
                logits = (t.view(K * N, K, a) * m.att_w2.detach()).sum(-1).view(K, N, K)  # [j, n, i]
                att = torch.softmax(logits, dim=0)
                e = torch.empty_like(h)
                for i in range(K):
                    e[i].copy_(h[0]).mul_(att[0, :, i, None])
                    for j in range(1, K):
                        e[i].addcmul_(h[j], att[j, :, i, None])
                sv.t, sv.att, sv.logits = t, att, logits
            else:
                e = h.clone()
            sv.mask = _drop_mask(m, (K,), generator, e.dtype, e.device)
            if sv.mask is not None:
                e.mul_(sv.mask)
            self.layers.append(sv)
            x = e
            if acc is None:
                acc = e.clone()
            else:
                acc.add_(e)
        out = ego0.unsqueeze(0).expand(K, N, d) if acc is None else acc.add_(ego0.unsqueeze(0))
        return out / (L + 1)

    @torch.no_grad()
    def backward(self, g_out: torch.Tensor, extra_h: list | None = None, extra_logits: list | None = None,
                 extra_task: int = 0) -> TapeGrads:
        """g_out: [K, N, T, d] cotangents of the readout. extra_h[l]: [K-1, N, d] and
        extra_logits[l]: [K-1, N] cotangents of layer l's auxiliary pre-CDM h_j and of the
        logits (j, target column) coming from target-mode views, added to task ``extra_task``."""
        m = self.model
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        _, N, T, _ = g_out.shape
        dt = g_out.dtype
        dev = g_out.device
        gW = torch.zeros(L, T, d, d, dtype=dt, device=dev)
        grel = torch.zeros(L, T, K, d, dtype=dt, device=dev)
        gw1 = gw2 = None
        if m.use_cdm:
            a = m.att_dim
            gw1 = torch.zeros(T, K, d, a, dtype=dt, device=dev)
            gw2 = torch.zeros(T, K, a, dtype=dt, device=dev)
            w1 = m.att_w1.detach().permute(1, 0, 2).reshape(d, K * a)
            w2 = m.att_w2.detach()
        g_acc = g_out.div_(L + 1)  # g_out is the caller's scratch: scaled in place (no copy)
        g_next = None
        for l in reversed(range(L)):
            sv = self.layers[l]
            if g_next is None:
                g_e = g_acc.clone()
            else:
                g_e = g_next.add_(g_acc)
            if sv.mask is not None:
                g_e.mul_(sv.mask.unsqueeze(2))
            h = sv.h
            if m.use_cdm:
                att = sv.att  # [j, n, i]
                # e_i = Σ_j att[j, :, i] h_j
                g_h = torch.empty_like(g_e)
                for j in range(K):
                    g_h[j].copy_(g_e[0]).mul_(att[j, :, 0, None, None])
                    for i in range(1, K):
                        g_h[j].addcmul_(g_e[i], att[j, :, i, None, None])
                # g_att[i, n, t, j] = <g_e[i, n, t], h[j, n]>
                hT = h.permute(1, 2, 0)  # [n, d, j]
                g_att = torch.stack([torch.bmm(g_e[i], hT) for i in range(K)], 0)  # [i, n, T, j]
                att_i = att.permute(2, 1, 0).unsqueeze(2)  # [i, n, 1, j]
                s = (att_i * g_att).sum(-1, keepdim=True)
                g_log = att_i * (g_att - s)  # [i, n, T, j]
                if extra_logits is not None and extra_logits[l] is not None:
                    g_log[K - 1, :, extra_task, :K - 1] += extra_logits[l].T
                g_log = g_log.permute(3, 1, 2, 0).contiguous()  # [j, n, T, i]
                tv = sv.t.view(K, N, 1, K, a)
                g_u = g_log.unsqueeze(-1) * w2  # [j, n, T, i, a]
                gw2 += torch.einsum("jnti,jnia->tia", g_log, sv.t.view(K, N, K, a))
                g_u.mul_(1.0 - tv * tv)
                g_u = g_u.view(K * N, T, K * a)
                gw1 += (h.view(K * N, d).T @ g_u.view(K * N, T * K * a)).view(d, T, K, a).permute(1, 2, 0, 3)
                g_h.view(K * N * T, d).addmm_(g_u.view(K * N * T, K * a), w1.T)
                del g_u, g_log, g_att
            else:
                g_h = g_e
            if extra_h is not None and extra_h[l] is not None:
                g_h[:K - 1, :, extra_task] += extra_h[l]
            g_h.mul_(_slope(h).unsqueeze(2))  # = g_z
            W = m.W_gc[l].detach()
            r = self.rel[l]
            gWp = torch.bmm(sv.m.transpose(1, 2), g_h.view(K, N, T * d)).view(K, d, T, d)  # [k, c, t, e]
            gW[l] = torch.einsum("kc,kcte->tce", r, gWp)
            grel[l] = torch.einsum("kcte,ce->tkc", gWp, W)
            Wp = r.unsqueeze(-1) * W.unsqueeze(0)
            g_m = torch.bmm(g_h.view(K, N * T, d), Wp.transpose(1, 2).contiguous())  # [K, N*T, d]
            del g_h, g_e
            g_next = self.msg.backward(g_m.view(K, N, T * d)).view(K, N, T, d)
            del g_m
        if g_next is None:
            g_ego = g_out.sum(0).mul_(L + 1)
        else:
            g_ego = g_next.sum(0).add_(g_acc.sum(0))
        return TapeGrads(g_ego, gW, grel, gw1, gw2)


class ViewTape:
    """One target-mode view of :meth:`MBSSL.forward_views` (``mode='target'``): the target
    behavior propagated over the view, the auxiliary h_j (and, with the CDM, their attention
    logits, identical by construction) taken from the main propagation. Single task."""

    def __init__(self, model: MBSSL, main: MainTape, view_adj: Adjacency, comm: Comm) -> None:
        self.model = model
        self.main = main
        self.msg = _Messages([view_adj], model.n_users, comm)
        self.layers: list[_Saved] = []

    @torch.no_grad()
    def forward(self, ego0: torch.Tensor, generator) -> torch.Tensor:
        m, main = self.model, self.main
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        cdm = m.use_cdm and K > 1
        x = ego0
        acc = ego0.clone()
        self.layers = []
        for l in range(L):
            msg = self.msg.forward(x, shared=True)[0]  # [N, d]
            Wp = main.rel[l][K - 1].unsqueeze(-1) * m.W_gc[l].detach()
            h = msg @ Wp
            F.leaky_relu_(h, SLOPE)
            sv = _Saved(msg, h, None)
            if cdm:
                t = torch.tanh(h @ m.att_w1[K - 1].detach())  # [N, a]
                lt = t @ m.att_w2[K - 1].detach()  # [N]
                logits = torch.cat([main.layers[l].logits[:K - 1, :, K - 1], lt.unsqueeze(0)], 0)  # [j, N]
                att = torch.softmax(logits, dim=0)
                e = h * att[K - 1, :, None]
                hm = main.layers[l].h
                for j in range(K - 1):
                    e.addcmul_(hm[j], att[j, :, None])
                sv.t, sv.att = t, att
            else:
                e = h.clone()
            sv.mask = _drop_mask(m, (), generator, e.dtype, e.device)
            if sv.mask is not None:
                e.mul_(sv.mask)
            self.layers.append(sv)
            acc.add_(e)
            x = e
        return acc / (L + 1)

    @torch.no_grad()
    def backward(self, g_v: torch.Tensor, extra_h: list, extra_logits: list, grads: TapeGrads, task: int) -> None:
        """g_v: [N, d] cotangent of this view's output. Adds the parameter gradients into
        ``grads`` (slot ``task``) and the cotangents of the main propagation's h_j / logits
        into ``extra_h`` / ``extra_logits`` (lists over layers, summed over views)."""
        m, main = self.model, self.main
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        cdm = m.use_cdm and K > 1
        g_acc = g_v / (L + 1)
        g_next = None
        for l in reversed(range(L)):
            sv = self.layers[l]
            g_e = g_acc.clone() if g_next is None else g_next.add_(g_acc)
            if sv.mask is not None:
                g_e.mul_(sv.mask)
            h = sv.h
            if cdm:
                att = sv.att  # [j, N]
                hm = main.layers[l].h
                g_att = torch.stack([(g_e * hm[j]).sum(-1) for j in range(K - 1)] + [(g_e * h).sum(-1)], 0)
                g_log = att * (g_att - (att * g_att).sum(0, keepdim=True))  # [j, N]
                eh = att[:K - 1].unsqueeze(-1) * g_e  # [K-1, N, d]
                extra_h[l] = eh if extra_h[l] is None else extra_h[l].add_(eh)
                el = g_log[:K - 1]
                extra_logits[l] = el.clone() if extra_logits[l] is None else extra_logits[l].add_(el)
                g_lt = g_log[K - 1]  # [N]
                grads.att_w2[task, K - 1] += sv.t.T @ g_lt
                g_u = g_lt.unsqueeze(-1) * m.att_w2[K - 1].detach() * (1.0 - sv.t * sv.t)  # [N, a]
                grads.att_w1[task, K - 1] += h.T @ g_u
                g_h = g_e.mul_(att[K - 1].unsqueeze(-1))
                g_h.addmm_(g_u, m.att_w1[K - 1].detach().T)
            else:
                g_h = g_e
            g_h.mul_(_slope(h))
            W = m.W_gc[l].detach()
            r = main.rel[l][K - 1]
            gWp = sv.m.T @ g_h  # [c, e]
            grads.W_gc[l, task] += r.unsqueeze(-1) * gWp
            grads.rel[l, task, K - 1] += (gWp * W).sum(1)
            g_m = g_h @ (r.unsqueeze(-1) * W).T
            g_next = self.msg.backward(g_m.unsqueeze(0))[0]
        if g_next is None:
            grads.ego[:, task] += g_v
        else:
            grads.ego[:, task] += g_next.add_(g_v, alpha=1.0 / (L + 1))
