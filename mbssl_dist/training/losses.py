"""MBSSL losses: non-sampling recommendation loss (EHCF) and the two InfoNCE tasks.

Convention (``parallel/comm.py``): the global loss is the sum over ranks of the local losses.
Every loss here follows it:

* ``NonSamplingLoss``: the positive-pair part and the batch-user decay are local (each rank
  holds its own batch users). The all-pairs c⁻ term uses the all-reduced user Gram
  (autograd-aware) and the local, replicated item Gram; it is computed on every rank and
  scaled by ``1 / world_size`` (so it is counted once, and every rank back-propagates the
  same share into the replicated item rows; the caller's all-reduce of replicated gradients
  sums the shares). The item part of the decay is scaled the same way.
* ``info_nce``: with sharded candidates (users), the anchors of all ranks are all-gathered,
  every rank computes the partial denominators over its own candidates, the partials are
  all-reduced, and each rank's loss counts only its own anchors. With replicated candidates
  (items) every rank computes its own anchors' loss completely and locally.

Denominators are summed as ``exp((s - 1)/τ)`` (cosines are ≤ 1, so no overflow and the shift
is the same constant on every rank) and the shift is added back in the log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.comm import Comm, LocalComm

FN_MODES = ("remove", "reference")


# --------------------------------------------------------------------------- non-sampling
@dataclass
class InteractionTerms:
    """Inputs of the interaction-aware score term for the target behavior's loss.

    item_bias: [n_items] (the model's ``item_bias``).
    s_pos: [nnz_target_pos] the sparse indicator term s_ui on the target positives (aligned
        with ``pos[-1]``).
    supp_rows / supp_items / s_supp: every (batch row, item) pair where s_ui may be non-zero
        (union of the auxiliary supports of the batch users) and s_ui there.
    """

    item_bias: torch.Tensor
    s_pos: torch.Tensor | None = None
    supp_rows: torch.Tensor | None = None
    supp_items: torch.Tensor | None = None
    s_supp: torch.Tensor | None = None


class NonSamplingLoss(nn.Module):
    """EHCF whole-data loss per behavior (paper Eq 10–11; reference ``RecLoss``).

    For behavior k, batch users B, positives P_k = {(u, i)}, user rep p_u = e_{u,k},
    item rep q_i = e_{i,k}, relation r = r_k, ŷ = ⟨p_u, q_i ⊙ r⟩:

        L_k = Σ_{P_k} [(1 − c⁻_k) ŷ² − 2ŷ] + c⁻_k Σ_{m,n} (Σ_{u∈B} p_um p_un)(Σ_{i∈I} q_im q_in) r_m r_n

    which equals the weighted squared error Σ_{u∈B} Σ_{i∈I} c_ui (y_ui − ŷ_ui)² (c = 1 on
    positives, c⁻ elsewhere) minus the constant |P_k|.

    ``forward`` returns (rec, reg): rec = Σ_k λ_k L_k, reg = decay/2 · (Σ_{u∈B,k} ||e_{u,k}||²
    + Σ_{i∈I,k} ||e_{i,k}||²) (the reference regularizes the batch users' and *all* items'
    propagated embeddings of every behavior).
    """

    def __init__(self, weights: Sequence[float], c_neg: float | Sequence[float] = 0.1, decay: float = 10.0) -> None:
        super().__init__()
        self.weights = [float(w) for w in weights]
        K = len(self.weights)
        if isinstance(c_neg, (int, float)):
            c_neg = [float(c_neg)] * K
        self.c_neg = [float(c) for c in c_neg]
        if len(self.c_neg) != K:
            raise ValueError("c_neg must have one entry per behavior")
        self.decay = float(decay)

    def behavior_loss(self, p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, pos_rows: torch.Tensor,
                      pos_items: torch.Tensor, c: float, comm: Comm,
                      inter: InteractionTerms | None = None) -> torch.Tensor:
        ws = comm.world_size
        pr = p * r  # [B, d]
        yhat = (pr[pos_rows] * q[pos_items]).sum(-1)
        if inter is not None:
            yhat = yhat + inter.item_bias[pos_items]
            if inter.s_pos is not None:
                yhat = yhat + inter.s_pos
        pos_term = ((1.0 - c) * yhat.square() - 2.0 * yhat).sum()
        if c == 0.0:
            return pos_term
        if inter is None:
            gu = comm.all_reduce_sum(pr.T @ pr)  # Σ_u (p⊙r)(p⊙r)ᵀ = Gram(p) ∘ r rᵀ
            gq = q.T @ q
            all_term = (gu * gq).sum()
        else:
            # augmented p' = [p ⊙ r, 1], q' = [q, b]: a_ui = p'ᵀ q'
            ones = pr.new_ones(pr.shape[0], 1)
            pa = torch.cat([pr, ones], 1)
            qa = torch.cat([q, inter.item_bias.unsqueeze(1)], 1)
            all_term = (comm.all_reduce_sum(pa.T @ pa) * (qa.T @ qa)).sum()
        loss = pos_term + (c / ws) * all_term
        if inter is not None and inter.s_supp is not None and inter.s_supp.numel() > 0:
            a = (pr[inter.supp_rows] * q[inter.supp_items]).sum(-1) + inter.item_bias[inter.supp_items]
            s = inter.s_supp
            loss = loss + c * (2.0 * a * s + s.square()).sum()
        return loss

    def forward(self, users: torch.Tensor, items: torch.Tensor, relations: torch.Tensor,
                pos: Sequence[tuple[torch.Tensor, torch.Tensor]], comm: Comm | None = None,
                interaction: InteractionTerms | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """users: [B_local, K, d] propagated reps of this rank's batch users; items: [n_items, K, d];
        relations: [K, d]; pos[k] = (rows into the batch, item ids) of behavior k's positives.
        interaction: applied to the target behavior (last) only. Returns (rec, reg, per-behavior L_k)."""
        comm = comm or LocalComm()
        K = users.shape[1]
        if len(pos) != K or len(self.weights) != K:
            raise ValueError(f"need {K} behaviors of positives and weights")
        per = []
        rec = users.new_zeros(())
        for k in range(K):
            if self.weights[k] == 0.0:
                per.append(users.new_zeros(()))
                continue
            lk = self.behavior_loss(users[:, k], items[:, k], relations[k], pos[k][0], pos[k][1], self.c_neg[k], comm,
                                    interaction if k == K - 1 else None)
            per.append(lk)
            rec = rec + self.weights[k] * lk
        reg = 0.5 * self.decay * (users.square().sum() + items.square().sum() / comm.world_size)
        return rec, reg, per


# --------------------------------------------------------------------------- InfoNCE core
@dataclass
class Anchors:
    """Anchors of one InfoNCE side on this rank.

    rows: local row index of each anchor into the anchor/positive tensors.
    weight: multiplicity of each anchor (the reference repeats a user once per purchased item;
        a weighted unique anchor is the same sum at a fraction of the cost). None = 1.
    ids: global id of each anchor in the candidate id space (default: ``rows``); used to keep
        the positive itself out of the removed false negatives.
    fn_indptr / fn_indices: false negatives of each anchor, CSR over anchors, global
        candidate ids (``fn_indices[fn_indptr[a]:fn_indptr[a+1]]`` = FN(anchor a)).
    """

    rows: torch.Tensor
    weight: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    fn_indptr: torch.Tensor | None = None
    fn_indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.rows.numel())

    def global_ids(self) -> torch.Tensor:
        return self.rows if self.ids is None else self.ids


def _fn_pairs(anchors: Anchors) -> tuple[torch.Tensor, torch.Tensor] | None:
    if anchors.fn_indptr is None or anchors.fn_indices is None:
        return None
    counts = anchors.fn_indptr[1:] - anchors.fn_indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(len(anchors), device=counts.device), counts)
    return rows, anchors.fn_indices.to(torch.int64)


def _lookup(candidate_ids: torch.Tensor | None, n_cand: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local candidate column of each global id and whether it is held here."""
    if candidate_ids is None:
        ok = (ids >= 0) & (ids < n_cand)
        return ids.clamp(0, max(n_cand - 1, 0)), ok
    sorted_ids, order = torch.sort(candidate_ids)
    pos = torch.searchsorted(sorted_ids, ids).clamp(max=max(n_cand - 1, 0))
    ok = sorted_ids[pos] == ids if n_cand > 0 else torch.zeros_like(ids, dtype=torch.bool)
    return order[pos], ok


_CHUNK_ELEMS = 1 << 21  # logits entries materialized at once (8 MiB in float32)


def _row_chunks(A: int, C: int, rows: torch.Tensor | None):
    """(start, end, slice of the row-sorted FN pairs) of every row chunk of an [A, C] matrix."""
    step = max(1, _CHUNK_ELEMS // max(C, 1))
    for s in range(0, A, step):
        e = min(A, s + step)
        sel = None
        if rows is not None:
            lo, hi = torch.searchsorted(rows, torch.tensor([s, e], dtype=rows.dtype, device=rows.device)).tolist()
            sel = slice(lo, hi)
        yield s, e, sel


_UNSHIFTED_MAX_INV_T = 60.0  # exp(cos/τ) ≤ e^60 is far from float32 overflow (e^88)


def _exp_block(za_t, zc, s, e, rows, cols, sel, inv_t, fill, shift: bool = True):
    """exp((za[s:e]·zcᵀ − 1)·inv_t) with the FN entries set to ``fill``; ``za_t`` = za·inv_t
    (one fused ``addmm`` for the shifted logits, then one in-place exp). ``shift=False``:
    exp(za[s:e]·zcᵀ·inv_t), one plain ``mm`` (no pass to broadcast the shift into the output)."""
    if shift:
        E = torch.addmm(za_t.new_full((), -inv_t), za_t[s:e], zc.T).exp_()
    else:
        E = torch.mm(za_t[s:e], zc.T).exp_()
    if sel is not None and sel.stop > sel.start:
        E[rows[sel] - s, cols[sel]] = fill
    return E


def _sort_pairs(rows, cols):
    if rows is None:
        return None, None
    order = torch.argsort(rows, stable=True)
    return rows[order], cols[order]


class _ExpSum(torch.autograd.Function):
    """den[a] = Σ_c exp((za[a]·zc[c] − 1)·inv_t) with the (rows, cols) entries replaced by the
    constant ``fill``; computed over row chunks of the [A, C] logits and recomputed in the
    backward, so no A x C matrix is kept (memory O(chunk·C) instead of several A x C tensors).
    Same math as ``exp(...).index_put(...).sum(1)``: the replaced entries have zero gradient.
    Used where ``den`` is all-reduced before the log (sharded candidates); otherwise
    :class:`_LogDenSum` does forward and gradient in one sweep."""

    @staticmethod
    def forward(ctx, za, zc, rows, cols, fill, inv_t):  # type: ignore[override]
        rows, cols = _sort_pairs(rows, cols)
        A, C = za.shape[0], zc.shape[0]
        den = za.new_empty(A)
        za_t = za * inv_t
        for s, e, sel in _row_chunks(A, C, rows):
            torch.sum(_exp_block(za_t, zc, s, e, rows, cols, sel, inv_t, fill), 1, out=den[s:e])
        ctx.save_for_backward(za, zc, rows, cols)
        ctx.inv_t = inv_t
        return den

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        za, zc, rows, cols = ctx.saved_tensors
        inv_t = ctx.inv_t
        A, C = za.shape[0], zc.shape[0]
        gza = torch.empty_like(za)
        gzc = torch.zeros_like(zc)
        za_t = za * inv_t
        gs = (g * inv_t).unsqueeze(1)  # row scale of dE: applied to the [A, d] factors, not to E
        zag = za * gs
        for s, e, sel in _row_chunks(A, C, rows):
            E = _exp_block(za_t, zc, s, e, rows, cols, sel, inv_t, 0.0)  # fill entries are constants
            torch.mm(E, zc, out=gza[s:e])
            gzc.addmm_(E.T, zag[s:e])
        gza.mul_(gs)
        return gza, gzc, None, None, None, None


class _LogDenSum(torch.autograd.Function):
    """Σ_a w[a] · log(den[a] + extra), den as in :class:`_ExpSum`, for candidates held
    completely by this rank. The gradient only needs each row's own ``den``, which is known as
    soon as the row's chunk is summed, so forward and gradient are ONE sweep over the [A, C]
    logits: per chunk one ``addmm`` (logits), one exp, one row sum, two ``mm`` (dza, dzc) --
    instead of recomputing logits and exp in the backward. The backward only scales the
    stored gradients by the incoming scalar. Same math as ``(w * log(_ExpSum + extra)).sum()``."""

    @staticmethod
    def forward(ctx, za, zc, rows, cols, fill, inv_t, w, extra):  # type: ignore[override]
        rows, cols = _sort_pairs(rows, cols)
        A, C = za.shape[0], zc.shape[0]
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        za_t = za * inv_t
        total = za.new_zeros((), dtype=torch.float64)
        gza = torch.empty_like(za) if need else None
        gzc = torch.zeros_like(zc) if need else None
        # cos ≤ 1, so for moderate 1/τ the unshifted exp(cos/τ) cannot overflow: den' = e^{1/τ}·den,
        # log den = log den' − 1/τ, and the gradient (E / den) is unchanged
        shift = inv_t > _UNSHIFTED_MAX_INV_T
        if not shift:
            fill = fill * math.exp(inv_t)
            extra = extra * math.exp(inv_t)
        for s, e, sel in _row_chunks(A, C, rows):
            E = _exp_block(za_t, zc, s, e, rows, cols, sel, inv_t, fill, shift)
            den = E.sum(1)
            if extra:
                den += extra
            wa = w[s:e]
            total += (wa * den.log()).sum(dtype=torch.float64)
            if need:
                if sel is not None and fill != 0.0 and sel.stop > sel.start:
                    E[rows[sel] - s, cols[sel]] = 0.0  # constants: no gradient
                gs = (wa * inv_t / den).unsqueeze(1)
                torch.mm(E, zc, out=gza[s:e])
                gza[s:e].mul_(gs)
                gzc.addmm_(E.T, za[s:e] * gs)
        if not shift:
            total -= inv_t * w.sum(dtype=torch.float64)
        ctx.grads = (gza, gzc)
        return total.to(za.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        gza, gzc = ctx.grads  # kept (not popped): the graph may be walked more than once
        return (None if gza is None else gza * g, None if gzc is None else gzc * g,
                None, None, None, None, None, None)


def _prepare(anchor, positive, tau, meta, comm, candidates_sharded, fn_mode):
    """The common inputs of the exact and the sampled InfoNCE: (comm, n_local_anchors, normalized
    anchors, normalized positives, 1/τ, whether candidates are split over ranks, FN pairs)."""
    comm = comm or LocalComm()
    if fn_mode not in FN_MODES:
        raise ValueError(f"fn_mode must be one of {FN_MODES}, got {fn_mode!r}")
    za, zp = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    fn = _fn_pairs(meta) if meta is not None else None
    return comm, anchor.shape[0], za, zp, 1.0 / tau, candidates_sharded and comm.world_size > 1, fn


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, candidates: torch.Tensor, tau: float,
             anchors_meta: Anchors | None = None, comm: Comm | None = None, candidates_sharded: bool = False,
             candidate_ids: torch.Tensor | None = None, fn_mode: str = "remove",
             extra_zero_logits: int = 0) -> torch.Tensor:
    """Σ_a w_a · −log( exp(φ(a, a⁺)/τ) / Σ_{v ∈ C \\ FN(a)} exp(φ(a, v)/τ) ), φ = cosine.

    anchor, positive: [A_local, d] reps of this rank's anchors (already gathered by row);
    candidates: [C_local, d] the candidate reps this rank holds (all local users, or all items);
    candidates_sharded: True when candidates are split over ranks (denominator partials are
        all-reduced and anchors all-gathered); False when every rank holds all candidates.
    candidate_ids: global ids of the local candidates (None: local index = global id).
    fn_mode: ``remove`` drops FN(a) from the denominator (the positive itself is always kept);
        ``reference`` (authors' code, ``SSLoss2`` hard_neg 'v3') sets their logits to 0, so each
        still adds e⁰ = 1, and does not exempt the positive.
    extra_zero_logits: add this many e⁰ terms to every denominator (the reference's zero
        "token" item row adds one to every item-side denominator).
    """
    comm, n_loc, za, zp, inv_t, dist, fn = _prepare(anchor, positive, tau, anchors_meta, comm, candidates_sharded,
                                                    fn_mode)
    meta = anchors_meta
    zc = F.normalize(candidates, dim=1)
    a_ids = meta.global_ids() if meta is not None else None
    offset = 0
    if dist:
        counts = comm.all_gather_cat(torch.tensor([n_loc], dtype=torch.int64, device=anchor.device))
        offset = int(counts[: comm.rank].sum())
        ZA = comm.all_gather_cat(za)
        if a_ids is not None:
            a_ids = comm.all_gather_cat(a_ids.to(torch.int64))
        if fn is not None:
            fn = (comm.all_gather_cat(fn[0] + offset), comm.all_gather_cat(fn[1]))
    else:
        ZA = za
    rows = cols = None
    fill = 0.0
    if fn is not None and fn[0].numel() > 0:
        rows, ids = fn
        cols, ok = _lookup(candidate_ids, zc.shape[0], ids)
        if fn_mode == "remove" and a_ids is not None:
            ok = ok & (ids != a_ids[rows])
        rows, cols = rows[ok], cols[ok]
        if rows.numel() > 0:
            fill = 0.0 if fn_mode == "remove" else float(torch.exp(torch.tensor(-inv_t, dtype=torch.float64)))
        else:
            rows = cols = None
    extra = extra_zero_logits * float(torch.exp(torch.tensor(-inv_t, dtype=torch.float64))) if extra_zero_logits else 0.0
    w = meta.weight.to(za.dtype) if meta is not None and meta.weight is not None else None
    pos = (za * zp).sum(1) * inv_t
    if not dist:
        # Σ_c exp((cos(a, c) − 1)/τ) (FN entries = fill), log, weighted sum: one sweep with its gradient
        w1 = w if w is not None else za.new_ones(n_loc)
        log_term = _LogDenSum.apply(za, zc, rows, cols, fill, inv_t, w1.detach(), extra)
        lin = inv_t - pos
        return log_term + (lin * w).sum() if w is not None else log_term + lin.sum()
    den = _ExpSum.apply(ZA, zc, rows, cols, fill, inv_t)  # Σ_c exp((cos(a, c) − 1)/τ), FN entries = fill
    den = comm.all_reduce_sum(den)
    if extra:
        den = den + extra
    den_loc = den[offset: offset + n_loc]
    per = torch.log(den_loc) + inv_t - pos
    if w is not None:
        per = per * w
    return per.sum()


# --------------------------------------------------------------------------- sampled negatives
@dataclass
class SampledCandidates:
    """One step's sampled candidates of one InfoNCE side, shared by the whole batch.

    ids: [S] unique global candidate ids; log_pi: [S] log of each one's inclusion probability
    (0 = always included)."""

    ids: torch.Tensor
    log_pi: torch.Tensor


class NegativeSampler:
    """Draws ``n`` candidates with replacement from ``n_candidates`` global ids, uniformly or in
    proportion to ``counts + 1`` (popularity; +1 keeps every candidate reachable), and returns
    the unique ids with their inclusion probability π = 1 − (1 − p)^n. Cost O(n log C) per draw
    (the popularity CDF is built once). With ``n >= n_candidates`` every candidate is taken
    with π = 1 (the exact denominator)."""

    def __init__(self, n_candidates: int, n: int, kind: str = "uniform", counts: torch.Tensor | None = None) -> None:
        if kind not in ("uniform", "popularity"):
            raise ValueError(f"negative sampler must be uniform or popularity, got {kind!r}")
        self.C, self.n, self.kind = int(n_candidates), int(n), kind
        self.p = self.cdf = None
        if kind == "popularity" and self.n < self.C:
            if counts is None or counts.numel() != self.C:
                raise ValueError(f"popularity sampling needs one count per candidate ({self.C})")
            w = counts.to(torch.float64) + 1.0
            self.p = w / w.sum()
            self.cdf = torch.cumsum(self.p, 0)

    def draw(self, g: torch.Generator) -> SampledCandidates:
        C, n = self.C, self.n
        if n >= C:
            return SampledCandidates(torch.arange(C), torch.zeros(C, dtype=torch.float64))
        if self.kind == "uniform":
            ids = torch.unique(torch.randint(C, (n,), generator=g))
            p = torch.full((ids.numel(),), 1.0 / C, dtype=torch.float64)
        else:
            u = torch.rand(n, generator=g, dtype=torch.float64) * float(self.cdf[-1])
            ids = torch.unique(torch.searchsorted(self.cdf, u, right=True).clamp_(max=C - 1))
            p = self.p[ids]
        log_pi = torch.log(-torch.expm1(n * torch.log1p(-p)))
        return SampledCandidates(ids, log_pi)


def sampled_info_nce(anchor: torch.Tensor, positive: torch.Tensor, candidates: torch.Tensor, tau: float,
                     sample: SampledCandidates, anchors_meta: Anchors | None = None, comm: Comm | None = None,
                     candidates_sharded: bool = False, candidate_ids: torch.Tensor | None = None,
                     fn_mode: str = "remove", extra_zero_logits: int = 0,
                     estimator: str = "logq", in_batch: bool = False) -> torch.Tensor:
    """:func:`info_nce` with the denominator over a candidate subset: with ``in_batch = True``
    the in-batch candidates (every rank's anchors' own ids, i.e. the batch's positives;
    inclusion probability 1) plus the sampled ids not among them, each logit corrected by
    −log π (so the denominator is the Horvitz–Thompson estimate of the exact one). False
    negatives are removed from each anchor's row (the positive itself is kept), as in the exact
    loss. Cost O(A·(S + A)·d), independent of the number of candidates. Sharded candidates:
    each rank sums the columns it holds and the partial denominators are all-reduced, as in
    :func:`info_nce`. With ``fn_mode = "remove"`` it runs the exact loss's chunked kernels
    (:class:`_LogDenSum`, :class:`_ExpSum`) with −log π as one more embedding coordinate;
    ``reference`` uses plain autograd over the [A, S + A] logits.

    ``estimator = "control_variate"``: the same sampled set, with the linear part of each term
    taken exactly. With μ_a = mean over all candidates of s_av = cos(a, v)/τ (one pass over the
    candidates: za·Σ_v zv, O(|C|·d), the sum all-reduced when sharded) and the tangent
    h_a(s) = e^{μ_a}(1 + s − μ_a), Σ_{v∈C} h_a(s_av) = |C|·e^{μ_a} exactly, so
    den_a = |C|·e^{μ_a} + Σ_{v∈set, v∉FN(a)} (e^{s_av} − h_a(s_av))/π_v − Σ_{v∈set∩FN(a)} h_a(s_av)/π_v
    (unbiased for the exact FN-removed denominator; every candidate gets the mean-field part
    of its gradient, the sampled part only carries the small convex remainder).

    ``in_batch = False`` (the default, as ``loss.in_batch_negatives``): no in-batch candidates.
    Each anchor's denominator is its own positive (π = 1) plus the shared sample with the
    sampler's π (the anchor's own id masked out of the sample where drawn, so it counts once),
    still unbiased for the exact denominator. Cost
    O(A·S·d) instead of O(A·(S + A)·d): linear in the batch, where the in-batch candidates make
    a step quadratic in it (the batch grows with |U| under ``train.batch_size = 0``). Needs
    ``fn_mode = "remove"``."""
    comm, n_loc, za, zp, inv_t, dist, fn = _prepare(anchor, positive, tau, anchors_meta, comm, candidates_sharded,
                                                    fn_mode)
    meta = anchors_meta
    a_ids = (meta.global_ids() if meta is not None else torch.arange(n_loc, device=anchor.device)).to(torch.int64)
    offset = 0
    all_ids = a_ids
    if comm.world_size > 1:  # the in-batch candidates are the whole batch's, on every rank
        counts = comm.all_gather_cat(torch.tensor([n_loc], dtype=torch.int64, device=anchor.device))
        offset = int(counts[: comm.rank].sum())
        all_ids = comm.all_gather_cat(a_ids)
    ZA = za
    if dist:
        ZA = comm.all_gather_cat(za)
        a_ids = all_ids
        if fn is not None:
            fn = (comm.all_gather_cat(fn[0] + offset), comm.all_gather_cat(fn[1]))
    s_ids = sample.ids.to(all_ids.device)
    s_logw = -sample.log_pi.to(device=za.device, dtype=za.dtype)
    if in_batch:
        batch_ids = torch.unique(all_ids)
        other = ~torch.isin(s_ids, batch_ids)
        ids = torch.cat([batch_ids, s_ids[other]])
        logw = torch.cat([batch_ids.new_zeros(batch_ids.numel(), dtype=za.dtype), s_logw[other]])
    else:
        if fn_mode != "remove":
            raise ValueError("sampled negatives without in-batch candidates need fn_mode = 'remove'")
        ids, logw = s_ids, s_logw
    cols, ok = _lookup(candidate_ids, candidates.shape[0], ids)
    ids, cols, logw = ids[ok], cols[ok], logw[ok]
    zc = F.normalize(candidates[cols], dim=1)
    # the (anchor row, column) entries left out of the sum: false negatives in the set and,
    # without in-batch candidates, each anchor's own id where drawn (its positive is added below)
    pairs = []
    if fn is not None and fn[0].numel() > 0 and ids.numel() > 0:
        rows, fid = fn
        col, hit = _lookup(ids, ids.numel(), fid)
        if fn_mode == "remove":
            hit &= fid != a_ids[rows]
        pairs.append((rows[hit], col[hit]))
    if not in_batch and ids.numel() > 0:
        col, hit = _lookup(ids, ids.numel(), a_ids)
        pairs.append((torch.nonzero(hit).flatten(), col[hit]))
    r = c = None
    if pairs and sum(p[0].numel() for p in pairs) > 0:
        r, c = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    w = meta.weight.to(za.dtype) if meta is not None and meta.weight is not None else za.new_ones(n_loc)
    pos = (za * zp).sum(1) * inv_t
    own = inv_pi_own = None
    if not in_batch:
        # the positive's shifted term e^{s−1/τ} (π = 1); for the control variate also the
        # tangent to swap for it, and the sample's tangent of the anchor's own id, given back
        # when drawn (the kernel masked that column but the linear tangent sum includes it)
        own = torch.exp(pos - inv_t)
        inv_pi_own = za.new_zeros(n_loc)
        if s_ids.numel() > 0:
            j, drawn = _lookup(s_ids, s_ids.numel(), a_ids[offset: offset + n_loc] if dist else a_ids)
            inv_pi_own = torch.where(drawn, s_logw[j].exp(), 0.0)
    if estimator == "control_variate":
        if fn_mode != "remove":
            raise ValueError("the control_variate estimator needs fn_mode = 'remove'")
        zall = F.normalize(candidates, dim=1).sum(0)
        n_all = float(candidates.shape[0])
        if dist:
            zall = comm.all_reduce_sum(zall)
            n_all = float(comm.all_reduce_sum_(torch.tensor([n_all], dtype=torch.float64)))
        mu = (ZA @ zall) * (inv_t / n_all) - inv_t  # mean shifted logit (cos − 1)/τ per anchor
        em = mu.exp()
        # Σ_{set∖FN} e^{s}/π (the chunked kernel, logQ as one more coordinate) minus the tangent
        # summed over the whole set, Σ_set h/π = e^μ (W (1 − μ) + Σ_v s_av/π_v), which is linear in
        # the candidates: W = Σ 1/π, Σ_v s_av/π_v = (za·Σ_v zv/π_v − W)/τ; no [A, S] matrix kept
        cw = logw.exp()
        W = cw.sum()
        za1 = torch.cat([ZA, ZA.new_ones(ZA.shape[0], 1)], 1)
        zc1 = torch.cat([zc, (tau * logw).unsqueeze(1)], 1)
        den = _ExpSum.apply(za1, zc1, r, c, 0.0, inv_t) - em * (W * (1.0 - mu) + inv_t * (ZA @ (cw @ zc) - W))
        if dist:
            den = comm.all_reduce_sum(den)  # partial sums over each rank's columns; μ is the same everywhere
        den = den + n_all * em
        if extra_zero_logits:
            den = den + extra_zero_logits * math.exp(-inv_t)
        if dist:
            den = den[offset: offset + n_loc]
        if own is not None:
            m_loc, e_loc = (mu[offset: offset + n_loc], em[offset: offset + n_loc]) if dist else (mu, em)
            h_own = e_loc * (1.0 + (pos - inv_t) - m_loc)
            den = den + own - h_own + inv_pi_own * h_own
        return (w * (torch.log(den) + inv_t - pos)).sum()
    if estimator != "logq":
        raise ValueError(f"estimator must be logq or control_variate, got {estimator!r}")
    if fn_mode == "remove":
        # the logQ term as one more coordinate: [za, 1]·[zc, τ·logw] / τ = cos/τ + logw, so the
        # chunked kernels of the exact loss apply unchanged (FN entries filled with 0)
        za1 = torch.cat([ZA, ZA.new_ones(ZA.shape[0], 1)], 1)
        zc1 = torch.cat([zc, (tau * logw).unsqueeze(1)], 1)
        extra = extra_zero_logits * math.exp(-inv_t) if extra_zero_logits else 0.0
        if not dist and own is None:
            return _LogDenSum.apply(za1, zc1, r, c, 0.0, inv_t, w.detach(), extra) + (w * (inv_t - pos)).sum()
        den = _ExpSum.apply(za1, zc1, r, c, 0.0, inv_t)
        if dist:
            den = comm.all_reduce_sum(den)[offset: offset + n_loc]
        if extra:
            den = den + extra
        if own is not None:
            den = den + own
        return (w * (torch.log(den) + inv_t - pos)).sum()
    logits = torch.addmm(za.new_full((), -inv_t), ZA * inv_t, zc.T)  # (cos − 1)/τ: no overflow
    if r is not None:
        logits = logits.index_put((r, c), logits.new_full((), -inv_t))  # reference: cosine logit set to 0
    den = torch.exp(logits + logw).sum(1)
    if dist:
        den = comm.all_reduce_sum(den)
    if extra_zero_logits:
        den = den + extra_zero_logits * math.exp(-inv_t)
    if dist:
        den = den[offset: offset + n_loc]
    return (w * (torch.log(den) + inv_t - pos)).sum()


class InterBehaviorInfoNCE(nn.Module):
    """Inter-behavior SSL (paper Eq 7; reference ``SSLoss2``) for one auxiliary behavior k.

    User side: anchor e_{u,K}, positive e_{u,k}, candidates e_{v,k} of all users (this rank's
    local users; sharded). Item side: the same over items (replicated). Both sides summed,
    times ``weight`` (the reference's ``ssl_reg_inter[k]``, default 1).
    """

    uses_false_negatives = True
    negative_estimator = "logq"  # sampled mode: "logq" or "control_variate" (see sampled_info_nce)
    in_batch_negatives = False  # sampled mode: the batch's positives as candidates too (set by TrainStep)

    def __init__(self, tau: float = 0.5, fn_mode: str = "remove", user_side: bool = True, item_side: bool = True,
                 item_extra_zero_logits: int = 0) -> None:
        super().__init__()
        if fn_mode not in FN_MODES:
            raise ValueError(f"fn_mode must be one of {FN_MODES}, got {fn_mode!r}")
        self.tau, self.fn_mode = float(tau), fn_mode
        self.user_side, self.item_side = user_side, item_side
        self.item_extra_zero_logits = int(item_extra_zero_logits)

    def forward(self, user_a: torch.Tensor, user_b: torch.Tensor, user_anchors: Anchors | None,
                item_a: torch.Tensor, item_b: torch.Tensor, item_anchors: Anchors | None,
                comm: Comm | None = None, user_candidate_ids: torch.Tensor | None = None,
                weight: float = 1.0,
                samples: tuple[SampledCandidates | None, SampledCandidates | None] = (None, None)) -> torch.Tensor:
        """user_a/user_b: [n_local_users, d] anchor/positive reps of the local users (candidates =
        all rows of ``user_b``); item_a/item_b: [n_items, d]. Anchors index these rows.
        samples: (user side, item side) sampled candidates (``loss.negatives = "sampled"``);
        None = all candidates (exact)."""
        comm = comm or LocalComm()
        total = user_a.new_zeros(())
        sides = [(self.user_side, user_a, user_b, user_anchors, True, samples[0]),
                 (self.item_side, item_a, item_b, item_anchors, False, samples[1])]
        for on, a, b, anchors, sharded, sample in sides:
            if not on or anchors is None:
                continue
            if not self.uses_false_negatives:
                anchors = Anchors(anchors.rows, anchors.weight, anchors.ids)
            r = anchors.rows
            kw = dict(candidates_sharded=sharded, candidate_ids=user_candidate_ids if sharded else None,
                      fn_mode=self.fn_mode, extra_zero_logits=0 if sharded else self.item_extra_zero_logits)
            if sample is None:
                total = total + info_nce(a[r], b[r], b, self.tau, anchors, comm, **kw)
            else:
                total = total + sampled_info_nce(a[r], b[r], b, self.tau, sample, anchors, comm, **kw,
                                                 estimator=self.negative_estimator,
                                                 in_batch=self.in_batch_negatives)
        return weight * total


class IntraBehaviorInfoNCE(InterBehaviorInfoNCE):
    """Intra-behavior SSL (paper Eq 8–9; reference ``SSLoss``): anchor = target rep in view 1,
    positive = the same node in view 2, candidates = all nodes in view 2 (no false-negative
    removal). Anchors (reference): every (batch user, purchased item) pair, i.e. users weighted
    by their number of target positives and the purchased items with multiplicity."""

    uses_false_negatives = False

    def __init__(self, tau: float = 0.5, user_side: bool = True, item_side: bool = True,
                 item_extra_zero_logits: int = 0) -> None:
        super().__init__(tau, "remove", user_side, item_side, item_extra_zero_logits)
