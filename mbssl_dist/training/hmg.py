"""Hybrid Manipulation on Gradients (paper §3.3.2, Alg. 1) and its ablation strategies.

Tasks: index 0 is the target (recommendation) task, 1.. are auxiliary (intra SSL, inter SSL
per auxiliary behavior). Everything is decided per parameter tensor j.

Semantics, checked against the authors' code (``utility/metabalance.py`` class
``MetaBalance3.balance_GradMagnitudes2`` with the parser default ``--meta_s 8``, identical to
``utility/optimize.py`` class ``HMG``):

* m_{t,j}: EMA of the gradient norm, ``m ← β m + (1 − β) ||g||`` (β = 0.9, zero init, no bias
  correction), updated for every task every step from the *raw* gradient (before any change).
  With ``use_ema=False`` the current norms are used instead (the paper's Eq 14 / Alg. 1).
* ``hmg`` (default, meta_s 8 / class HMG): only if m_aux > m_tar: if ⟨g_aux, g_tar⟩ < 0,
  project g_aux onto the normal plane of g_tar (Eq 13, with the raw target gradient); then
  ``g_aux ← r·(m_tar/m_aux)·g_aux + (1 − r)·g_aux`` (r = 0.7).
* ``A`` (paper Table 4 "direction only ... regardless of their magnitudes"; code meta_s 11):
  project on conflict, for every auxiliary gradient, no rescaling.
* ``B`` (paper "magnitude only ... reduce if larger and vice versa"; code meta_s 2 =
  MetaBalance): always rescale with the formula above (shrinks or enlarges), no projection.
* ``C`` (paper "first direction by A, then magnitude by B ... regardless of their magnitudes";
  code meta_s 13): project on conflict, then always rescale.
* ``none``: plain sum (equal weights).

Auxiliary budget (beyond the paper; ``aux_budget`` κ, default 0 = off as in the config): after
the strategy has set each auxiliary task's coefficients, the auxiliary contributions to tensor j (each
``α_tj g_tj + γ_tj g_0j``, i.e. the projected and rescaled gradient) are scaled down together,
where needed, so that the sum of their norms is at most κ·||g_0j|| (current, not EMA, norms).
By the triangle inequality the combined auxiliary gradient can then never exceed κ times the
target gradient on any tensor, whatever the datasets' norm ratios at the start (10²–10⁴ with
the authors' init). Tensors without a target gradient are left as they are (nothing to swamp).

Guards: a zero target gradient never triggers a projection (⟨g_aux, 0⟩ = 0); a zero EMA norm
of the auxiliary task skips rescaling (the code would produce 0/0).

Every modification is linear, so the combined gradient of tensor j is
``(1 + Σ_t γ_tj) g_0j + Σ_t α_tj g_tj`` with scalar coefficients computed from norms² and dot
products only. For tensors flagged ``sharded`` (rows split over ranks) those scalars are local
partial sums; all of them are all-reduced in ONE ``comm.all_reduce_sum_`` per step, so every
rank computes identical coefficients. Replicated tensors must already hold all-reduced
gradients (the caller's job).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..parallel.comm import Comm, LocalComm

STRATEGIES = ("hmg", "A", "B", "C", "none")


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf") if a > 0 else 0.0


class HMG:
    def __init__(self, n_tasks: int, strategy: str = "hmg", relax: float = 0.7, beta: float = 0.9,
                 use_ema: bool = True, aux_budget: float = 0.0, budget_rows: bool = False) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not 0.0 <= relax <= 1.0:
            raise ValueError(f"relax factor must be in [0, 1], got {relax}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not aux_budget >= 0.0:
            raise ValueError(f"aux_budget must be >= 0, got {aux_budget}")
        if n_tasks < 1:
            raise ValueError("n_tasks must be >= 1")
        self.n_tasks = int(n_tasks)
        self.strategy = strategy
        self.relax = float(relax)
        self.beta = float(beta)
        self.use_ema = bool(use_ema)
        self.aux_budget = float(aux_budget)  # 0 = off
        self.budget_rows = bool(budget_rows)
        self.ema: torch.Tensor | None = None  # [n_tasks, n_tensors] float64
        self.steps = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.clone(), "steps": self.steps,
                "n_tasks": self.n_tasks, "strategy": self.strategy, "relax": self.relax, "beta": self.beta,
                "use_ema": self.use_ema, "aux_budget": self.aux_budget, "budget_rows": self.budget_rows}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("n_tasks", self.n_tasks) != self.n_tasks:
            raise ValueError(f"HMG state has {sd['n_tasks']} tasks, this HMG has {self.n_tasks}")
        self.ema = None if sd["ema"] is None else sd["ema"].clone().to(torch.float64)
        self.steps = int(sd["steps"])

    # --------------------------------------------------------------- combine
    @torch.no_grad()
    def combine(self, grads: Sequence[Sequence[torch.Tensor | None]], sharded: Sequence[bool] | None = None,
                comm: Comm | None = None) -> tuple[list[torch.Tensor | None], dict]:
        """grads[t][j]: gradient of task t (0 = target) w.r.t. tensor j (None = unused).

        Returns (combined gradient per tensor, stats). stats["aux"][t-1] holds, for auxiliary
        task t: ``norm_ratio`` (||g_t|| / ||g_0|| over all tensors), ``cosine`` (with g_0),
        ``frac_projected`` and ``frac_rescaled`` (fractions of the tensors where the task's
        gradient is non-zero)."""
        comm = comm or LocalComm()
        T = len(grads)
        if T != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} tasks, got {T}")
        J = len(grads[0])
        if any(len(g) != J for g in grads):
            raise ValueError("every task needs one gradient entry per tensor")
        sharded = [False] * J if sharded is None else list(sharded)
        if len(sharded) != J:
            raise ValueError("sharded needs one flag per tensor")

        n2 = torch.zeros(T, J, dtype=torch.float64)
        dot = torch.zeros(T, J, dtype=torch.float64)
        for j in range(J):
            g0 = grads[0][j]
            for t in range(T):
                g = grads[t][j]
                if g is None:
                    continue
                g64 = g.detach().to(torch.float64)
                n2[t, j] = (g64 * g64).sum()
                if g0 is not None:
                    dot[t, j] = n2[t, j] if t == 0 else (g64 * g0.detach().to(torch.float64)).sum()
        sh = [j for j in range(J) if sharded[j]]
        if sh and comm.world_size > 1:
            idx = torch.tensor(sh, dtype=torch.int64)
            vec = torch.cat([n2[:, idx].reshape(-1), dot[:, idx].reshape(-1)])
            dev = next((g.device for gt in grads for g in gt if g is not None), torch.device("cpu"))
            vec = comm.all_reduce_sum_(vec.to(dev)).to("cpu", torch.float64)
            n2[:, idx] = vec[: T * len(sh)].view(T, len(sh))
            dot[:, idx] = vec[T * len(sh):].view(T, len(sh))
        norms = n2.clamp(min=0).sqrt()

        if self.ema is None or self.ema.shape != (T, J):
            self.ema = torch.zeros(T, J, dtype=torch.float64)
        if self.use_ema:
            self.ema = self.beta * self.ema + (1.0 - self.beta) * norms
            m = self.ema
        else:
            m = norms
        self.steps += 1

        alpha = torch.ones(T, J, dtype=torch.float64)
        gamma = torch.zeros(T, J, dtype=torch.float64)
        projected = torch.zeros(T, J, dtype=torch.bool)
        rescaled = torch.zeros(T, J, dtype=torch.bool)
        r, s = self.relax, self.strategy
        for t in range(1, T):
            for j in range(J):
                larger = s == "hmg" and bool(m[t, j] > m[0, j])  # HMG acts only where the aux norm is larger
                do_proj = bool(dot[t, j] < 0) and bool(n2[0, j] > 0) and (larger or s in ("A", "C"))
                do_scale = larger or (s in ("B", "C") and bool(m[t, j] > 0))
                projected[t, j] = do_proj
                a = 1.0
                if do_scale:
                    m_aux = float(m[t, j])
                    if not self.use_ema and do_proj:
                        # the paper's Eq 14 takes the norm of the already projected gradient
                        m_aux = float((n2[t, j] - dot[t, j] ** 2 / n2[0, j]).clamp(min=0).sqrt())
                    if m_aux > 0:
                        a = r * float(m[0, j]) / m_aux + (1.0 - r)
                        rescaled[t, j] = a != 1.0
                alpha[t, j] = a
                gamma[t, j] = a * (-float(dot[t, j] / n2[0, j]) if do_proj else 0.0)

        # norm of each auxiliary contribution α(g_t − (⟨g_t, g_0⟩/||g_0||²) g_0 if projected else g_t)
        n0 = n2[0].clamp(min=1e-300)
        aux_n = alpha * torch.where(projected, (n2 - dot.square() / n0).clamp(min=0), n2).sqrt()
        aux_n[0] = 0.0
        budget = self.aux_budget > 0 and T > 1
        if budget:
            total = aux_n[1:].sum(0)
            cap = self.aux_budget * norms[0]
            # with budget_rows, matrices are capped row by row below; vectors as one row here
            whole = torch.tensor([not (self.budget_rows and grads[0][j] is not None and grads[0][j].dim() >= 2)
                                  for j in range(J)])
            f = torch.where((total > cap) & (n2[0] > 0) & whole, cap / total.clamp(min=1e-300),
                            torch.ones_like(total))
            alpha[1:] *= f
            gamma[1:] *= f
            aux_n[1:] *= f
            rescaled[1:] |= (f < 1.0)

        combined: list[torch.Tensor | None] = []
        row_n2 = torch.zeros(T, J, dtype=torch.float64)  # budget_rows: ||aux contribution||² after the row caps
        for j in range(J):
            g0 = grads[0][j]
            if budget and self.budget_rows and g0 is not None and g0.dim() >= 2:
                # per row (one user / item / relation vector): Adam normalizes per coordinate, so an
                # auxiliary gradient on rows the target barely touches is a full-size step there
                g0d = g0.detach()
                terms = [None if grads[t][j] is None else grads[t][j].detach() * float(alpha[t, j])
                         + g0d * float(gamma[t, j]) for t in range(1, T)]
                flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
                tot = torch.zeros(g0d.shape[0], dtype=g0d.dtype, device=g0d.device)
                for c in terms:
                    if c is not None:
                        tot += flat(c).norm(dim=1)
                cap = self.aux_budget * flat(g0d).norm(dim=1)
                f = torch.where(tot > cap, cap / tot.clamp(min=torch.finfo(tot.dtype).tiny), torch.ones_like(tot))
                out = g0d.clone()
                for t, c in enumerate(terms, start=1):
                    if c is not None:
                        c = c * f.view(-1, *([1] * (c.dim() - 1)))
                        row_n2[t, j] = float(c.double().square().sum())
                        out.add_(c)
                        rescaled[t, j] |= bool((f < 1).any())
                combined.append(out)
                continue
            out = None
            c0 = 1.0 + float(gamma[1:, j].sum())
            if grads[0][j] is not None:
                out = grads[0][j].detach() * c0 if c0 != 1.0 else grads[0][j].detach().clone()
            for t in range(1, T):
                g = grads[t][j]
                if g is None:
                    continue
                a = float(alpha[t, j])
                term = g.detach() * a if a != 1.0 else g.detach()
                out = term.clone() if out is None else out.add_(term)
            combined.append(out)

        if budget and self.budget_rows:
            rows_j = [j for j in range(J) if bool(row_n2[:, j].any())]
            if rows_j:  # applied norms of the row-capped tensors (summed over ranks where sharded)
                idx = torch.tensor([j for j in rows_j if sharded[j]], dtype=torch.int64)
                if idx.numel() and comm.world_size > 1:
                    dev = next((g.device for gt in grads for g in gt if g is not None), torch.device("cpu"))
                    row_n2[:, idx] = comm.all_reduce_sum_(row_n2[:, idx].reshape(-1).to(dev)).to(
                        "cpu", torch.float64).view(T, -1)
                for j in rows_j:
                    aux_n[:, j] = row_n2[:, j].sqrt()
        tot_n = norms.square().sum(1).sqrt()  # global norm per task
        applied = float(aux_n[1:].sum(0).square().sum().sqrt()) if T > 1 else 0.0
        # upper bound (triangle inequality per tensor) of ||combined aux|| / ||g_0||
        stats = {"target_norm": float(tot_n[0]), "aux": [], "aux_total_bound": _ratio(applied, float(tot_n[0]))}
        for t in range(1, T):
            nz = n2[t] > 0
            cnt = int(nz.sum())
            denom = float(tot_n[t] * tot_n[0])
            stats["aux"].append({
                "norm_ratio": float(tot_n[t] / tot_n[0]) if tot_n[0] > 0 else float("inf") if tot_n[t] > 0 else 0.0,
                # the same after the strategy (and the budget): what actually enters the update
                "applied_ratio": _ratio(float(aux_n[t].square().sum().sqrt()), float(tot_n[0])),
                "cosine": float(dot[t].sum() / denom) if denom > 0 else 0.0,
                "frac_projected": float((projected[t] & nz).sum()) / cnt if cnt else 0.0,
                "frac_rescaled": float((rescaled[t] & nz).sum()) / cnt if cnt else 0.0,
            })
        stats["alpha"] = alpha
        stats["gamma"] = gamma
        return combined, stats
