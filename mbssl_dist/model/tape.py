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
view 1, then view 2), so both paths see the same masks. Distributed (the item-sliced layout
of :mod:`.mbssl`): layer stacks hold local users + this rank's item slice; per layer the item
half of the messages is reduce-scattered and the slice all-gathered in the forward, and the
reverse pass does the transposes (all-gather the slice's message cotangents, reduce-scatter
the item cotangents), one collective per behavior per layer for all tasks together.

Layouts: inputs and outputs (ego, readout, their cotangents) hold users first (``n_users``
local rows), then all items; layer stacks hold users, then the slice (padded to ``S``). ``rel`` is the list
of per-layer relation matrices r^0..r^{L-1} ([K, d]); the relation chain itself (tiny) is
differentiated by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..parallel.comm import Comm
from ..graph.sparse import sparse_op
from .mbssl import MBSSL, Adjacency

SLOPE = 0.01  # F.leaky_relu's default negative slope (what MBSSL._layer uses)


def _slope(h: torch.Tensor) -> torch.Tensor:
    """LeakyReLU derivative from its output (the sign is preserved: h > 0 iff z > 0)."""
    return torch.full_like(h, SLOPE).masked_fill_(h > 0, 1.0)


class Workspace:
    """Named scratch buffers kept between steps. The reverse pass works on [K, N, T, d] stacks
    of tens of MB; a fresh allocation of that size is an mmap whose every page faults on first
    touch (measured: ~10x the cost of a pass over a reused buffer), so the tapes take their
    large buffers from here. A buffer is only valid until the next step asks for it again."""

    def __init__(self) -> None:
        self.buf: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
        n = 1
        for x in shape:
            n *= int(x)
        t = self.buf.get(name)
        if t is None or t.dtype != dtype or t.device != torch.device(device) or t.numel() < n:
            t = torch.empty(n, dtype=dtype, device=device)
            self.buf[name] = t
        return t[:n].view(shape)


def workspace(model: MBSSL) -> Workspace:
    """The model's tape workspace (per model object, so per rank)."""
    ws = getattr(model, "_tape_ws", None)
    if ws is None:
        ws = Workspace()
        object.__setattr__(model, "_tape_ws", ws)
    return ws


@dataclass
class _Saved:
    m: torch.Tensor  # messages, [K, N, d] (views: [N, d])
    h: torch.Tensor  # LeakyReLU output (pre-CDM)
    mask: torch.Tensor | None  # dropout multipliers
    t: torch.Tensor | None = None  # tanh activations of the CDM
    att: torch.Tensor | None = None  # attention weights
    logits: torch.Tensor | None = None  # main: [K(j), N, K(i)] attention logits


class _Messages:
    """Â x per behavior and its transpose for a list of (A_ui, A_iu) pairs, in the item-sliced
    layout: users from all items (local), this rank's item slice from the local users (partial
    sums reduce-scattered over ranks). Products are written in place into the caller's
    buffers (``_SparseOp.mm_into``); collectives go through ``comm``, one per behavior."""

    def __init__(self, adjs: Sequence[Adjacency], model: MBSSL, comm: Comm, buf) -> None:
        self.ops = [(sparse_op(a_ui), sparse_op(a_iu)) for a_ui, a_iu in adjs]
        self.n_u, self.n_i = model.n_users, model.n_items
        self.comm = comm
        self.P = comm.world_size
        _, self.n_s, self.S = model.item_rows(comm)
        self._buf = buf

    def forward(self, x_u: torch.Tensor, x_i: torch.Tensor, shared: bool, out: torch.Tensor,
                pending: Sequence = ()) -> torch.Tensor:
        """x_u: [K, n_u, d] local users, x_i: [K, >= n_i, d] all items (or [n_u, d] / [n_i, d]
        used by every behavior when ``shared``). Writes [K, n_u + S, d] into ``out``.
        ``pending``: handles of the all-gather still filling ``x_i``. Order: the item partials
        (local users only) first, their reduce-scatters launched asynchronously, then the wait
        for ``x_i`` and the user messages, so the SpMMs run while the bytes move."""
        n_u, n_i, P = self.n_u, self.n_i, self.P
        works = []
        for k, (_, op_iu) in enumerate(self.ops):
            xu = x_u if shared else x_u[k]
            if P == 1:
                op_iu.mm_into(xu, out[k, n_u:])
                continue
            works.append(self.scatter(k, out, lambda rows: op_iu.mm_into(xu, rows), out[k, n_u:]))
        for w in pending:
            w.wait()
        for k, (op_ui, _) in enumerate(self.ops):
            op_ui.mm_into((x_i if shared else x_i[k])[:n_i], out[k, :n_u])
        for w in works:
            w.wait()
        return out

    def scatter(self, k: int, like: torch.Tensor, fill, out: torch.Tensor):
        """Start the reduce-scatter of behavior ``k``'s item rows: ``fill(rows)`` writes this
        rank's partial [n_items, C] into the send buffer (the transport's own when it has one,
        e.g. shared memory, so the SpMM writes straight into it; else a workspace buffer; the
        padding rows are zeroed), and this rank's slice of the sum lands in ``out`` ([S, C]).
        Returns the handle."""
        P, S, n_i = self.P, self.S, self.n_i
        C = out.numel() // S
        send = self.comm.reduce_scatter_send_buffer(P * S * C, like.dtype, like.device)
        send = send.view(P * S, C) if send is not None else self._buf(f"rs_send{k}", (P * S, C), like)
        send[n_i:].zero_()
        fill(send[:n_i])
        return self.comm.reduce_scatter_sum_(send.view(P, S, C), out.view(S, C), async_op=True)

    def gather(self, e_i: torch.Tensor, name: str, async_op: bool = False):
        """[K, S, C] item slices of every rank -> [K, P·S, C] (rows >= n_items are padding);
        the slice itself when P = 1. With ``async_op`` returns (buffer, handles) and ``e_i``
        must stay untouched until the handles are waited for."""
        if self.P == 1:
            return (e_i, []) if async_op else e_i
        K, S, C = e_i.shape
        out = self._buf(name, (K, self.P * S, C), e_i)
        works = [self.comm.all_gather_(e_i[k], out[k].view(self.P, S, C), async_op=True) for k in range(K)]
        if async_op:
            return out, works
        for w in works:
            w.wait()
        return out

    def backward(self, g: torch.Tensor, out: torch.Tensor, items_out: torch.Tensor | None = None) -> None:
        """g: [K, n_u + S, C] cotangent of the messages (C = T·d columns). Adds to ``out``
        ([K, n_u + S, C]) the cotangent of the layer input: users' rows from the gathered item
        slices, the slice's rows reduce-scattered from this rank's A_uiᵀ partials. With
        ``items_out`` ([n_i, C], layer 0: the input is the replicated item embedding) the item
        cotangents of all behaviors are summed there instead (this rank's partial; the gradient
        reducer sums it over ranks) and the item rows of ``out`` are left alone. The all-gather
        runs while the A_uiᵀ products are computed, the reduce-scatters while the A_iuᵀ ones are."""
        n_u, n_i, P, S = self.n_u, self.n_i, self.P, self.S
        C = g.shape[-1]
        gi, ag = self.gather(g[:, n_u:], "ag_g", async_op=True)  # [K, P·S, C] (the slice when P = 1)
        rs = []
        for k, (op_ui, _) in enumerate(self.ops):
            if items_out is not None:
                op_ui.mm_into(g[k, :n_u], items_out, transpose=True, accumulate=True)
            elif P == 1:
                op_ui.mm_into(g[k, :n_u], out[k, n_u:], transpose=True, accumulate=True)
            else:
                part = self._buf(f"rs_out{k}", (S, C), g)
                fill = lambda rows: op_ui.mm_into(g[k, :n_u], rows, transpose=True)  # noqa: E731 (runs at once)
                rs.append((k, part, self.scatter(k, g, fill, part)))
        for w in ag:
            w.wait()
        for k, (_, op_iu) in enumerate(self.ops):
            op_iu.mm_into(gi[k, :n_i], out[k, :n_u], transpose=True, accumulate=True)
        for k, part, w in rs:
            w.wait()
            out[k, n_u:].add_(part)


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


def _readout(acc: torch.Tensor, ego0: torch.Tensor, n_u: int, n_i: int, L: int, msg: _Messages) -> torch.Tensor:
    """(acc + ego0) / (L + 1) in the full layout [K, n_u + n_i, d]: the item slices of the
    layer sum are all-gathered first."""
    K, _, d = acc.shape
    out = torch.empty(K, n_u + n_i, d, dtype=acc.dtype, device=acc.device)
    torch.add(acc[:, :n_u], ego0[:n_u], out=out[:, :n_u])
    torch.add(msg.gather(acc[:, n_u:], "acc_items")[:, :n_i], ego0[n_u:], out=out[:, n_u:])
    return out.div_(L + 1)


def _readout_backward(g: torch.Tensor, n_u: int, n_i: int, msg: _Messages, buf) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose of :func:`_readout` for a scaled cotangent ``g`` ([K, n_u + n_i, C...]).
    Returns (cotangent of the layer sum in the stack layout [K, n_u + S, C...]: users local,
    the slice's rows reduce-scattered; this rank's partial cotangent of the item embedding
    through the readout, [n_i, C...], summed over behaviors)."""
    K = g.shape[0]
    rest = tuple(g.shape[2:])
    g_ego_i = buf("gEgoI", (n_i,) + rest, g)
    torch.sum(g[:, n_u:], 0, out=g_ego_i)
    if msg.P == 1:
        return g, g_ego_i
    g_acc = buf("gAcc", (K, n_u + msg.S) + rest, g)
    g_acc[:, :n_u] = g[:, :n_u]
    works = [msg.scatter(k, g, lambda rows: rows.view_as(g[k, n_u:]).copy_(g[k, n_u:]), g_acc[k, n_u:])
             for k in range(K)]
    for w in works:
        w.wait()
    return g_acc, g_ego_i


class _Tape:
    """Common state of a recorded propagation: its messages, saved layers and named buffers
    in the model's workspace (``tag`` keeps the main pass and the views apart)."""

    def __init__(self, model: MBSSL, adjs: Sequence[Adjacency], comm: Comm, tag: str) -> None:
        self.model = model
        self.comm = comm
        self.layers: list[_Saved] = []
        self.ws = workspace(model)
        self.tag = tag
        self.msg = _Messages(adjs, model, comm, self._buf)
        self.n_loc = model.n_users + self.msg.S  # rows of the layer stacks

    def _buf(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        return self.ws.get(f"{self.tag}/{name}", tuple(shape), like.dtype, like.device)


class MainTape(_Tape):
    """The K-behavior propagation of :meth:`MBSSL.forward` with a batched reverse pass.
    ``tag`` names this tape's workspace buffers (each tape of a step needs its own)."""

    def __init__(self, model: MBSSL, adjs: Sequence[Adjacency], comm: Comm, tag: str = "main") -> None:
        super().__init__(model, adjs, comm, tag)

    @torch.no_grad()
    def forward(self, rel: Sequence[torch.Tensor], ego0: torch.Tensor, generator) -> torch.Tensor:
        """rel: r^0..r^{L-1} ([K, d], detached); ego0: [n_u + n_i, d]. Returns the readout
        [K, n_u + n_i, d] (all items)."""
        m = self.model
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        n_u = m.n_users
        N = self.n_loc
        self.rel = [r.detach() for r in rel]
        self.layers = []
        x_u, x_i = ego0[:n_u], ego0[n_u:]
        pending: list = []
        acc = None
        for l in range(L):
            msg = self.msg.forward(x_u, x_i, shared=l == 0, out=self._buf(f"m{l}", (K, N, d), ego0), pending=pending)
            Wp = self.rel[l].unsqueeze(-1) * m.W_gc[l].detach().unsqueeze(0)  # [K, d, d]
            h = torch.bmm(msg, Wp, out=self._buf(f"h{l}", (K, N, d), ego0))
            F.leaky_relu_(h, SLOPE)
            sv = _Saved(msg, h, None)
            e = self._buf(f"e{l % 2}", (K, N, d), ego0)
            if m.use_cdm:
                a = m.att_dim
                w1 = m.att_w1.detach().permute(1, 0, 2).reshape(d, K * a)
                t = torch.mm(h.view(K * N, d), w1, out=self._buf(f"t{l}", (K * N, K * a), ego0)).tanh_()
                logits = (t.view(K * N, K, a) * m.att_w2.detach()).sum(-1).view(K, N, K)  # [j, n, i]
                att = torch.softmax(logits, dim=0)
                for i in range(K):
                    torch.mul(h[0], att[0, :, i, None], out=e[i])
                    for j in range(1, K):
                        e[i].addcmul_(h[j], att[j, :, i, None])
                sv.t, sv.att, sv.logits = t, att, logits
            else:
                e.copy_(h)
            sv.mask = m.drop_mask((K,), generator, self.comm, e.dtype, e.device,
                                  out=self._buf(f"mask{l}", (K, N, d), ego0))
            if sv.mask is not None:
                e.mul_(sv.mask)
            self.layers.append(sv)
            if acc is None:
                acc = self._buf("acc", (K, N, d), ego0).copy_(e)
            else:
                acc.add_(e)
            if l < L - 1:
                x_u = e[:, :n_u]
                x_i, pending = self.msg.gather(e[:, n_u:], "x_items", async_op=True)
        if acc is None:
            return ego0.unsqueeze(0).expand(K, -1, d).clone()
        return _readout(acc, ego0, n_u, m.n_items, L, self.msg)

    @torch.no_grad()
    def backward(self, g_out: torch.Tensor, extra_h: list | None = None, extra_logits: list | None = None,
                 extra_task: int = 0) -> TapeGrads:
        """g_out: [K, N, T, d] cotangents of the readout (the caller's scratch: scaled in place).
        extra_h[l]: [K-1, N, d] and extra_logits[l]: [K-1, N] cotangents of layer l's auxiliary
        pre-CDM h_j and of the logits (j, target column) coming from target-mode views, added to
        task ``extra_task``.

        Per layer (reverse): g_e = (g_acc + g_next) ⊙ mask; CDM: g_h = Σ_i att_ji g_e_i plus the
        attention path; g_z = g_h ⊙ LeakyReLU'; parameter cotangents from g_z; g_m = g_z Wpᵀ; and
        the next g_next is written by the SpMMs straight into a buffer pre-filled with g_acc
        (scipy's kernel accumulates), so the add of the readout cotangent costs no extra pass.
        All [K, N, T, *] stacks live in the workspace (no page faults after the first step)."""
        m = self.model
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        n_u, n_i = m.n_users, m.n_items
        _, _, T, _ = g_out.shape
        N = self.n_loc
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
        g_acc, g_ego_i = _readout_backward(g_out.div_(L + 1), n_u, n_i, self.msg, self._buf)
        if L == 0:
            return TapeGrads(torch.cat([g_acc[:, :n_u].sum(0), g_ego_i], 0), gW, grel, gw1, gw2)
        g_e = self._buf("gE", (K, N, T, d), g_out).copy_(g_acc)  # = g_acc + g_next (no g_next on top)
        gh_buf = self._buf("gH", (K, N, T, d), g_out)
        gm_buf = self._buf("gM", (K, N * T, d), g_out)
        slope = self._buf("slope", (K, N, d), g_out)
        for l in reversed(range(L)):
            sv = self.layers[l]
            if sv.mask is not None:
                g_e.mul_(sv.mask.unsqueeze(2))
            h = sv.h
            if m.use_cdm:
                att = sv.att  # [j, n, i]
                # e_i = Σ_j att[j, :, i] h_j
                g_h = gh_buf
                for j in range(K):
                    torch.mul(g_e[0], att[j, :, 0, None, None], out=g_h[j])
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
                tk = sv.t.view(K, N, K, a)
                gw2 += torch.einsum("jnti,jnia->tia", g_log, tk)
                # d logits / d u = w2_i ⊙ (1 − t²): task-independent, formed once per layer
                dsc = (1.0 - tk * tk).mul_(w2).unsqueeze(2)  # [j, n, 1, i, a]
                g_u = torch.mul(g_log.unsqueeze(-1), dsc,
                                out=self._buf("gU", (K, N, T, K, a), g_out))  # [j, n, T, i, a]
                del dsc, g_att, s
                gw1 += (h.view(K * N, d).T @ g_u.view(K * N, T * K * a)).view(d, T, K, a).permute(1, 2, 0, 3)
                g_h.view(K * N * T, d).addmm_(g_u.view(K * N * T, K * a), w1.T)
                del g_u, g_log
            else:
                g_h = g_e
            if extra_h is not None and extra_h[l] is not None:
                g_h[:K - 1, :, extra_task] += extra_h[l]
            slope.fill_(SLOPE).masked_fill_(h > 0, 1.0)
            g_h.mul_(slope.unsqueeze(2))  # = g_z
            W = m.W_gc[l].detach()
            r = self.rel[l]
            gWp = torch.bmm(sv.m.transpose(1, 2), g_h.view(K, N, T * d)).view(K, d, T, d)  # [k, c, t, e]
            gW[l] = torch.einsum("kc,kcte->tce", r, gWp)
            grel[l] = torch.einsum("kcte,ce->tkc", gWp, W)
            Wp = r.unsqueeze(-1) * W.unsqueeze(0)
            g_m = torch.bmm(g_h.view(K, N * T, d), Wp.transpose(1, 2).contiguous(), out=gm_buf)  # [K, N*T, d]
            del g_h
            # g_e of layer l-1 (or the ego cotangent) = g_acc + Âᵀ g_m
            g_e.copy_(g_acc)
            self.msg.backward(g_m.view(K, N, T * d), g_e.view(K, N, T * d),
                              g_ego_i.view(n_i, T * d) if l == 0 else None)
        g_ego = torch.cat([g_e[:, :n_u].sum(0), g_ego_i], 0)
        return TapeGrads(g_ego, gW, grel, gw1, gw2)


class ViewTape(_Tape):
    """One target-mode view of :meth:`MBSSL.forward_views` (``mode='target'``): the target
    behavior propagated over the view, the auxiliary h_j (and, with the CDM, their attention
    logits, identical by construction) taken from the main propagation. Single task."""

    def __init__(self, model: MBSSL, main: MainTape, view_adj: Adjacency, comm: Comm, tag: str = "tview") -> None:
        super().__init__(model, [view_adj], comm, tag)
        self.main = main

    @torch.no_grad()
    def forward(self, ego0: torch.Tensor, generator) -> torch.Tensor:
        m, main = self.model, self.main
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        cdm = m.use_cdm and K > 1
        n_u = m.n_users
        N = self.n_loc
        x_u, x_i = ego0[:n_u], ego0[n_u:]
        acc = self._buf("acc", (N, d), ego0).zero_()
        pending: list = []
        self.layers = []
        for l in range(L):
            msg = self.msg.forward(x_u, x_i, shared=True, out=self._buf(f"m{l}", (1, N, d), ego0),
                                   pending=pending)[0]  # [N, d]
            Wp = main.rel[l][K - 1].unsqueeze(-1) * m.W_gc[l].detach()
            h = torch.mm(msg, Wp, out=self._buf(f"h{l}", (N, d), ego0))
            F.leaky_relu_(h, SLOPE)
            sv = _Saved(msg, h, None)
            if cdm:
                t = torch.tanh(h @ m.att_w1[K - 1].detach())  # [N, a]
                lt = t @ m.att_w2[K - 1].detach()  # [N]
                logits = torch.cat([main.layers[l].logits[:K - 1, :, K - 1], lt.unsqueeze(0)], 0)  # [j, N]
                att = torch.softmax(logits, dim=0)
                e = torch.mul(h, att[K - 1, :, None], out=self._buf(f"e{l % 2}", (N, d), ego0))
                hm = main.layers[l].h
                for j in range(K - 1):
                    e.addcmul_(hm[j], att[j, :, None])
                sv.t, sv.att = t, att
            else:
                e = self._buf(f"e{l % 2}", (N, d), ego0).copy_(h)
            sv.mask = m.drop_mask((), generator, self.comm, e.dtype, e.device,
                                  out=self._buf(f"mask{l}", (N, d), ego0))
            if sv.mask is not None:
                e.mul_(sv.mask)
            self.layers.append(sv)
            acc.add_(e)
            if l < L - 1:
                x_u = e[:n_u]
                x_i, pending = self.msg.gather(e[n_u:].unsqueeze(0), "x_items", async_op=True)
                x_i = x_i[0]
        if L == 0:
            return ego0.clone()
        return _readout(acc.unsqueeze(0), ego0, n_u, m.n_items, L, self.msg)[0]

    @torch.no_grad()
    def backward(self, g_v: torch.Tensor, extra_h: list, extra_logits: list, grads: TapeGrads, task: int) -> None:
        """g_v: [N, d] cotangent of this view's output. Adds the parameter gradients into
        ``grads`` (slot ``task``) and the cotangents of the main propagation's h_j / logits
        into ``extra_h`` / ``extra_logits`` (lists over layers, summed over views)."""
        m, main = self.model, self.main
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        cdm = m.use_cdm and K > 1
        n_u, n_i = m.n_users, m.n_items
        if L == 0:
            grads.ego[:, task] += g_v
            return
        g_acc, g_ego_i = _readout_backward((g_v / (L + 1)).unsqueeze(0), n_u, n_i, self.msg, self._buf)
        g_acc = g_acc[0]
        N = self.n_loc
        g_e = self._buf("gE", (N, d), g_v).copy_(g_acc)  # = g_acc + g_next (no g_next on top)
        for l in reversed(range(L)):
            sv = self.layers[l]
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
            g_m = torch.mm(g_h, (r.unsqueeze(-1) * W).T, out=self._buf("gM", (N, d), g_v))
            del g_h
            g_e.copy_(g_acc)  # the SpMMs accumulate Âᵀ g_m onto the readout cotangent
            self.msg.backward(g_m.unsqueeze(0), g_e.unsqueeze(0), g_ego_i if l == 0 else None)
        grads.ego[:n_u, task] += g_e[:n_u]
        grads.ego[n_u:, task] += g_ego_i
