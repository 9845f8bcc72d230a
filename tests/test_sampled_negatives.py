"""Sampled-negatives InfoNCE (``loss.negatives = "sampled"``): the loss equals a brute-force loop
over the same sampled candidate set (in-batch positives with π = 1, sampled ids with their
logQ correction, false negatives removed but the positive kept), its gradient passes a float64
gradcheck, with every candidate drawn it is the exact loss, the draws depend only on (seed,
epoch, step), 1 rank and 2 gloo ranks give the same training steps, and bad settings are
one-line ConfigErrors naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from mbssl_dist.config import ConfigError, load_config
from mbssl_dist.training.losses import Anchors, NegativeSampler, SampledCandidates, info_nce, sampled_info_nce
from mbssl_dist.utils.seeding import make_generator


def _case(seed=0, n_cand=40, n_anchor=9, d=6, n_fn=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    cand = torch.randn(n_cand, d, generator=g, dtype=dtype)
    a_rows = torch.randperm(n_cand, generator=g)[:n_anchor]
    anchor = torch.randn(n_anchor, d, generator=g, dtype=dtype)
    weight = torch.randint(1, 4, (n_anchor,), generator=g).to(dtype)
    fn_idx = torch.randint(0, n_cand, (n_anchor * n_fn,), generator=g)
    fn_idx[0] = a_rows[0]  # the anchor's own id among its false negatives: must stay in
    indptr = torch.arange(0, n_anchor * n_fn + 1, n_fn)
    meta = Anchors(a_rows, weight, a_rows, indptr, fn_idx)
    return anchor, cand, meta


def _weights(meta, sample: SampledCandidates, a: int, in_batch: bool) -> dict[int, float]:
    """Anchor a's candidate set as {id: 1/π}: the sample, then in-batch ids (or only a's own
    positive without in-batch candidates) with π = 1."""
    ids = [int(i) for i in meta.global_ids()]
    w_of = {int(i): 1.0 / math.exp(float(lp)) for i, lp in zip(sample.ids, sample.log_pi)}
    for i in (ids if in_batch else [ids[a]]):
        w_of[i] = 1.0
    return w_of


def _brute(anchor, cand, meta, sample: SampledCandidates, tau, fn_mode="remove", in_batch=True):
    """Loop over anchors and candidates: denominator over in-batch ids (π = 1) ∪ sampled ids
    (weight 1/π), false negatives other than the positive dropped."""
    ids = [int(i) for i in meta.global_ids()]
    cos = lambda x, y: float(torch.dot(x, y) / (x.norm() * y.norm()))  # noqa: E731
    total = 0.0
    for a in range(len(ids)):
        w_of = _weights(meta, sample, a, in_batch)
        fn = {int(v) for v in meta.fn_indices[meta.fn_indptr[a]:meta.fn_indptr[a + 1]]}
        den = 0.0
        for v, wv in w_of.items():
            if v in fn and (fn_mode == "reference" or v != ids[a]):
                if fn_mode == "remove":
                    continue
                den += wv * 1.0  # reference: logit set to 0
                continue
            den += wv * math.exp(cos(anchor[a], cand[v]) / tau)
        pos = cos(anchor[a], cand[ids[a]]) / tau
        total += float(meta.weight[a]) * (math.log(den) - pos)
    return total


def _brute_cv(anchor, cand, meta, sample: SampledCandidates, tau, in_batch=True):
    """Loop form of the control-variate estimator: |C|·e^μ + Σ_set (e^s − h)/π over non-FN,
    − Σ_set h/π over FN (the positive kept), h = e^μ(1 + s − μ), μ = mean_v s_av."""
    ids = [int(i) for i in meta.global_ids()]
    zn = cand / cand.norm(dim=1, keepdim=True)
    total = 0.0
    for a in range(len(ids)):
        w_of = _weights(meta, sample, a, in_batch)
        za = anchor[a] / anchor[a].norm()
        s = [float(za @ zn[v]) / tau for v in range(cand.shape[0])]
        mu = sum(s) / len(s)
        fn = {int(v) for v in meta.fn_indices[meta.fn_indptr[a]:meta.fn_indptr[a + 1]]} - {ids[a]}
        den = len(s) * math.exp(mu)
        for v, wv in w_of.items():
            h = math.exp(mu) * (1 + s[v] - mu)
            den += wv * (-h if v in fn else math.exp(s[v]) - h)
        total += float(meta.weight[a]) * (math.log(den) - s[ids[a]])
    return total


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_control_variate_equals_brute_force(kind):
    anchor, cand, meta = _case(seed=4)
    sample = NegativeSampler(cand.shape[0], 12, kind, torch.arange(cand.shape[0]) % 5).draw(
        make_generator(2, 0, 1, "negatives"))
    got = sampled_info_nce(anchor, cand[meta.rows], cand, 0.5, sample, meta, estimator="control_variate",
                           in_batch=True)
    want = _brute_cv(anchor, cand, meta, sample, 0.5)
    assert abs(float(got) - want) <= 1e-9 * max(1.0, abs(want))
    full = NegativeSampler(cand.shape[0], cand.shape[0]).draw(make_generator(0, 0, 0, "negatives"))
    exact = info_nce(anchor, cand[meta.rows], cand, 0.5, meta)
    got = sampled_info_nce(anchor, cand[meta.rows], cand, 0.5, full, meta, estimator="control_variate",
                           in_batch=True)
    assert abs(float(got) - float(exact)) <= 1e-9 * abs(float(exact))


def test_control_variate_gradcheck():
    anchor, cand, meta = _case(seed=5, n_cand=15, n_anchor=5, d=4)
    sample = NegativeSampler(15, 6, "uniform").draw(make_generator(0, 1, 2, "negatives"))
    positive = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    inputs = (anchor.requires_grad_(), positive.requires_grad_(), cand.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, p, c: sampled_info_nce(a, p, c, 0.5, sample, meta, estimator="control_variate", in_batch=True), inputs)


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
@pytest.mark.parametrize("fn_mode", ["remove", "reference"])
def test_equals_brute_force_on_same_candidates(kind, fn_mode):
    anchor, cand, meta = _case()
    counts = torch.arange(cand.shape[0]) % 7
    sampler = NegativeSampler(cand.shape[0], 12, kind, counts)
    sample = sampler.draw(make_generator(1, 0, 3, "negatives"))
    assert sample.ids.numel() > 3 and bool((sample.log_pi < 0).all())
    positive = cand[meta.rows]
    got = sampled_info_nce(anchor, positive, cand, 0.5, sample, meta, fn_mode=fn_mode, in_batch=True)
    want = _brute(anchor, cand, meta, sample, 0.5, fn_mode)
    assert abs(float(got) - want) <= 1e-9 * max(1.0, abs(want))


@pytest.mark.parametrize("estimator", ["logq", "control_variate"])
@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_without_in_batch_equals_brute_force(kind, estimator):
    """in_batch = False: own positive (π = 1) + the sample, the own id counted once when drawn.
    The draw must contain some anchors' own ids and miss others, and differ from the in-batch
    loss, or the test would not tell the two sets apart."""
    anchor, cand, meta = _case(seed=6, n_cand=30, n_anchor=10)
    sample = NegativeSampler(cand.shape[0], 14, kind, torch.arange(cand.shape[0]) % 5).draw(
        make_generator(3, 0, 2, "negatives"))
    drawn = torch.isin(meta.rows, sample.ids)
    assert bool(drawn.any()) and not bool(drawn.all())
    brute = _brute if estimator == "logq" else _brute_cv
    got = sampled_info_nce(anchor, cand[meta.rows], cand, 0.5, sample, meta, estimator=estimator, in_batch=False)
    want = brute(anchor, cand, meta, sample, 0.5, in_batch=False)
    assert abs(float(got) - want) <= 1e-9 * max(1.0, abs(want))
    assert abs(want - brute(anchor, cand, meta, sample, 0.5)) > 1e-3
    full = NegativeSampler(cand.shape[0], cand.shape[0]).draw(make_generator(0, 0, 0, "negatives"))
    exact = info_nce(anchor, cand[meta.rows], cand, 0.5, meta)
    got = sampled_info_nce(anchor, cand[meta.rows], cand, 0.5, full, meta, estimator=estimator, in_batch=False)
    assert abs(float(got) - float(exact)) <= 1e-9 * abs(float(exact))


@pytest.mark.parametrize("estimator", ["logq", "control_variate"])
def test_without_in_batch_gradcheck(estimator):
    anchor, cand, meta = _case(seed=7, n_cand=15, n_anchor=6, d=4)
    sample = NegativeSampler(15, 7, "uniform").draw(make_generator(0, 2, 1, "negatives"))
    assert bool(torch.isin(meta.rows, sample.ids).any())
    positive = cand[meta.rows].clone()  # the positive row = the anchor's own candidate, as in training
    inputs = (anchor.requires_grad_(), positive.requires_grad_(), cand.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, p, c: sampled_info_nce(a, p, c, 0.5, sample, meta, estimator=estimator, in_batch=False), inputs)


def test_inclusion_probability():
    # uniform, n draws with replacement: π = 1 − (1 − 1/C)^n; popularity: p ∝ counts + 1
    s = NegativeSampler(50, 10, "uniform").draw(make_generator(0, 0, 0, "negatives"))
    assert torch.allclose(s.log_pi.exp(), torch.full_like(s.log_pi, 1 - (1 - 1 / 50) ** 10))
    counts = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int64)
    s = NegativeSampler(5, 3, "popularity", counts).draw(make_generator(0, 0, 0, "negatives"))
    p = (counts + 1).double() / 15
    assert torch.allclose(s.log_pi.exp(), 1 - (1 - p[s.ids]) ** 3)


def test_all_candidates_is_exact():
    anchor, cand, meta = _case(seed=2)
    sample = NegativeSampler(cand.shape[0], cand.shape[0], "uniform").draw(make_generator(0, 0, 0, "negatives"))
    positive = cand[meta.rows]
    for mode in ("remove", "reference"):
        exact = info_nce(anchor, positive, cand, 0.3, meta, fn_mode=mode)
        got = sampled_info_nce(anchor, positive, cand, 0.3, sample, meta, fn_mode=mode, in_batch=True)
        assert abs(float(got) - float(exact)) <= 1e-9 * abs(float(exact))


def test_gradcheck():
    anchor, cand, meta = _case(seed=3, n_cand=15, n_anchor=5, d=4)
    sample = NegativeSampler(15, 6, "popularity", torch.arange(15)).draw(make_generator(0, 1, 2, "negatives"))
    positive = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    inputs = (anchor.requires_grad_(), positive.requires_grad_(), cand.requires_grad_())
    assert torch.autograd.gradcheck(lambda a, p, c: sampled_info_nce(a, p, c, 0.5, sample, meta, in_batch=True), inputs)


def test_same_draws_for_same_key():
    counts = torch.arange(1000) % 13
    for kind in ("uniform", "popularity"):
        a = NegativeSampler(1000, 64, kind, counts).draw(make_generator(5, 2, 7, "negatives"))
        b = NegativeSampler(1000, 64, kind, counts).draw(make_generator(5, 2, 7, "negatives"))
        c = NegativeSampler(1000, 64, kind, counts).draw(make_generator(5, 2, 8, "negatives"))
        assert torch.equal(a.ids, b.ids) and torch.equal(a.log_pi, b.log_pi)
        assert not torch.equal(a.ids, c.ids)


@pytest.mark.parametrize("overrides", [
    ["loss.negatives=\"sampled\"", "loss.n_negatives=30", "loss.negative_estimator=\"logq\""],
    ["loss.negatives=\"sampled\"", "loss.n_negatives=20", "loss.negative_sampler=\"popularity\""],
    ["loss.negatives=\"sampled\"", "loss.n_negatives=20", "loss.negative_estimator=\"control_variate\""],
    ["loss.negatives=\"sampled\"", "loss.n_negatives=20", "loss.in_batch_negatives=true"],
    ["loss.negatives=\"sampled\"", "loss.n_negatives=30", "loss.negative_estimator=\"logq\"",
     "loss.negative_sampler=\"popularity\"", "loss.in_batch_negatives=true"],
])
def test_two_ranks_equal_one(tiny_data, tmp_path, overrides):
    """Same seed: both gloo ranks draw the same candidates, so 2 ranks reproduce 1 rank's losses,
    HMG state and parameters (a rank drawing other ids would change the all-reduced user
    denominators and the replicated item gradients)."""
    from tests.test_distributed import assert_same, balanced, run_world

    one = run_world(1, tiny_data, balanced(120, 1), overrides, tmp_path / "p1")
    two = run_world(2, tiny_data, balanced(120, 2), overrides, tmp_path / "p2")
    assert_same(one, two, "sampled P=2")
    exact = run_world(1, tiny_data, balanced(120, 1), [], tmp_path / "exact")
    assert exact[0]["records"][0]["losses"]["intra"] != one[0]["records"][0]["losses"]["intra"]


def test_in_batch_negatives_reaches_the_training_step(tiny_data, tmp_path):
    """loss.in_batch_negatives is not dropped on its way to the losses: through TrainStep the
    two candidate sets give different SSL losses (the same draws, the same initialization)."""
    from tests.test_distributed import balanced, run_world

    base = ["loss.negatives=\"sampled\"", "loss.n_negatives=20"]
    own = run_world(1, tiny_data, balanced(120, 1), base, tmp_path / "own")
    inb = run_world(1, tiny_data, balanced(120, 1), base + ["loss.in_batch_negatives=true"], tmp_path / "inb")
    lo, li = own[0]["records"][0]["losses"], inb[0]["records"][0]["losses"]
    assert lo["rec"] == li["rec"]  # the first step's target loss does not depend on the SSL candidates
    inter = [k for k in lo if k.startswith("inter_")]
    assert inter and lo["intra"] != li["intra"] and all(lo[k] != li[k] for k in inter)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from mbssl_dist.data.prepare import prepare_synthetic
    from mbssl_dist.data.synthetic import SyntheticSpec

    d = tmp_path_factory.mktemp("sampled") / "data"
    prepare_synthetic(d, SyntheticSpec(n_users=120, n_items=80, n_clusters=4, seed=3, target_per_user=5))
    return d


def test_default_is_exact():
    cfg = load_config(None, [])
    assert cfg.loss.negatives == "all"


@pytest.mark.parametrize("override, field", [
    ("loss.negatives=\"some\"", "loss.negatives"),
    ("loss.negative_sampler=\"zipf\"", "loss.negative_sampler"),
    ("loss.n_negatives=1.5", "loss.n_negatives"),
    ("loss.negative_estimator=\"exact\"", "loss.negative_estimator"),
])
def test_config_errors(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value) and "\n" not in str(e.value)


def test_n_negatives_must_be_positive():
    load_config(None, ["loss.n_negatives=0"])  # unused in exact mode
    with pytest.raises(ConfigError, match="loss.n_negatives"):
        load_config(None, ["loss.negatives=\"sampled\"", "loss.n_negatives=0"])
    with pytest.raises(ConfigError, match="loss.negative_estimator"):
        load_config(None, ["loss.negatives=\"sampled\"", "loss.negative_estimator=\"control_variate\"",
                           "loss.fn_mode=\"reference\""])
    with pytest.raises(ConfigError, match="loss.in_batch_negatives"):
        load_config(None, ["loss.negatives=\"sampled\"", "loss.negative_estimator=\"logq\"",
                           "loss.in_batch_negatives=false", "loss.fn_mode=\"reference\""])
