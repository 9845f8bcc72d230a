"""One MBSSL training step: the propagations, the task losses, one batched reverse pass for all
tasks, HMG, Adam.

Per step (K behaviors, L layers, N = local users + items, B batch users, d = 64): the main
propagation over all K behaviors (per layer K SpMM pairs, one [N·K, d]x[d, d] matmul, the CDM);
two intra views propagated for the target behavior only (``view_propagation = "target"``, the
auxiliary h_j come from the main propagation); the losses (non-sampling O((B + |I|)·K·d²), each
InfoNCE side one logits matrix of unique anchors x candidates; the reference repeats a user once
per purchased item, a weighted unique anchor is the same sum); then the per-task cotangents of
the propagation outputs (autograd over the small loss graphs) go through ONE reverse pass.
The decay term ``reg`` is added outside HMG, as in the reference (``metabalance.step([...])``
then ``batch_emb_loss.backward()``). Randomness: :func:`make_generator` keyed by (seed, epoch,
step, stream), so all ranks and re-runs draw the same dropout masks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..config import HMGConfig, LossConfig, TrainConfig
from ..model.mbssl import MBSSL
from ..model.propagation import Adjacency, Grads, Propagation, ViewCotangents, relation_chain_backward
from ..parallel.comm import Comm, LocalComm
from ..utils.seeding import make_generator
from .batch import Batch
from .losses import InteractionTerms, InterBehaviorInfoNCE, IntraBehaviorInfoNCE, NegativeSampler, NonSamplingLoss
from .optimizer import TrainState

ReduceGrads = Callable[[list, list], list]


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


@dataclass
class Forward:
    """What the reverse pass needs from :meth:`TrainStep.forward`: the propagations and the
    detached leaves (their outputs) the losses were built on."""

    main: Propagation
    views: list[Propagation]
    users: torch.Tensor  # [n_u, K, d]
    items: torch.Tensor  # [n_i, K, d]
    view_out: list[torch.Tensor]  # [n_u + n_i, d] per view
    relations: torch.Tensor  # [K, d]
    rel: list[torch.Tensor]  # r^0..r^L


class TrainStep:
    """Callable doing one optimization step, built from the config sections. Tasks: ``rec``,
    ``intra`` (unless ``loss.use_intra`` is off), ``inter_<behavior>`` per auxiliary behavior
    (unless ``loss.use_inter`` is off).

    reduce_grads(grads, sharded_flags) -> grads: hook of the distributed layer, called once per
    task with that task's gradients (None for unused); it all-reduces the replicated tensors'
    gradients (sharded ones stay local). Identity by default."""

    def __init__(self, model: MBSSL, loss: LossConfig, hmg: HMGConfig, train: TrainConfig,
                 comm: Comm | None = None, aux_names: Sequence[str] | None = None,
                 reduce_grads: ReduceGrads | None = None) -> None:
        self.model, self.loss = model, loss
        self.comm = comm or LocalComm()
        self.reduce_grads = reduce_grads
        K = model.n_behaviors
        c_neg = loss.neg_weight if len(loss.neg_weight) > 1 else loss.neg_weight[0]
        self.rec_loss = NonSamplingLoss(list(loss.lambdas) or [1.0 / K] * K, c_neg, loss.decay)
        self.inter_loss = InterBehaviorInfoNCE(loss.tau, loss.fn_mode)
        self.intra_loss = IntraBehaviorInfoNCE(loss.tau)
        self.inter_loss.negative_estimator = self.intra_loss.negative_estimator = loss.negative_estimator
        self.inter_loss.in_batch_negatives = self.intra_loss.in_batch_negatives = loss.in_batch_negatives
        names = list(aux_names) if aux_names is not None else [str(k) for k in range(K - 1)]
        if len(names) != K - 1:
            raise ValueError(f"aux_names {names}: expected {K - 1} auxiliary behaviors")
        self.inter_tasks = [f"inter_{n}" for n in names]
        self.tasks = ["rec"] + (["intra"] if loss.use_intra else []) + (self.inter_tasks if loss.use_inter else [])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sharded = [p is model.user_embedding for p in self.params]
        self.state = TrainState.build(self.params, len(self.tasks), train, hmg)
        # loss.negatives = "sampled": (user, item) interaction counts for the popularity sampler
        # (global ids; set by the trainer), the samplers built on first use
        self.popularity: tuple[torch.Tensor, torch.Tensor] | None = None
        self._samplers: tuple[NegativeSampler, NegativeSampler] | None = None
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

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Batch, adjs: Sequence[Adjacency], view_adjs: Sequence[Adjacency] | None,
                generator: torch.Generator) -> tuple[dict[str, torch.Tensor], Forward]:
        """Propagations without autograd; the losses are autograd graphs over detached leaves of
        their outputs."""
        m, comm = self.model, self.comm
        K, L, n_u = m.n_behaviors, m.n_layers, m.n_users
        self._tick(None)
        with torch.no_grad():
            rel = m.relation_layers()
        ego0 = torch.cat([m.user_embedding.detach(), m.item_embedding.detach()], 0)
        main = Propagation(m, adjs, comm)
        out = main.forward(rel[:L], ego0, generator)  # [K, N, d]
        users = out[:, :n_u].permute(1, 0, 2).detach().requires_grad_()
        items = out[:, n_u:].permute(1, 0, 2).detach().requires_grad_()
        relations = torch.stack(rel, 0).mean(0).requires_grad_()
        self._tick("fwd/main")
        props, views = [], []
        if self.loss.use_intra:
            if view_adjs is None or len(view_adjs) != 2:
                raise ValueError("intra SSL needs two view adjacencies of the target behavior")
            full = self.loss.view_propagation == "full"  # else "target" (config-validated)
            for i, va in enumerate(view_adjs):
                props.append(Propagation(m, list(adjs[:-1]) + [va], comm, f"view{i}") if full else
                             Propagation(m, [va], comm, f"tview{i}", base=main))
                views.append(props[-1].forward(rel[:L], ego0, generator)[K - 1 if full else 0])
            views = [v.detach().requires_grad_() for v in views]
            self._tick("fwd/views")
        return self.losses(users, items, relations, views, batch), Forward(main, props, users, items, views,
                                                                            relations, rel)

    def negative_samples(self) -> tuple:
        """This step's sampled (user side, item side) candidates, or (None, None) in exact mode:
        drawn from (seed, epoch, step, "negatives"), so every rank draws the same ids."""
        lo, m = self.loss, self.model
        if lo.negatives != "sampled":
            return None, None
        if self._samplers is None:
            pop = lo.negative_sampler == "popularity"
            if pop and self.popularity is None:
                raise ValueError("negative_sampler = 'popularity' needs TrainStep.popularity (user, item counts)")
            uc, ic = self.popularity if pop else (None, None)
            self._samplers = (NegativeSampler(m.n_users_global, lo.n_negatives, lo.negative_sampler, uc),
                              NegativeSampler(m.n_items, lo.n_negatives, lo.negative_sampler, ic))
        st = self.state
        g = make_generator(st.seed, st.epoch, st.step, "negatives")
        return tuple(s.draw(g) for s in self._samplers)

    def losses(self, users: torch.Tensor, items: torch.Tensor, relations: torch.Tensor,
               views: Sequence[torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Task losses from the propagated users [n_u, K, d], items [n_i, K, d], relation readout
        [K, d] and the two intra views ([n_u + n_i, d] each)."""
        m, lo, comm = self.model, self.loss, self.comm
        K, n_u = m.n_behaviors, m.n_users
        self._tick(None)
        inter_terms = None
        if m.interaction_scoring:
            s_pos = None if batch.pos_indicators is None else m.interaction_term(batch.pos_indicators, batch.pos[-1][1])
            s_supp = None if batch.supp_indicators is None else m.interaction_term(batch.supp_indicators,
                                                                                   batch.supp_items)
            inter_terms = InteractionTerms(m.item_bias, s_pos, batch.supp_rows, batch.supp_items, s_supp)
        elif m.use_item_bias:
            inter_terms = InteractionTerms(m.item_bias)
        rec, reg, _ = self.rec_loss(users[batch.users], items, relations, batch.pos, comm, inter_terms)
        losses = {"rec": rec}
        self._tick("loss/rec")
        samples = self.negative_samples()
        if lo.use_intra:
            v1, v2 = views
            losses["intra"] = self.intra_loss(v1[:n_u], v2[:n_u], batch.user_anchors, v1[n_u:], v2[n_u:],
                                              batch.item_anchors, comm, m.user_ids, lo.intra_weight, samples)
            self._tick("loss/intra")
        if lo.use_inter:
            for k in range(K - 1):
                losses[self.inter_tasks[k]] = self.inter_loss(users[:, K - 1], users[:, k], batch.user_anchors,
                                                              items[:, K - 1], items[:, k], batch.item_anchors,
                                                              comm, m.user_ids, lo.inter_weight, samples)
                self._tick(f"loss/inter_{k}")
        losses["reg"] = reg
        return losses

    # ------------------------------------------------------------------ reverse
    def task_grads(self, losses: dict[str, torch.Tensor], fw: Forward) -> dict[str, list]:
        """Per-task gradients of every parameter (None where unused): the cotangents of the
        propagation outputs per task, then ONE batched reverse pass for all tasks."""
        m = self.model
        K, L, d, n_u = m.n_behaviors, m.n_layers, m.dim, m.n_users
        names = self.tasks + ["reg"]
        T, N = len(names), fw.users.shape[0] + fw.items.shape[0]
        direct = [(n, p) for n, p in zip(self.param_names, self.params)
                  if n in ("behavior_weight", "item_bias", "behavior_item_weight")]
        leaves = [fw.users, fw.items] + list(fw.view_out) + [fw.relations] + [p for _, p in direct]
        nv = len(fw.view_out)
        # the reverse pass's input stack: a reused workspace buffer (a fresh one pays page faults)
        g_out = fw.main.ws.get("g_out", (K, N, T, d), fw.users).zero_()
        touch, touch_view, g_rel, g_direct, g_views = [False] * T, [False] * T, [None] * T, [()] * T, [None] * T
        self._tick(None)
        for t, n in enumerate(names):
            if not losses[n].requires_grad:
                continue
            g = torch.autograd.grad(losses[n], leaves, retain_graph=t < T - 1, allow_unused=True)
            gu, gi, g_rel[t], g_direct[t] = g[0], g[1], g[2 + nv], g[3 + nv:]
            if gu is not None:
                g_out[:, :n_u, t] = gu.permute(1, 0, 2)
            if gi is not None:
                g_out[:, n_u:, t] = gi.permute(1, 0, 2)
            touch[t] = gu is not None or gi is not None
            if any(x is not None for x in g[2:2 + nv]):
                touch_view[t], g_views[t] = True, g[2:2 + nv]
        self._tick("bwd/losses")
        back, vg = ViewCotangents(L), None
        vt = [t for t in range(T) if touch_view[t]]
        for t in vt:
            vg = vg if vg is not None else Grads.zeros(m, T, N, fw.users)
            for prop, gv in zip(fw.views, g_views[t]):
                if gv is None:
                    continue
                if prop.base is not None:
                    if len(vt) > 1:
                        raise NotImplementedError("target-mode views feed one task only")
                    back.task = t
                    prop.backward(gv.view(1, N, 1, d), vg, t, back)
                else:
                    go = gv.new_zeros(K, N, 1, d)
                    go[K - 1, :, 0] = gv
                    prop.backward(go, vg, t)
        if vt:
            self._tick("bwd/views")
        tg = fw.main.backward(g_out, views=back)
        if vg is not None:
            tg.add_(vg)
        self._tick("bwd/main")
        full_views = self.loss.view_propagation == "full"
        out: dict[str, list] = {}
        for t, n in enumerate(names):
            used = touch[t] or touch_view[t]
            gd: dict[str, torch.Tensor | None] = {}
            if used:
                gd["user_embedding"], gd["item_embedding"] = tg.ego[:n_u, t].clone(), tg.ego[n_u:, t].clone()
                gd.update({f"W_gc.{l}": tg.W_gc[l, t].clone() for l in range(L)})
            if m.use_cdm and (touch[t] or (touch_view[t] and (K > 1 or full_views))):
                gd["att_w1"], gd["att_w2"] = tg.att_w1[t].clone(), tg.att_w2[t].clone()
            gd["relation_embedding"], g_wr = relation_chain_backward(fw.rel, m.W_rel, g_rel[t],
                                                                     tg.rel[:, t] if used else None)
            gd.update({f"W_rel.{l}": g for l, g in enumerate(g_wr)})
            gd.update((pn, g) for (pn, _), g in zip(direct, g_direct[t]))
            out[n] = [gd.get(pn) for pn in self.param_names]
        self._tick("bwd/assemble")
        return out

    # ------------------------------------------------------------------ the step
    def __call__(self, batch: Batch, adjs: Sequence[Adjacency],
                 view_adjs: Sequence[Adjacency] | None = None) -> StepResult:
        st = self.state
        self.model.train()
        losses, fw = self.forward(batch, adjs, view_adjs, make_generator(st.seed, st.epoch, st.step, "dropout"))
        # global values for reporting / finiteness (sum over ranks; one collective)
        names = self.tasks + ["reg"]
        vals = torch.stack([losses[n].detach().to(torch.float64) for n in names])
        if self.comm.world_size > 1:
            vals = self.comm.all_reduce_sum_(vals.clone())
        for n, v in zip(names, vals.tolist()):
            if not math.isfinite(v):
                raise NonFiniteLossError(n, v)
        raw = self.task_grads(losses, fw)
        del fw
        grads = {n: list(g) if self.reduce_grads is None else list(self.reduce_grads(list(g), list(self.sharded)))
                 for n, g in raw.items()}
        self._tick("reduce")
        combined, stats = st.hmg.combine([grads[n] for n in self.tasks], self.sharded, self.comm)
        self._tick("hmg")
        for p, c, r in zip(self.params, combined, grads["reg"]):
            p.grad = None if c is None and r is None else r.detach().clone() if c is None else \
                c if r is None else c.add_(r)
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        self._tick("adam")
        st.step += 1
        stats = {k: v for k, v in stats.items() if k not in ("alpha", "gamma")}
        stats["aux_tasks"] = self.tasks[1:]
        return StepResult({n: float(v) for n, v in zip(names, vals.tolist())}, stats, list(self.tasks))
