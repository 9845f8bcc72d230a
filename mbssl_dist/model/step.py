"""One MBSSL training step: one forward, per-task gradients, HMG, Adam.

Per step (K behaviors, L layers, N = local users + items, B batch users, P = batch positive
pairs, d = 64):

* main propagation over all K behaviors: per layer K SpMM pairs + one [N·K, d]x[d, d] matmul
  + the CDM ([N·K, d]x[d, K·16]) -- O(L·(nnz·d + N·K·d² + N·K²·d·16));
* two intra views propagated for the *target behavior only* (``view_mode="target"``, the
  auxiliary h_j come from the main propagation): per view and layer one SpMM pair over the
  target view + one [N, d]x[d, d] matmul + the target row of the CDM;
* losses: non-sampling O((B + |I|)·K·d² + P·d); each InfoNCE side has one logits matrix of
  unique anchors x candidates (B x n_users, |items of the batch| x n_items); the reference
  repeats every user once per purchased item (P x n_users) -- a weighted unique anchor is the
  same sum;
* one backward per task (rec, intra, inter_1..K−1) plus one for the decay term (the reference
  also keeps the decay outside HMG), each through the shared graph.

All randomness comes from :func:`make_generator` keyed by (seed, epoch, step, stream), so all
ranks and all re-runs draw the same dropout masks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..graph import view_keep
from ..graph.sparse import csr_rows, csr_rows_table
from ..parallel.comm import Comm, LocalComm
from .hmg import HMG
from .losses import (Anchors, InteractionTerms, InterBehaviorInfoNCE, IntraBehaviorInfoNCE, NonSamplingLoss)
from .mbssl import MBSSL, Adjacency
from ..utils.seeding import make_generator
from .tape import MainTape, ViewTape, add_grads, workspace, zero_grads

ReduceGrads = Callable[[list, list], list]


# ------------------------------------------------------------------------------ batches
@dataclass
class Batch:
    """One rank's share of a training batch.

    users: local user rows; pos[k] = (row into ``users``, item) of behavior k's positives;
    user_anchors / item_anchors: SSL anchors (reference: every (user, purchased item) pair →
    users weighted by their target-positive count, purchased items with multiplicity), with
    false-negative rows attached; interaction: indicator inputs for interaction scoring."""

    users: torch.Tensor
    pos: list[tuple[torch.Tensor, torch.Tensor]]
    user_anchors: Anchors
    item_anchors: Anchors
    pos_indicators: torch.Tensor | None = None  # [nnz_target_pos, K]
    supp_rows: torch.Tensor | None = None
    supp_items: torch.Tensor | None = None
    supp_indicators: torch.Tensor | None = None  # [n_supp, K]

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor (anchors and false-negative tables included) on ``device``."""
        return _to_device(self, torch.device(device))


def _to_device(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(x, device) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj)})
    return obj


def build_batch(csr: Sequence[tuple[torch.Tensor, torch.Tensor]], users: torch.Tensor, n_items: int,
                user_ids: torch.Tensor | None = None,
                user_fn: tuple[torch.Tensor, torch.Tensor] | None = None,
                item_fn: tuple[torch.Tensor, torch.Tensor] | None = None,
                interaction: bool = False, interaction_include_target: bool = False) -> Batch:
    """Build a :class:`Batch` from the local per-behavior user->item CSR (indptr, indices).

    users: local rows of the batch users on this rank. user_ids: global ids of all local rows
    (None = identity). user_fn: FN table indexed by *local* user row, global user ids as
    values; item_fn: FN table over all items."""
    users = users.to(torch.int64)
    K = len(csr)
    pos = [csr_rows(ip.to(torch.int64), ix.to(torch.int64), users) for ip, ix in csr]
    t_rows, t_items = pos[-1]
    u_w = torch.bincount(t_rows, minlength=users.numel()).to(torch.float64)
    keep = u_w > 0
    u_rows = users[keep]
    gids = u_rows if user_ids is None else user_ids[u_rows]
    fptr, fidx = csr_rows_table(user_fn, u_rows)
    user_anchors = Anchors(u_rows, u_w[keep], gids, fptr, fidx)
    items, i_w = torch.unique(t_items, return_counts=True)
    iptr, iidx = csr_rows_table(item_fn, items)
    item_anchors = Anchors(items, i_w.to(torch.float64), items, iptr, iidx)
    b = Batch(users, pos, user_anchors, item_anchors)
    if interaction:
        keys = [r * n_items + i for r, i in pos]
        skeys = [torch.sort(kk)[0] for kk in keys]
        cand = [kk for k, kk in enumerate(keys) if k < K - 1 or interaction_include_target]
        supp = torch.unique(torch.cat(cand)) if cand else torch.zeros(0, dtype=torch.int64)

        def ind(q: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.isin(q, sk).to(torch.float64) for sk in skeys], 1) if q.numel() else \
                torch.zeros(0, K, dtype=torch.float64)

        b.pos_indicators = ind(keys[-1])
        b.supp_rows = supp // n_items
        b.supp_items = supp % n_items
        b.supp_indicators = ind(supp)
    return b


def make_views(graph, mode: str, p: float, seed: int, epoch: int, norm: str = "sym",
               dtype: torch.dtype = torch.float32, device="cpu") -> list[Adjacency]:
    """Two random views of a whole target ``BehaviorGraph`` (one process) as (A_ui, A_iu)
    pairs, renormalized on the view: the same keep decisions as the trainer's
    ``parallel.layout.target_views`` (``graph.view_keep``)."""
    rows, items = graph.rows().numpy(), graph.indices.numpy()
    return [graph.subgraph_edges(torch.from_numpy(view_keep(rows, items, graph.n_users, graph.n_items, mode, p,
                                                            seed, epoch, view))).adjacency(norm, dtype, device)
            for view in range(2)]


# ------------------------------------------------------------------------------ state
@dataclass
class TrainConfig:
    rec_weights: Sequence[float]  # λ_k per behavior (target last)
    c_neg: float | Sequence[float] = 0.1
    decay: float = 10.0
    tau: float = 0.5
    intra_weight: float = 1.0  # reference ssl_reg
    inter_weights: Sequence[float] | None = None  # per auxiliary behavior, reference ssl_reg_inter (default 1)
    use_intra: bool = True
    use_inter: bool = True
    fn_mode: str = "remove"
    view_mode: str = "target"  # 'target' (fast) or 'full' (reference)
    item_extra_zero_logits: int = 0  # 1 = the reference's zero token item row
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 2020
    hmg_strategy: str = "hmg"
    hmg_relax: float = 0.7
    hmg_beta: float = 0.9
    hmg_use_ema: bool = True
    aux_names: Sequence[str] | None = None  # auxiliary behaviors' names: tasks inter_<name> (else inter_<k>)


class TrainState:
    """Everything optimizer-side that a checkpoint needs: Adam, HMG EMA norms, epoch, step, seed."""

    def __init__(self, optimizer: torch.optim.Optimizer, hmg: HMG, seed: int, epoch: int = 0, step: int = 0) -> None:
        self.optimizer = optimizer
        self.hmg = hmg
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.step = int(step)  # global step counter (not reset per epoch)

    def state_dict(self) -> dict:
        # deep copy: the optimizer's state tensors are updated in place by later steps
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "hmg": self.hmg.state_dict(), "seed": self.seed,
                "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.hmg.load_state_dict(sd["hmg"])
        self.seed = int(sd["seed"])
        self.epoch = int(sd["epoch"])
        self.step = int(sd["step"])


@dataclass
class StepResult:
    losses: dict[str, float]
    hmg: dict
    tasks: list[str] = field(default_factory=list)


class NonFiniteLossError(FloatingPointError):
    def __init__(self, task: str, value: float) -> None:
        super().__init__(f"non-finite loss in task {task!r}: {value}")
        self.task = task
        self.value = value


class TrainStep:
    """Callable doing one optimization step. Tasks: ``rec`` (target), ``intra`` (unless
    ``use_intra`` is off), ``inter_k`` per auxiliary behavior (unless ``use_inter`` is off);
    the decay term ``reg`` is added to the combined gradient outside HMG, as in the reference
    (``MBSSL.py``: ``metabalance.step([...])`` then ``batch_emb_loss.backward()``).

    reduce_grads(grads, sharded_flags) -> grads: hook of the distributed layer, called once per
    task with the list of that task's gradients (None for unused); it must all-reduce the
    replicated tensors' gradients (sharded ones stay local). Identity by default."""

    def __init__(self, model: MBSSL, config: TrainConfig, comm: Comm | None = None,
                 reduce_grads: ReduceGrads | None = None, state: TrainState | None = None) -> None:
        self.model = model
        self.cfg = config
        self.comm = comm or LocalComm()
        self.reduce_grads = reduce_grads
        K = model.n_behaviors
        self.rec_loss = NonSamplingLoss(config.rec_weights, config.c_neg, config.decay)
        self.inter_loss = InterBehaviorInfoNCE(config.tau, config.fn_mode,
                                               item_extra_zero_logits=config.item_extra_zero_logits)
        self.intra_loss = IntraBehaviorInfoNCE(config.tau, item_extra_zero_logits=config.item_extra_zero_logits)
        self.inter_weights = list(config.inter_weights) if config.inter_weights is not None else [1.0] * (K - 1)
        self.tasks = ["rec"]
        if config.use_intra:
            self.tasks.append("intra")
        names = list(config.aux_names) if config.aux_names is not None else [str(k) for k in range(K - 1)]
        if len(names) != K - 1:
            raise ValueError(f"aux_names {names}: expected {K - 1} auxiliary behaviors")
        self.inter_tasks = [f"inter_{n}" for n in names]
        if config.use_inter:
            self.tasks += self.inter_tasks
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sharded = [p is model.user_embedding for p in self.params]
        if state is None:
            opt = torch.optim.Adam(self.params, lr=config.lr, betas=tuple(config.adam_betas))
            hmg = HMG(len(self.tasks), config.hmg_strategy, config.hmg_relax, config.hmg_beta, config.hmg_use_ema)
            state = TrainState(opt, hmg, config.seed)
        self.state = state
        self.fast = True  # batched reverse pass (model/tape.py); False = one autograd pass per task
        self.timings: dict[str, float] | None = None  # set to {} to record per-phase seconds
        self._t_last = 0.0

    def _tick(self, name: str | None) -> None:
        """Phase timer (profiling only): charge the time since the last tick to ``name``."""
        if self.timings is None:
            return
        now = time.perf_counter()
        if name is not None:
            self.timings[name] = self.timings.get(name, 0.0) + now - self._t_last
        self._t_last = now

    def _reduce(self, grads: list) -> list:
        return list(grads) if self.reduce_grads is None else list(self.reduce_grads(list(grads), list(self.sharded)))

    def compute_losses(self, batch: Batch, adjs: Sequence[Adjacency], view_adjs: Sequence[Adjacency] | None,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All task losses through the autograd graph of the model (reference path; the step
        itself uses the equivalent :mod:`.tape` fast path unless ``fast`` is off)."""
        m, cfg, comm = self.model, self.cfg, self.comm
        need_views = cfg.use_intra
        self._tick(None)
        prop = m(adjs, comm, generator, keep_layers=need_views and cfg.view_mode == "target")
        self._tick("fwd/main")
        views = None
        if need_views:
            self._check_views(view_adjs)
            views = m.forward_views(prop, view_adjs, adjs, comm, generator, cfg.view_mode)
            self._tick("fwd/views")
        return self._losses(prop.users, prop.items, prop.relations, views, batch)

    @staticmethod
    def _check_views(view_adjs) -> None:
        if view_adjs is None or len(view_adjs) != 2:
            raise ValueError("intra SSL needs two view adjacencies of the target behavior")

    def _losses(self, users: torch.Tensor, items: torch.Tensor, relations: torch.Tensor,
                views: Sequence[torch.Tensor] | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Task losses from the propagated users [n_u, K, d], items [n_i, K, d], relation
        readout [K, d] and the two intra views ([n_u + n_i, d] each)."""
        m, cfg, comm = self.model, self.cfg, self.comm
        K = m.n_behaviors
        self._tick(None)
        bu = users[batch.users]
        inter_terms = None
        if m.interaction_scoring:
            s_pos = m.interaction_term(batch.pos_indicators, batch.pos[-1][1]) \
                if batch.pos_indicators is not None else None
            s_supp = m.interaction_term(batch.supp_indicators, batch.supp_items) \
                if batch.supp_indicators is not None else None
            inter_terms = InteractionTerms(m.item_bias, s_pos, batch.supp_rows, batch.supp_items, s_supp)
        rec, reg, _ = self.rec_loss(bu, items, relations, batch.pos, comm, inter_terms)
        losses = {"rec": rec}
        self._tick("loss/rec")
        cand_ids = m.user_ids
        if cfg.use_intra:
            v1, v2 = views
            n_u = m.n_users
            losses["intra"] = self.intra_loss(v1[:n_u], v2[:n_u], batch.user_anchors, v1[n_u:], v2[n_u:],
                                              batch.item_anchors, comm, cand_ids, cfg.intra_weight)
            self._tick("loss/intra")
        if cfg.use_inter:
            for k in range(K - 1):
                losses[self.inter_tasks[k]] = self.inter_loss(users[:, K - 1], users[:, k], batch.user_anchors,
                                                       items[:, K - 1], items[:, k], batch.item_anchors,
                                                       comm, cand_ids, self.inter_weights[k])
                self._tick(f"loss/inter_{k}")
        losses["reg"] = reg
        return losses

    # ------------------------------------------------------------------ fast path
    def _fast_forward(self, batch: Batch, adjs: Sequence[Adjacency], view_adjs, generator):
        """Forward through :mod:`.tape` (no autograd through the propagation); the losses are
        autograd graphs over detached leaves of the propagation outputs."""
        m, cfg, comm = self.model, self.cfg, self.comm
        K, L = m.n_behaviors, m.n_layers
        n_u = m.n_users
        self._tick(None)
        rel = m.relation_layers()  # autograd (tiny): differentiated by hand in _rel_chain
        ego0 = torch.cat([m.user_embedding.detach(), m.item_embedding.detach()], 0)
        main = MainTape(m, adjs, comm)
        out = main.forward(rel[:L], ego0, generator)  # [K, N, d]
        users = out[:, :n_u].permute(1, 0, 2).detach().requires_grad_()
        items = out[:, n_u:].permute(1, 0, 2).detach().requires_grad_()
        relations = torch.stack(rel, 0).mean(0)
        self._tick("fwd/main")
        vtapes, views = [], None
        if cfg.use_intra:
            self._check_views(view_adjs)
            if cfg.view_mode == "target":
                vtapes = [ViewTape(m, main, va, comm, tag=f"tview{i}") for i, va in enumerate(view_adjs)]
                views = [t.forward(ego0, generator) for t in vtapes]
            elif cfg.view_mode == "full":
                vtapes = [MainTape(m, list(adjs[:-1]) + [va], comm, tag=f"view{i}") for i, va in enumerate(view_adjs)]
                views = [t.forward(rel[:L], ego0, generator)[K - 1] for t in vtapes]
            else:
                raise ValueError(f"unknown view mode {cfg.view_mode!r}")
            views = [v.detach().requires_grad_() for v in views]
            self._tick("fwd/views")
        losses = self._losses(users, items, relations, views, batch)
        ctx = dict(main=main, vtapes=vtapes, users=users, items=items, views=views or [], relations=relations,
                   rel=[r.detach() for r in rel], N=ego0.shape[0])
        return losses, ctx

    def _fast_grads(self, losses: dict, names: list[str], ctx: dict) -> dict[str, list]:
        """Per-task gradients of every parameter: cotangents of the propagation outputs per task
        (autograd over the small loss graphs), then ONE batched reverse pass for all tasks."""
        m, cfg = self.model, self.cfg
        K, L, d = m.n_behaviors, m.n_layers, m.dim
        n_u, N = m.n_users, ctx["N"]
        users, items, views, relations = ctx["users"], ctx["items"], ctx["views"], ctx["relations"]
        direct = [p for p in (m.behavior_weight, m.item_bias, m.behavior_item_weight)
                  if p is not None and p.requires_grad]
        leaves = [users, items] + list(views) + [relations] + direct
        T = len(names)
        dt = users.dtype
        # the reverse pass's input stack: a reused workspace buffer (a fresh one pays page faults)
        g_out = workspace(m).get("g_out", (K, N, T, d), dt, users.device).zero_()
        touch = [False] * T
        touch_view = [False] * T
        g_rel_out: list = [None] * T
        g_direct: list = [[None] * len(direct) for _ in range(T)]
        g_views: list = [None] * T
        self._tick(None)
        for t, n in enumerate(names):
            loss = losses[n]
            if not loss.requires_grad:
                continue
            g = torch.autograd.grad(loss, leaves, retain_graph=t < T - 1, allow_unused=True)
            gu, gi = g[0], g[1]
            gv = g[2:2 + len(views)]
            g_rel_out[t] = g[2 + len(views)]
            g_direct[t] = list(g[3 + len(views):])
            if gu is not None:
                g_out[:, :n_u, t] = gu.permute(1, 0, 2)
            if gi is not None:
                g_out[:, n_u:, t] = gi.permute(1, 0, 2)
            touch[t] = gu is not None or gi is not None
            if any(x is not None for x in gv):
                touch_view[t] = True
                g_views[t] = gv
        self._tick("bwd/losses")
        main: MainTape = ctx["main"]
        extra_h = [None] * L
        extra_logits = [None] * L
        vg = None
        view_task = 0
        vt = [t for t in range(T) if touch_view[t]]
        if vt:
            vg = zero_grads(m, T, N, dt, users.device)
            for t in vt:
                for tape, gv in zip(ctx["vtapes"], g_views[t]):
                    if gv is None:
                        continue
                    if isinstance(tape, ViewTape):
                        if len(vt) > 1:
                            raise NotImplementedError("target-mode views feed one task only")
                        view_task = t
                        tape.backward(gv, extra_h, extra_logits, vg, t)
                    else:
                        go = torch.zeros(K, N, 1, d, dtype=dt, device=users.device)
                        go[K - 1, :, 0] = gv
                        add_grads(vg, tape.backward(go), t)
            self._tick("bwd/views")
        tg = main.backward(g_out, extra_h, extra_logits, view_task)
        if vg is not None:
            add_grads(tg, vg)
        self._tick("bwd/main")
        out: dict[str, list] = {}
        for t, n in enumerate(names):
            used = touch[t] or touch_view[t]
            att_used = m.use_cdm and (touch[t] or (touch_view[t] and (K > 1 or cfg.view_mode == "full")))
            gd: dict[int, torch.Tensor | None] = {}
            if used:
                gd[id(m.user_embedding)] = tg.ego[:n_u, t].clone()
                gd[id(m.item_embedding)] = tg.ego[n_u:, t].clone()
                for l in range(L):
                    gd[id(m.W_gc[l])] = tg.W_gc[l, t].clone()
            if att_used:
                gd[id(m.att_w1)] = tg.att_w1[t].clone()
                gd[id(m.att_w2)] = tg.att_w2[t].clone()
            g_re, g_wr = self._rel_chain(ctx["rel"], g_rel_out[t], tg.rel[:, t] if used else None)
            gd[id(m.relation_embedding)] = g_re
            for l in range(L):
                gd[id(m.W_rel[l])] = g_wr[l]
            for p, g in zip(direct, g_direct[t]):
                gd[id(p)] = g
            out[n] = [gd.get(id(p)) for p in self.params]
        self._tick("bwd/assemble")
        return out

    def _rel_chain(self, rel: list[torch.Tensor], g_readout: torch.Tensor | None, g_layers: torch.Tensor | None):
        """Reverse pass of r^{l+1} = r^l W_rel^l with cotangents g_readout / (L + 1) on every r^l
        (the relation readout is their mean) and g_layers[l] on r^l, l < L (from the layers).
        Returns (grad of r^0 = relation_embedding, [grad of W_rel^l]); None where unused."""
        m = self.model
        L = m.n_layers
        direct = None if g_readout is None else g_readout / (L + 1)
        C = direct  # cotangent of r^L
        g_wr: list = [None] * L
        for l in reversed(range(L)):
            c = direct
            if g_layers is not None:
                c = g_layers[l].clone() if c is None else c + g_layers[l]
            if C is not None:
                W = m.W_rel[l].detach()
                g_wr[l] = rel[l].T @ C
                c = C @ W.T if c is None else c + C @ W.T
            C = c
        return C, g_wr

    def __call__(self, batch: Batch, adjs: Sequence[Adjacency], view_adjs: Sequence[Adjacency] | None = None) -> StepResult:
        st = self.state
        self.model.train()
        gen = make_generator(st.seed, st.epoch, st.step, "dropout")
        if self.fast:
            losses, ctx = self._fast_forward(batch, adjs, view_adjs, gen)
        else:
            losses = self.compute_losses(batch, adjs, view_adjs, gen)
        # global values for reporting / finiteness (sum over ranks; one collective)
        names = self.tasks + ["reg"]
        vals = torch.stack([losses[n].detach().to(torch.float64) for n in names])
        if self.comm.world_size > 1:
            vals = self.comm.all_reduce_sum_(vals.clone())
        for n, v in zip(names, vals.tolist()):
            if not math.isfinite(v):
                raise NonFiniteLossError(n, v)
        grads: dict[str, list] = {}
        if self.fast:
            raw = self._fast_grads(losses, names, ctx)
            del ctx
            for n in names:
                grads[n] = self._reduce(raw[n])
            self._tick("reduce")
        else:
            for idx, n in enumerate(names):
                g = torch.autograd.grad(losses[n], self.params, retain_graph=idx < len(names) - 1, allow_unused=True)
                self._tick(f"bwd/{n}")
                grads[n] = self._reduce(list(g))
                self._tick("reduce")
        combined, stats = st.hmg.combine([grads[n] for n in self.tasks], self.sharded, self.comm)
        self._tick("hmg")
        opt = st.optimizer
        for p, c, r in zip(self.params, combined, grads["reg"]):
            if c is None and r is None:
                p.grad = None
            elif c is None:
                p.grad = r.detach().clone()
            else:
                p.grad = c if r is None else c.add_(r)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._tick("adam")
        st.step += 1
        stats = {k: v for k, v in stats.items() if k not in ("alpha", "gamma")}
        stats["aux_tasks"] = self.tasks[1:]
        return StepResult({n: float(v) for n, v in zip(names, vals.tolist())}, stats, list(self.tasks))
