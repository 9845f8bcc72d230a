"""The MBSSL propagation, written once: each operation with its forward and its batched reverse
pass side by side, composed by :class:`Propagation` for training (per-task reverse passes) and
for evaluation and recommendation (forward only).

Why a hand-written reverse pass: the step needs one gradient per task (rec, intra, inter_k,
decay) for HMG, i.e. T vector-Jacobian products through the same propagation. Every operation
is linear in the cotangent with a task-independent Jacobian (SpMM, matmul, dropout mask,
activation slope, tanh derivative, softmax Jacobian), so the T products run together:
cotangents are stacked ``[K, N, T, d]``, each SpMM runs once over ``T·d`` columns and each
matmul once over ``N·T`` rows. The autograd implementation of the same math is the test oracle
(``tests/autograd_model.py``; equal to ~1e-12 in float64).

Layouts (DESIGN.md §4, item-sliced): inputs and readouts hold the local users, then all items;
layer stacks hold the local users, then this rank's item slice (padded to ``S``). Per layer the
item half of the messages is reduce-scattered to the slice's owner and the slice all-gathered
for the next layer; the reverse pass does the transposes, one collective per behavior per layer
for all tasks together. A *target view* (intra SSL, ``view_propagation = "target"``) is the
same propagation over a one-behavior stack (the target over a view graph) whose CDM takes the
auxiliary behaviors' ``h_j`` from the main propagation (``base``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..graph.sparse import sparse_op
from ..parallel.comm import Comm

Adjacency = tuple[torch.Tensor, torch.Tensor]  # (A_ui [n_local_users x n_items], A_iu [n_items x n_local_users])


class Activation:
    """The layer activation, LeakyReLU with slope 0.01 (the authors' ``F.leaky_relu`` default),
    applied in place; the reverse pass takes its derivative from the output (h > 0 iff z > 0)."""

    slope = 0.01

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu_(z, self.slope)

    def derivative(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.fill_(self.slope).masked_fill_(h > 0, 1.0)


ACTIVATION = Activation()


class Workspace:
    """Named scratch buffers kept between steps: a fresh [K, N, T, d] allocation is an mmap whose
    pages all fault on first touch (measured ~10x a pass over a reused buffer). A buffer is
    valid until the next request of the same name."""

    def __init__(self) -> None:
        self.buf: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for x in shape:
            n *= int(x)
        t = self.buf.get(name)
        if t is None or t.dtype != like.dtype or t.device != like.device or t.numel() < n:
            t = self.buf[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return t[:n].view(tuple(shape))


# ----------------------------------------------------------------------------- messages
class Messages:
    """Â x per behavior and its transpose in the item-sliced layout: users from all items (local),
    this rank's item slice from the local users (partial sums reduce-scattered). Products are
    written in place into the caller's buffers; the collectives overlap the SpMMs."""

    def __init__(self, adjs: Sequence[Adjacency], model, comm: Comm, buf) -> None:
        self.ops = [(sparse_op(a_ui), sparse_op(a_iu)) for a_ui, a_iu in adjs]
        self.n_u, self.n_i = model.n_users, model.n_items
        self.comm, self.P = comm, comm.world_size
        _, self.n_s, self.S = model.item_rows(comm)
        self._buf = buf

    def forward(self, x_u: torch.Tensor, x_i: torch.Tensor, shared: bool, out: torch.Tensor,
                pending: Sequence = ()) -> torch.Tensor:
        """x_u [K, n_u, d], x_i [K, >= n_i, d] (or [n_u, d] / [n_i, d] for every behavior when
        ``shared``) -> ``out`` [K, n_u + S, d]. The item partials are reduce-scattered while the
        all-gather (``pending``) of ``x_i`` completes and the user messages are computed."""
        n_u, n_i = self.n_u, self.n_i
        works = []
        for k, (_, op_iu) in enumerate(self.ops):
            xu = x_u if shared else x_u[k]
            if self.P == 1:
                op_iu.mm_into(xu, out[k, n_u:])
            else:
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
        rank's [n_items, C] partial into the send buffer (the transport's own when it has one);
        this rank's slice of the sum lands in ``out`` ([S, C]). Returns the handle."""
        P, S, n_i = self.P, self.S, self.n_i
        C = out.numel() // S
        send = self.comm.reduce_scatter_send_buffer(P * S * C, like.dtype, like.device)
        send = send.view(P * S, C) if send is not None else self._buf(f"rs_send{k}", (P * S, C), like)
        send[n_i:].zero_()
        fill(send[:n_i])
        return self.comm.reduce_scatter_sum_(send.view(P, S, C), out.view(S, C), async_op=True)

    def gather(self, e_i: torch.Tensor, name: str, async_op: bool = False):
        """[K, S, C] item slices of every rank -> [K, P·S, C] (rows >= n_items are padding).
        With ``async_op``: (buffer, handles); ``e_i`` must stay untouched until they are waited."""
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
        """Adds to ``out`` ([K, n_u + S, C]) the cotangent of the layer input for the message
        cotangent ``g`` ([K, n_u + S, C]). With ``items_out`` ([n_i, C], layer 0, whose input is
        the replicated item embedding) the item cotangents of all behaviors go there instead
        (this rank's partial; the gradient reducer sums it over ranks)."""
        n_u, n_i, P, S = self.n_u, self.n_i, self.P, self.S
        C = g.shape[-1]
        gi, ag = self.gather(g[:, n_u:], "ag_g", async_op=True)
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


# ----------------------------------------------------------------------------- readout
def readout(acc: torch.Tensor, ego0: torch.Tensor, L: int, msg: Messages) -> torch.Tensor:
    """(Σ_l e^l + e^0) / (L + 1) in the full layout [K, n_u + n_i, d] (item slices gathered)."""
    n_u, n_i = msg.n_u, msg.n_i
    out = torch.empty(acc.shape[0], n_u + n_i, acc.shape[2], dtype=acc.dtype, device=acc.device)
    torch.add(acc[:, :n_u], ego0[:n_u], out=out[:, :n_u])
    torch.add(msg.gather(acc[:, n_u:], "acc_items")[:, :n_i], ego0[n_u:], out=out[:, n_u:])
    return out.div_(L + 1)


def readout_backward(g: torch.Tensor, msg: Messages, buf) -> tuple[torch.Tensor, torch.Tensor]:
    """Transpose of :func:`readout` for a scaled cotangent ``g`` ([K, n_u + n_i, T, d]): (the layer
    sum's cotangent in the stack layout, this rank's item-embedding partial summed over K)."""
    n_u, n_i = msg.n_u, msg.n_i
    rest = tuple(g.shape[2:])
    g_ego_i = torch.sum(g[:, n_u:], 0, out=buf("gEgoI", (n_i,) + rest, g))
    if msg.P == 1:
        return g, g_ego_i
    g_acc = buf("gAcc", (g.shape[0], n_u + msg.S) + rest, g)
    g_acc[:, :n_u] = g[:, :n_u]
    works = [msg.scatter(k, g, lambda rows: rows.view_as(g[k, n_u:]).copy_(g[k, n_u:]), g_acc[k, n_u:])
             for k in range(g.shape[0])]
    for w in works:
        w.wait()
    return g_acc, g_ego_i


# ----------------------------------------------------------------------------- units
@dataclass
class Grads:
    """Per-task parameter cotangents of the propagation (T stacked tasks)."""

    ego: torch.Tensor  # [N, T, d] (users first)
    W_gc: torch.Tensor  # [L, T, d, d]
    rel: torch.Tensor  # [L, T, K, d]: cotangent of r^l (l < L) through the layers
    att_w1: torch.Tensor | None  # [T, K, d, a]
    att_w2: torch.Tensor | None  # [T, K, a]

    @classmethod
    def zeros(cls, model, T: int, N: int, like: torch.Tensor) -> "Grads":
        K, L, d, a = model.n_behaviors, model.n_layers, model.dim, model.att_dim
        z = lambda *s: like.new_zeros(s)  # noqa: E731
        cdm = model.use_cdm
        return cls(z(N, T, d), z(L, T, d, d), z(L, T, K, d), z(T, K, d, a) if cdm else None, z(T, K, a) if cdm else None)

    def add_(self, other: "Grads") -> None:
        for f in ("ego", "W_gc", "rel", "att_w1", "att_w2"):
            if getattr(self, f) is not None:
                getattr(self, f).add_(getattr(other, f))


class Transform:
    """h = act((m ⊙ r_k) W) for a [K, N, d] stack of messages: one bmm with Wp_k = diag(r_k) W."""

    @staticmethod
    def forward(m: torch.Tensor, r: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return ACTIVATION(torch.bmm(m, r.unsqueeze(-1) * W.unsqueeze(0), out=out))

    @staticmethod
    def backward(g_h: torch.Tensor, h: torch.Tensor, m: torch.Tensor, r: torch.Tensor, W: torch.Tensor, buf,
                 target_row: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g_h [K, N, T, d] (scaled in place to g_z) -> (g_m [K, N·T, d], g_W [T, d, d], g_r [T, K, d])."""
        K, N, T, d = g_h.shape
        g_h.mul_(ACTIVATION.derivative(h, buf("slope", (K, N, d), h)).unsqueeze(2))
        gWp = torch.bmm(m.transpose(1, 2), g_h.view(K, N, T * d)).view(K, d, T, d)  # [k, c, t, e]
        g_W = torch.einsum("kc,kcte->tce", r, gWp)
        # the target row of a view (T = 1) sums like the one-row product it is
        g_r = (gWp[0, :, 0] * W).sum(1).view(1, 1, d) if target_row else torch.einsum("kcte,ce->tkc", gWp, W)
        Wp_t = (r.unsqueeze(-1) * W.unsqueeze(0)).transpose(1, 2).contiguous()
        g_m = torch.bmm(g_h.view(K, N * T, d), Wp_t, out=buf("gM", (K, N * T, d), h))
        return g_m, g_W, g_r


class CDM:
    """Cross-behavior attention (GATNE-style, one head) on a behavior-major stack h [K, N, d]:
    ``e_i = Σ_j a_ji h_j``, ``a_·i = softmax_j(w2_iᵀ tanh(W1_iᵀ h_j))``. ``forward``/``backward``:
    every output row i; ``forward_target``/``backward_target``: the target row only, over the
    view's own h and the auxiliary h_j of the main propagation (whose logits are reused)."""

    def __init__(self, model) -> None:
        self.K, self.a, self.d = model.n_behaviors, model.att_dim, model.dim
        self.w1, self.w2 = model.att_w1.detach(), model.att_w2.detach()

    @staticmethod
    def squash_(u: torch.Tensor) -> torch.Tensor:
        """The attention score's nonlinearity (tanh, in place) and, below, its derivative from the output."""
        return u.tanh_()

    @staticmethod
    def squash_grad(t: torch.Tensor) -> torch.Tensor:
        return 1.0 - t * t

    def forward(self, h: torch.Tensor, e: torch.Tensor, buf, l: int) -> tuple:
        K, a, d = self.K, self.a, self.d
        N = h.shape[1]
        w1 = self.w1.permute(1, 0, 2).reshape(d, K * a)
        t = self.squash_(torch.mm(h.view(K * N, d), w1, out=buf(f"t{l}", (K * N, K * a), h)))
        logits = (t.view(K * N, K, a) * self.w2).sum(-1).view(K, N, K)  # [j, n, i]
        att = torch.softmax(logits, dim=0)
        for i in range(K):
            torch.mul(h[0], att[0, :, i, None], out=e[i])
            for j in range(1, K):
                e[i].addcmul_(h[j], att[j, :, i, None])
        return t, att, logits

    def backward(self, g_e: torch.Tensor, h: torch.Tensor, saved: tuple, out: torch.Tensor, grads: Grads, sl: slice,
                 extra_logits: torch.Tensor | None, extra_task: int, buf) -> torch.Tensor:
        """g_e [K, N, T, d] -> g_h written into ``out``; parameter cotangents added to ``grads``;
        ``extra_logits`` [K-1, N]: the target views' cotangent of logits (j < K, target column)."""
        K, a, d = self.K, self.a, self.d
        t, att, _ = saved
        N, T = g_e.shape[1], g_e.shape[2]
        for j in range(K):
            torch.mul(g_e[0], att[j, :, 0, None, None], out=out[j])
            for i in range(1, K):
                out[j].addcmul_(g_e[i], att[j, :, i, None, None])
        hT = h.permute(1, 2, 0)  # [n, d, j]
        g_att = torch.stack([torch.bmm(g_e[i], hT) for i in range(K)], 0)  # [i, n, T, j]
        att_i = att.permute(2, 1, 0).unsqueeze(2)  # [i, n, 1, j]
        g_log = att_i * (g_att - (att_i * g_att).sum(-1, keepdim=True))  # softmax Jacobian
        if extra_logits is not None:
            g_log[K - 1, :, extra_task, :K - 1] += extra_logits.T
        g_log = g_log.permute(3, 1, 2, 0).contiguous()  # [j, n, T, i]
        tk = t.view(K, N, K, a)
        grads.att_w2[sl] += torch.einsum("jnti,jnia->tia", g_log, tk)
        dsc = self.squash_grad(tk).mul_(self.w2).unsqueeze(2)  # d logits / d u: task-independent
        g_u = torch.mul(g_log.unsqueeze(-1), dsc, out=buf("gU", (K, N, T, K, a), g_e))  # [j, n, T, i, a]
        grads.att_w1[sl] += (h.view(K * N, d).T @ g_u.view(K * N, T * K * a)).view(d, T, K, a).permute(1, 2, 0, 3)
        w1 = self.w1.permute(1, 0, 2).reshape(d, K * a)
        out.view(K * N * T, d).addmm_(g_u.view(K * N * T, K * a), w1.T)
        return out

    def forward_target(self, h: torch.Tensor, base: "Propagation", l: int, e: torch.Tensor) -> tuple:
        K = self.K
        hm, lm = base.layers[l].h, base.layers[l].cdm[2]
        t = self.squash_(h[0] @ self.w1[K - 1])  # [N, a]
        att = torch.softmax(torch.cat([lm[:K - 1, :, K - 1], (t @ self.w2[K - 1]).unsqueeze(0)], 0), dim=0)
        torch.mul(h[0], att[K - 1, :, None], out=e[0])
        for j in range(K - 1):
            e[0].addcmul_(hm[j], att[j, :, None])
        return t, att

    def backward_target(self, g_e: torch.Tensor, h: torch.Tensor, saved: tuple, base: "Propagation", l: int,
                        grads: Grads, sl: slice, extra: "ViewCotangents") -> torch.Tensor:
        """g_e [1, N, 1, d] (scaled in place to g_h); the cotangents of the main propagation's
        h_j and logits go to ``extra``."""
        K = self.K
        t, att = saved
        g, hm, h0 = g_e[0, :, 0], base.layers[l].h, h[0]
        g_att = torch.stack([(g * hm[j]).sum(-1) for j in range(K - 1)] + [(g * h0).sum(-1)], 0)
        g_log = att * (g_att - (att * g_att).sum(0, keepdim=True))  # [j, N]
        extra.add(l, att[:K - 1].unsqueeze(-1) * g, g_log[:K - 1])
        grads.att_w2[sl, K - 1] += t.T @ g_log[K - 1]
        g_u = g_log[K - 1].unsqueeze(-1) * self.w2[K - 1] * self.squash_grad(t)  # [N, a]
        grads.att_w1[sl, K - 1] += h0.T @ g_u
        g.mul_(att[K - 1].unsqueeze(-1)).addmm_(g_u, self.w1[K - 1].T)
        return g_e


@dataclass
class ViewCotangents:
    """What target views send back to the main propagation, per layer: cotangents of its
    auxiliary h_j ([K-1, N, d]) and of its target-column logits ([K-1, N]), for one task."""

    L: int
    task: int = 0
    h: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.h, self.logits = [None] * self.L, [None] * self.L

    def add(self, l: int, h: torch.Tensor, logits: torch.Tensor) -> None:
        self.h[l] = h if self.h[l] is None else self.h[l].add_(h)
        self.logits[l] = logits.clone() if self.logits[l] is None else self.logits[l].add_(logits)


def relation_chain(r0: torch.Tensor, W_rel: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[r^0, ..., r^L] with r^{l+1} = r^l W_rel^l (each [K, d])."""
    r = [r0]
    for W in W_rel:
        r.append(r[-1] @ W)
    return r


def relation_chain_backward(rel: Sequence[torch.Tensor], W_rel: Sequence[torch.Tensor], g_readout, g_layers):
    """Reverse pass of :func:`relation_chain` with cotangent ``g_readout / (L + 1)`` on every r^l
    (the relation readout is their mean) and ``g_layers[l]`` on r^l, l < L (from the layers).
    Returns (grad of r^0, [grad of W_rel^l]); None where unused."""
    L = len(W_rel)
    direct = None if g_readout is None else g_readout / (L + 1)
    C = direct  # cotangent of r^L
    g_wr: list = [None] * L
    for l in reversed(range(L)):
        c = direct
        if g_layers is not None:
            c = g_layers[l].clone() if c is None else c + g_layers[l]
        if C is not None:
            g_wr[l] = rel[l].T @ C
            c = C @ W_rel[l].detach().T if c is None else c + C @ W_rel[l].detach().T
        C = c
    return C, g_wr


# ----------------------------------------------------------------------------- propagation
@dataclass
class Layer:
    m: torch.Tensor  # messages [K, N, d]
    h: torch.Tensor  # activation output (pre-CDM)
    mask: torch.Tensor | None  # dropout multipliers
    cdm: tuple = ()  # what the CDM's reverse pass needs


class Propagation:
    """The K-behavior propagation over ``adjs`` (or, with ``base``, a target view: the target
    behavior over one view graph, auxiliary h_j from ``base``) with a batched reverse pass.
    ``tag`` names its workspace buffers (each propagation of a step needs its own)."""

    def __init__(self, model, adjs: Sequence[Adjacency], comm: Comm, tag: str = "main",
                 base: "Propagation | None" = None, ws: Workspace | None = None) -> None:
        self.model, self.comm, self.base, self.tag = model, comm, base, tag
        # training reuses the model's workspace (one per model object, so per rank)
        self.ws = ws if ws is not None else model.__dict__.setdefault("_workspace", Workspace())
        self.msg = Messages(adjs, model, comm, self._buf)
        self.n_loc = model.n_users + self.msg.S  # rows of the layer stacks
        self.cdm = CDM(model) if model.use_cdm and (base is None or model.n_behaviors > 1) else None
        self.layers: list[Layer] = []

    def _buf(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        return self.ws.get(f"{self.tag}/{name}", shape, like)

    @torch.no_grad()
    def forward(self, rel: Sequence[torch.Tensor], ego0: torch.Tensor, generator=None) -> torch.Tensor:
        """rel: r^0..r^{L-1} ([K, d]); ego0: [n_u + n_i, d]; dropout masks from ``generator``
        (training mode only). Returns the readout [K', n_u + n_i, d] (K' = 1 for a view)."""
        m, view = self.model, self.base is not None
        Kp, L, d, N, n_u = len(self.msg.ops), m.n_layers, m.dim, self.n_loc, m.n_users
        self.rel = [(r[-1:] if view else r).detach() for r in rel]
        self.layers = []
        x_u, x_i, pending, acc = ego0[:n_u], ego0[n_u:], [], None
        for l in range(L):
            msg = self.msg.forward(x_u, x_i, l == 0, self._buf(f"m{l}", (Kp, N, d), ego0), pending)
            h = Transform.forward(msg, self.rel[l], m.W_gc[l].detach(), self._buf(f"h{l}", (Kp, N, d), ego0))
            e = self._buf(f"e{l % 2}", (Kp, N, d), ego0)
            saved = () if self.cdm is None else \
                self.cdm.forward_target(h, self.base, l, e) if view else self.cdm.forward(h, e, self._buf, l)
            if self.cdm is None:
                e.copy_(h)
            mask = m.drop_mask((Kp,), generator, self.comm, e.dtype, e.device, out=self._buf(f"mask{l}", (Kp, N, d), e))
            if mask is not None:
                e.mul_(mask)
            self.layers.append(Layer(msg, h, mask, saved))
            acc = self._buf("acc", (Kp, N, d), ego0).copy_(e) if acc is None else acc.add_(e)
            if l < L - 1:
                x_u = e[:, :n_u]
                x_i, pending = self.msg.gather(e[:, n_u:], "x_items", async_op=True)
        if acc is None:
            return ego0.unsqueeze(0).expand(Kp, -1, d).clone()
        return readout(acc, ego0, L, self.msg)

    @torch.no_grad()
    def backward(self, g_out: torch.Tensor, into: Grads | None = None, task: int | None = None,
                 views: ViewCotangents | None = None) -> Grads:
        """g_out: [K', n_u + n_i, T, d] cotangents of the readout (the caller's scratch: scaled
        in place). Adds the parameter cotangents into ``into`` (new zeros when None) at every
        task slot, or at slot ``task``. The main propagation takes the views' cotangents
        ``views``; a target view fills them.

        Per layer, in reverse: g_e = (g_acc + g_next) ⊙ mask; CDM; g_z = g_h ⊙ act'; the layer's
        parameter cotangents; g_m = g_z Wpᵀ; and the SpMMs write the next g_e straight into a
        buffer pre-filled with g_acc (scipy's kernel accumulates)."""
        m, view = self.model, self.base is not None
        Kp, L, n_u, n_i, N = g_out.shape[0], m.n_layers, m.n_users, m.n_items, self.n_loc
        T, d = g_out.shape[2], g_out.shape[3]
        into = Grads.zeros(m, T, n_u + n_i, g_out) if into is None else into
        sl = slice(None) if task is None else slice(task, task + 1)
        g_acc, g_ego_i = readout_backward(g_out.div_(L + 1), self.msg, self._buf)
        g_e = self._buf("gE", (Kp, N, T, d), g_out).copy_(g_acc)
        for l in reversed(range(L)):
            lay = self.layers[l]
            if lay.mask is not None:
                g_e.mul_(lay.mask.unsqueeze(2))
            if self.cdm is None:
                g_h = g_e
            elif view:
                g_h = self.cdm.backward_target(g_e, lay.h, lay.cdm, self.base, l, into, sl, views)
            else:
                g_h = self.cdm.backward(g_e, lay.h, lay.cdm, self._buf("gH", (Kp, N, T, d), g_out), into, sl,
                                        views.logits[l] if views else None, views.task if views else 0, self._buf)
            if views is not None and not view and views.h[l] is not None:
                g_h[:Kp - 1, :, views.task] += views.h[l]
            g_m, g_W, g_r = Transform.backward(g_h, lay.h, lay.m, self.rel[l], m.W_gc[l].detach(), self._buf, view)
            into.W_gc[l, sl] += g_W
            into.rel[l, sl, slice(m.n_behaviors - 1, None) if view else slice(None)] += g_r
            g_e.copy_(g_acc)  # = g_acc + Âᵀ g_m below
            self.msg.backward(g_m.view(Kp, N, T * d), g_e.view(Kp, N, T * d),
                              g_ego_i.view(n_i, T * d) if l == 0 else None)
        into.ego[:n_u, sl] += g_e[:, :n_u].sum(0)
        into.ego[n_u:, sl] += g_ego_i
        return into
