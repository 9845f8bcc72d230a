import math

import pytest
import torch

from mbssl_dist.training.hmg import HMG

D = torch.float64


def _t(*v):
    return torch.tensor(v, dtype=D)


def test_hmg_fires_projects_and_rescales():
    # one tensor; aux larger than target and conflicting
    g0 = _t(1.0, 0.0)
    g1 = _t(-3.0, 4.0)  # norm 5, dot -3
    h = HMG(2, "hmg", relax=0.7, beta=0.9)
    (out,), stats = h.combine([[g0], [g1]])
    m0, m1 = 0.1 * 1.0, 0.1 * 5.0  # EMA after one step from zero
    proj = g1 - (-3.0 / 1.0) * g0  # = (0, 4)
    want = g0 + 0.7 * (m0 / m1) * proj + 0.3 * proj
    assert torch.allclose(out, want)
    a = stats["aux"][0]
    assert a["frac_projected"] == 1.0 and a["frac_rescaled"] == 1.0
    assert math.isclose(a["norm_ratio"], 5.0) and math.isclose(a["cosine"], -0.6)


def test_hmg_nothing_fires_when_aux_smaller():
    g0 = _t(3.0, 0.0)
    g1 = _t(-1.0, 1.0)  # smaller and conflicting: kept unaltered
    (out,), stats = HMG(2, "hmg").combine([[g0], [g1]])
    assert torch.allclose(out, g0 + g1)
    assert stats["aux"][0]["frac_projected"] == 0.0 and stats["aux"][0]["frac_rescaled"] == 0.0


def test_hmg_no_projection_without_conflict():
    g0 = _t(1.0, 0.0)
    g1 = _t(3.0, 4.0)
    (out,), _ = HMG(2, "hmg").combine([[g0], [g1]])
    want = g0 + (0.7 * (0.1 / 0.5) + 0.3) * g1
    assert torch.allclose(out, want)


def test_strategies_hand_computed():
    g0 = _t(2.0, 0.0)
    small = _t(-1.0, 0.5)   # norm ~1.118 < 2, conflicting
    big = _t(-3.0, 4.0)     # norm 5 > 2, conflicting
    n_small = math.hypot(-1.0, 0.5)

    def proj(g):
        return g - (g @ g0) / (g0 @ g0) * g0

    def sc(g_norm):
        return 0.7 * (2.0 / g_norm) + 0.3  # EMA ratio equals current-norm ratio after 1 step

    cases = {
        "A": g0 + proj(small) + proj(big),
        "B": g0 + sc(n_small) * small + sc(5.0) * big,
        "C": g0 + sc(n_small) * proj(small) + sc(5.0) * proj(big),
        "none": g0 + small + big,
        "hmg": g0 + small + sc(5.0) * proj(big),
    }
    for s, want in cases.items():
        (out,), _ = HMG(3, s).combine([[g0], [small], [big]])
        assert torch.allclose(out, want), s


def test_ema_two_steps_and_state_dict():
    h = HMG(2, "hmg", beta=0.9)
    g0a, g1a = _t(1.0, 0.0), _t(0.0, 0.5)  # step 1: aux smaller -> untouched
    (o1,), _ = h.combine([[g0a], [g1a]])
    assert torch.allclose(o1, g0a + g1a)
    assert torch.allclose(h.ema, torch.tensor([[0.1], [0.05]], dtype=D))
    sd = h.state_dict()
    # step 2: current aux norm 3 > target 1, but what decides is the EMA:
    # m0 = 0.9*0.1 + 0.1*1 = 0.19 ; m1 = 0.9*0.05 + 0.1*3 = 0.345 > m0 -> fires
    g0b, g1b = _t(1.0, 0.0), _t(0.0, 3.0)
    (o2,), _ = h.combine([[g0b], [g1b]])
    want = g0b + (0.7 * 0.19 / 0.345 + 0.3) * g1b
    assert torch.allclose(o2, want)
    # restoring the state reproduces step 2 exactly
    h2 = HMG(2, "hmg", beta=0.9)
    h2.load_state_dict(sd)
    (o2b,), _ = h2.combine([[g0b], [g1b]])
    assert torch.allclose(o2b, o2) and h2.steps == 2


def test_ema_decides_not_current_norm():
    h = HMG(2, "hmg", beta=0.9)
    h.combine([[_t(10.0)], [_t(1.0)]])  # m0 = 1.0, m1 = 0.1
    g0, g1 = _t(1.0), _t(-5.0)  # current aux norm is larger, EMA m1 = 0.59 < m0 = 1.0
    (out,), _ = h.combine([[g0], [g1]])
    assert torch.allclose(out, g0 + g1)
    # the paper's variant (current norms) fires
    hp = HMG(2, "hmg", use_ema=False)
    (outp,), _ = hp.combine([[g0], [g1]])
    # projection of -5 onto normal plane of 1 (1-D) is 0
    assert torch.allclose(outp, g0)


def test_per_tensor_decisions_and_none_grads():
    g0 = [_t(1.0, 0.0), _t(5.0)]
    g1 = [_t(-2.0, 2.0), None]
    out, stats = HMG(2, "hmg").combine([g0, g1])
    proj = _t(0.0, 2.0)
    n1 = math.hypot(2.0, 2.0)
    assert torch.allclose(out[0], g0[0] + (0.7 * 1.0 / n1 + 0.3) * proj)
    assert torch.allclose(out[1], g0[1])
    assert stats["aux"][0]["frac_projected"] == 1.0  # 1 of the 1 tensor where aux is non-zero


class _ThreadComm:
    """Rank ``rank`` of a world of 2 threads: ``all_reduce_sum_`` really sums what the two
    threads pass in (a barrier, then each adds the other's vector), so a rank whose shard
    differs from the other's sees the difference. Counts its calls."""

    world_size = 2

    def __init__(self, rank: int, shared: dict, barrier):
        self.rank, self.shared, self.barrier, self.calls = rank, shared, barrier, 0

    def all_reduce_sum_(self, t):
        self.calls += 1
        self.shared[self.rank] = t.clone()
        self.barrier.wait()
        total = self.shared[0] + self.shared[1]
        self.barrier.wait()  # both have read before either call can overwrite
        return t.copy_(total)


def _two_ranks(grads_per_rank, sharded, strategy="hmg"):
    """Run HMG.combine on two threads that each hold their own shards."""
    import threading

    shared, barrier, out = {}, threading.Barrier(2, timeout=30), {}
    comms = [_ThreadComm(r, shared, barrier) for r in range(2)]

    def work(r):
        out[r] = HMG(len(grads_per_rank[r]), strategy).combine(grads_per_rank[r], sharded=sharded, comm=comms[r])

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(out) == {0, 1}, "a rank did not finish"
    return out, comms


@pytest.mark.parametrize("strategy", ["hmg", "C"])
def test_sharded_scalars_one_collective(strategy):
    """Tensor 0 is sharded (rows split over the two ranks, different values), tensor 1 is
    replicated (the same, already all-reduced, gradient on both). Each rank's combined rows
    and the replicated tensor must equal one process's HMG over the whole tensors, and the
    statistics must be the global ones. A comm that reduced the wrong tensor, both, or
    neither gives other coefficients on some rank (or other statistics)."""
    # target / aux gradients of the user rows: rank 0 holds row 0, rank 1 row 1 (2-d rows)
    g0_rows = [_t(1.0, 0.0), _t(0.2, 3.0)]
    g1_rows = [_t(-4.0, 1.0), _t(0.5, -0.5)]
    # replicated tensor: target small, aux large and conflicting -> projected and rescaled
    g0_rep, g1_rep = _t(2.0, 0.0), _t(-3.0, 4.0)
    per_rank = [[[g0_rows[r], g0_rep], [g1_rows[r], g1_rep]] for r in range(2)]
    out, comms = _two_ranks(per_rank, sharded=[True, False], strategy=strategy)
    assert [c.calls for c in comms] == [1, 1]  # the sharded scalars travel in ONE collective

    # oracle: one process holding the whole user-row tensor
    full = [[torch.stack(g0_rows), g0_rep], [torch.stack(g1_rows), g1_rep]]
    ref, ref_stats = HMG(2, strategy).combine(full)
    # the data are chosen so that the sharded tensor's global decision differs from what
    # either rank alone would decide (rank 1 alone: aux smaller than target, nothing fires)
    alone = [HMG(2, strategy).combine([[g0_rows[r], g0_rep], [g1_rows[r], g1_rep]])[0][0] for r in range(2)]
    assert not torch.allclose(alone[1], ref[0][1])
    for r in range(2):
        combined, stats = out[r]
        assert torch.allclose(combined[0], ref[0][r]), (r, combined[0], ref[0][r])
        assert torch.allclose(combined[1], ref[1]), (r, combined[1], ref[1])
        for k in ("norm_ratio", "cosine", "frac_projected", "frac_rescaled"):
            assert stats["aux"][0][k] == pytest.approx(ref_stats["aux"][0][k], rel=1e-12), (r, k)
        assert stats["target_norm"] == pytest.approx(ref_stats["target_norm"], rel=1e-12)
    # and the replicated tensor really was modified (projection + rescale), so out[1] is checked
    proj = g1_rep - (g1_rep @ g0_rep) / (g0_rep @ g0_rep) * g0_rep
    assert torch.allclose(ref[1], g0_rep + (0.7 * 2.0 / 5.0 + 0.3) * proj)


def test_bad_strategy():
    with pytest.raises(ValueError):
        HMG(2, "X")


def _contributions(grads, alpha, gamma, j):
    """Each auxiliary task's term in tensor j, built from the coefficients by hand."""
    g0 = grads[0][j]
    return [alpha[t, j] * grads[t][j] + gamma[t, j] * g0 for t in range(1, len(grads)) if grads[t][j] is not None]


@pytest.mark.parametrize("strategy", ["hmg", "none", "B"])
@pytest.mark.parametrize("kappa", [0.1, 0.5, 2.0])
def test_aux_budget_caps_sum_of_aux_norms(strategy, kappa):
    g = torch.Generator().manual_seed(3)
    # 4 tasks x 3 tensors, aux norms 1x-1000x the target's, tensor 2 has no target gradient
    scales = [1.0, 1000.0, 30.0, 1.0]
    grads = [[torch.randn(5, generator=g, dtype=D) * s, torch.randn(2, 3, generator=g, dtype=D) * s,
              None if t == 0 else torch.randn(4, generator=g, dtype=D) * s] for t, s in enumerate(scales)]
    ref = HMG(4, strategy, relax=0.7)
    want, st_ref = ref.combine(grads)
    capped = HMG(4, strategy, relax=0.7, aux_budget=kappa)
    out, st = capped.combine(grads)
    per_tensor = []
    for j in range(2):
        g0 = grads[0][j]
        parts = _contributions(grads, st_ref["alpha"], st_ref["gamma"], j)
        s = sum(float(p.norm()) for p in parts)
        cap = kappa * float(g0.norm())
        f = min(1.0, cap / s)
        assert torch.allclose(out[j], g0 + f * sum(parts), rtol=1e-12, atol=1e-12)
        assert float((out[j] - g0).norm()) <= cap * (1 + 1e-9)
        per_tensor.append(f * s)
    assert torch.equal(out[2], want[2])  # no target gradient: left as the strategy made it
    per_tensor.append(sum(float((st_ref["alpha"][t, 2] * grads[t][2]).norm()) for t in range(1, 4)))
    g0_norm = math.sqrt(sum(float(grads[0][j].square().sum()) for j in range(2)))
    assert math.isclose(st["aux_total_bound"], math.sqrt(sum(x * x for x in per_tensor)) / g0_norm, rel_tol=1e-9)
    for a in st["aux"]:
        assert a["applied_ratio"] >= 0.0


def test_aux_budget_off_and_not_binding_change_nothing():
    g0, g1 = _t(3.0, 0.0), _t(-1.0, 1.0)
    (a,), _ = HMG(2, "hmg").combine([[g0], [g1]])
    (b,), st = HMG(2, "hmg", aux_budget=10.0).combine([[g0], [g1]])
    assert torch.equal(a, b) and st["aux"][0]["frac_rescaled"] == 0.0
    (c,), _ = HMG(2, "hmg", aux_budget=0.0).combine([[g0], [g1]])  # 0 = off, as in the config
    assert torch.equal(a, c)
    assert math.isclose(st["aux"][0]["applied_ratio"], math.sqrt(2) / 3)
    with pytest.raises(ValueError):
        HMG(2, "hmg", aux_budget=-1.0)


@pytest.mark.parametrize("kappa", [0.2, 1.0])
def test_aux_budget_per_row(kappa):
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(6, 3, generator=g, dtype=D) * s, torch.randn(4, generator=g, dtype=D) * s]
             for s in (1.0, 300.0, 0.01)]
    grads[0][0][2] = 0.0  # a row the target does not touch: its auxiliary gradient is removed
    _, st_ref = HMG(3, "hmg", relax=0.7).combine(grads)
    out, st = HMG(3, "hmg", relax=0.7, aux_budget=kappa, budget_rows=True).combine(grads)
    g0 = grads[0][0]
    parts = _contributions(grads, st_ref["alpha"], st_ref["gamma"], 0)
    want = g0.clone()
    applied = [0.0, 0.0]
    for r in range(6):
        s = sum(float(p[r].norm()) for p in parts)
        cap = kappa * float(g0[r].norm())
        f = min(1.0, cap / s) if s > 0 else 1.0
        for k, p in enumerate(parts):
            want[r] += f * p[r]
            applied[k] += float((f * p[r]).square().sum())
        assert float((out[0][r] - g0[r]).norm()) <= cap * (1 + 1e-9) + 1e-15
    assert torch.allclose(out[0], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0][2], g0[2])
    # the 1-D tensor is capped as one row
    parts1 = _contributions(grads, st_ref["alpha"], st_ref["gamma"], 1)
    f1 = min(1.0, kappa * float(grads[0][1].norm()) / sum(float(p.norm()) for p in parts1))
    assert torch.allclose(out[1], grads[0][1] + f1 * sum(parts1), rtol=1e-12)
    n0 = math.sqrt(sum(float(x.square().sum()) for x in grads[0]))
    ap1 = math.sqrt(applied[0] + float((f1 * parts1[0]).square().sum()))
    assert math.isclose(st["aux"][0]["applied_ratio"], ap1 / n0, rel_tol=1e-9)
