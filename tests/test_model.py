import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mbssl_dist.graph.multigraph import BehaviorGraph
from mbssl_dist.config import HMGConfig, LossConfig, TrainConfig
from mbssl_dist.graph.sparse import sparse_backend, spmm
from mbssl_dist.model import MBSSL
from mbssl_dist.model.propagation import Propagation, Workspace
from mbssl_dist.parallel.comm import LocalComm
from mbssl_dist.training import HMG, NonFiniteLossError, TrainState, TrainStep, build_batch
from mbssl_dist.utils.seeding import make_generator
from tests import autograd_model as oracle
from tests.autograd_model import make_views

D = torch.float64
NU, NI, K = 7, 6, 3


@pytest.fixture(autouse=True, params=["scipy", "torch"])
def backend(request):
    """Every test here runs with both sparse kernels: scipy (the CPU path) and torch (the
    CUDA path, run on CPU tensors)."""
    with sparse_backend(request.param):
        yield request.param


def _graphs(seed=0):
    rng = np.random.default_rng(seed)
    gs = []
    for k, p in enumerate([0.5, 0.4, 0.3]):
        m = rng.random((NU, NI)) < p
        m[np.arange(NU), rng.integers(0, NI, NU)] = True  # every user has one edge
        u, i = np.nonzero(m)
        gs.append(BehaviorGraph.from_pairs(u, i, NU, NI))
    return gs


def _adjs(gs):
    return [g.adjacency("sym", D) for g in gs]


def _naive(model, gs):
    """Straight transcription of the reference propagation (dense symmetric adjacency over
    users+items, per-behavior loop, per-behavior attention loop), eval mode (no dropout)."""
    N = NU + NI
    ego = torch.cat([model.user_embedding, model.item_embedding]).unsqueeze(1).repeat(1, K, 1)
    allemb = ego
    rels = [[model.relation_embedding[k].view(1, -1)] for k in range(K)]
    for l in range(model.n_layers):
        hs = []
        for k in range(K):
            A = torch.zeros(N, N, dtype=D)
            dense = torch.from_numpy(gs[k].to_scipy().toarray()).to(D)
            A[:NU, NU:] = dense
            A[NU:, :NU] = dense.T
            deg = A.sum(1)
            dinv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
            A = dinv[:, None] * A * dinv[None, :]
            e = A @ ego[:, k]
            hs.append(F.leaky_relu((e * rels[k][l]) @ model.W_gc[l]))
        st = torch.stack(hs, 1)
        outs = []
        for i in range(K):
            if model.use_cdm:
                att = torch.softmax((torch.tanh(st @ model.att_w1[i]) @ model.att_w2[i].view(-1, 1)).squeeze(2), 1)
                outs.append((att.unsqueeze(1) @ st).squeeze(1))
            else:
                outs.append(st[:, i])
        ego = torch.stack(outs, 1)
        allemb = allemb + ego
        for k in range(K):
            rels[k].append(rels[k][l] @ model.W_rel[l])
    allemb = allemb / (model.n_layers + 1)
    rel = torch.stack([torch.stack(r, 0).mean(0).view(-1) for r in rels])
    return allemb[:NU], allemb[NU:], rel


@pytest.mark.parametrize("use_cdm", [True, False])
def test_forward_matches_naive_reference(use_cdm):
    gs = _graphs()
    m = MBSSL(NU, NI, K, dim=4, n_layers=3, att_dim=2, use_cdm=use_cdm, dtype=D).eval()
    with torch.no_grad():
        p = m(_adjs(gs))
        u, i, r = _naive(m, gs)
    assert p.users.shape == (NU, K, 4) and p.items.shape == (NI, K, 4)
    assert torch.allclose(p.users, u) and torch.allclose(p.items, i) and torch.allclose(p.relations, r)
    with torch.no_grad():
        s = m.score(m(_adjs(gs)), torch.tensor([0, 3]))
    want = u[[0, 3], -1] @ (i[:, -1] * r[-1]).T
    assert torch.allclose(s, want)


def test_views_on_unchanged_graph_equal_main_target():
    gs = _graphs(1)
    m = MBSSL(NU, NI, K, dim=4, n_layers=2, att_dim=2, dtype=D).eval()
    adjs = _adjs(gs)
    with torch.no_grad():
        p = m(adjs)
        main_t = torch.cat([p.users[:, -1], p.items[:, -1]])
        rel, ego0 = m.relation_layers()[:-1], torch.cat([m.user_embedding, m.item_embedding])
        main = Propagation(m, adjs, LocalComm(), ws=Workspace())
        main.forward(rel, ego0)
        for mode in ("target", "full"):
            view = Propagation(m, [adjs[-1]], LocalComm(), "v", base=main) if mode == "target" else \
                Propagation(m, adjs[:-1] + [adjs[-1]], LocalComm(), "v")
            v = view.forward(rel, ego0)[-1]
            assert torch.allclose(v, main_t), mode


def test_dropout_deterministic_from_generator_and_local_rows():
    gs = _graphs(2)
    m = MBSSL(NU, NI, K, dim=4, n_layers=2, att_dim=2, dtype=D).train()
    adjs = _adjs(gs)
    a = m(adjs, generator=make_generator(1, 0, 5, "dropout")).users
    b = m(adjs, generator=make_generator(1, 0, 5, "dropout")).users
    c = m(adjs, generator=make_generator(1, 0, 6, "dropout")).users
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        m(adjs)  # training with dropout needs a generator


def test_init_of_local_rows_matches_global():
    full = MBSSL(10, NI, K, dim=4, init_generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([2, 7, 9])
    part = MBSSL(3, NI, K, dim=4, n_users_global=10, user_ids=ids, init_generator=torch.Generator().manual_seed(3))
    assert torch.equal(part.user_embedding, full.user_embedding[ids])
    assert torch.equal(part.item_embedding, full.item_embedding)
    assert part.sharded_flags().count(True) == 1


def test_spmm_gradcheck():
    g = _graphs(3)[0]
    a_ui, a_iu = g.adjacency("row", D)
    x = torch.randn(NI, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: spmm(a_ui, t), (x,))
    assert torch.allclose(spmm(a_ui, x), a_ui.to_dense() @ x)


def test_model_gradcheck_small():
    gs = _graphs(4)
    m = MBSSL(NU, NI, K, dim=3, n_layers=2, att_dim=2, dtype=D).eval()
    adjs = _adjs(gs)
    # central finite differences (float64) on a few coordinates of several parameter tensors
    def loss():  # the autograd oracle, itself checked here against finite differences
        p = oracle.forward(m, adjs)
        return (p.users[:, -1] @ (p.items[:, -1] * p.relations[-1]).T).square().sum()

    l = loss()
    grads = torch.autograd.grad(l, [m.user_embedding, m.W_gc[1], m.att_w1, m.relation_embedding])
    eps = 1e-6
    for prm, gr in zip([m.user_embedding, m.W_gc[1], m.att_w1, m.relation_embedding], grads):
        flat = prm.data.view(-1)
        for idx in [0, flat.numel() // 2, flat.numel() - 1]:
            old = flat[idx].item()
            flat[idx] = old + eps
            lp = loss().item()
            flat[idx] = old - eps
            lm = loss().item()
            flat[idx] = old
            fd = (lp - lm) / (2 * eps)
            assert abs(fd - gr.reshape(-1)[idx].item()) < 1e-6 * max(1.0, abs(fd)), (prm.shape, idx)


def test_interaction_per_item_score():
    """score = base + b_i + Σ_k X_k[u, i] (w_k + v_{k,i}) with the target column masked."""
    gs = _graphs(5)
    m = MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2, interaction_scoring=True, interaction_per_item=True,
              dtype=D).eval()
    with torch.no_grad():
        m.behavior_weight.copy_(torch.tensor([0.5, -1.0, 7.0], dtype=D))
        m.item_bias.copy_(torch.arange(NI, dtype=D))
        m.behavior_item_weight.copy_(torch.randn(K, NI, generator=torch.Generator().manual_seed(3), dtype=D))
    adjs = _adjs(gs)
    X = [torch.from_numpy(g.to_scipy().toarray()).to(D) for g in gs]
    users = torch.tensor([1, 4])
    v = m.behavior_item_weight.detach()
    with torch.no_grad():
        p = m(adjs)
        want = p.users[users, -1] @ (p.items[:, -1] * p.relations[-1]).T + torch.arange(NI, dtype=D)
        for k, wk in enumerate([0.5, -1.0]):
            want = want + X[k][users] * (wk + v[k])
        got = m.score(m(adjs), users, user_items=[x.to_sparse_csr() for x in X])
        assert torch.allclose(got, want)
        # the pair form used by the losses (indicator rows + item ids) gives the same term
        base = p.users[users[1], -1] @ (p.items[:, -1] * p.relations[-1]).T + torch.arange(NI, dtype=D)
        ind = torch.stack([X[k][users[1]] for k in range(K)], 1)  # [NI, K]
        assert torch.allclose(m.interaction_term(ind, torch.arange(NI)), got[1] - base)


def test_interaction_scoring_score():
    gs = _graphs(5)
    m = MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2, interaction_scoring=True, dtype=D).eval()
    with torch.no_grad():
        m.behavior_weight.copy_(torch.tensor([0.5, -1.0, 7.0], dtype=D))
        m.item_bias.copy_(torch.arange(NI, dtype=D))
    adjs = _adjs(gs)
    X = [torch.from_numpy(g.to_scipy().toarray()).to(D) for g in gs]
    users = torch.tensor([1, 4])
    with torch.no_grad():
        p = m(adjs)
        base = p.users[users, -1] @ (p.items[:, -1] * p.relations[-1]).T
        want = base + torch.arange(NI, dtype=D) + 0.5 * X[0][users] - 1.0 * X[1][users]  # target indicator off
        csr = [x.to_sparse_csr() for x in X]
        assert torch.allclose(m.score(m(adjs), users, user_items=csr), want)


# ----------------------------------------------------------------------------- step
def _paper_hmg() -> HMGConfig:  # the paper's HMG (the built-in defaults add a budget and r = 1)
    return HMGConfig(relax=0.7, aux_budget=0.0, aux_budget_rows=False)


def _step(m, **loss_kw) -> TrainStep:
    return TrainStep(m, LossConfig(**{"lambdas": [0.2, 0.3, 0.5], **loss_kw}), _paper_hmg(), TrainConfig(lr=1e-3))


def _step_setup(**cfg_kw):
    gs = _graphs(6)
    m = MBSSL(NU, NI, K, dim=4, n_layers=2, att_dim=2, dtype=D)
    step = _step(m, neg_weight=[0.1], decay=0.01, tau=0.5, **cfg_kw)
    csr = [(g.indptr, g.indices) for g in gs]
    ufn = (torch.arange(NU + 1) * 2, torch.randint(0, NU, (2 * NU,), generator=torch.Generator().manual_seed(0)))
    ifn = (torch.arange(NI + 1), torch.randint(0, NI, (NI,), generator=torch.Generator().manual_seed(1)))
    batch = build_batch(csr, torch.tensor([0, 2, 5]), NI, user_fn=ufn, item_fn=ifn,
                        interaction=m.interaction_scoring)
    views = make_views(gs[-1], "edge", 0.5, 2020, 0, dtype=D)
    return gs, m, step, batch, views


def test_train_step_runs_and_updates():
    gs, m, step, batch, views = _step_setup()
    before = [p.detach().clone() for p in m.parameters()]
    res = step(batch, _adjs(gs), views)
    assert res.tasks == ["rec", "intra", "inter_0", "inter_1"]
    assert set(res.losses) == {"rec", "intra", "inter_0", "inter_1", "reg"}
    assert all(math.isfinite(v) for v in res.losses.values())
    assert len(res.hmg["aux"]) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert step.state.step == 1


def test_train_step_matches_manual_hmg_combination():
    gs, m, step, batch, views = _step_setup(view_propagation="full")
    adjs = _adjs(gs)
    m2 = MBSSL(NU, NI, K, dim=4, n_layers=2, att_dim=2, dtype=D)
    m2.load_state_dict(m.state_dict())
    # manual: same losses, per-task grads, HMG, + reg, Adam
    step2 = TrainStep(m2, step.loss, _paper_hmg(), TrainConfig(lr=1e-3))
    losses = oracle.compute_losses(step2, batch, adjs, views, make_generator(2020, 0, 0, "dropout"))
    params = list(m2.parameters())
    grads = [torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True) for t in step2.tasks]
    reg = torch.autograd.grad(losses["reg"], params, allow_unused=True)
    comb, _ = HMG(4).combine([list(g) for g in grads])
    opt = torch.optim.Adam(params, lr=1e-3)
    for p, c, r in zip(params, comb, reg):
        p.grad = c + (r if r is not None else 0)
    opt.step()
    step(batch, adjs, views)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-12)


def test_ablations_and_interaction_scoring_step():
    gs, m, step, batch, views = _step_setup(use_intra=False, use_inter=False)
    res = step(batch, _adjs(gs))
    assert res.tasks == ["rec"] and res.hmg["aux"] == []
    gs = _graphs(6)
    m = MBSSL(NU, NI, K, dim=4, n_layers=2, att_dim=2, dtype=D, interaction_scoring=True, use_cdm=False)
    step = _step(m, use_inter=False)
    csr = [(g.indptr, g.indices) for g in gs]
    b = build_batch(csr, torch.tensor([0, 1]), NI, interaction=True)
    res = step(b, _adjs(gs), make_views(gs[-1], "node", 0.5, 1, 0, dtype=D))
    assert m.item_bias.grad is None  # cleared after the step
    assert not torch.equal(m.item_bias.detach(), torch.zeros(NI, dtype=D))


def test_non_finite_loss_names_task():
    gs, m, step, batch, views = _step_setup()
    with torch.no_grad():
        m.W_gc[0].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="rec"):
        step(batch, _adjs(gs), views)


def test_train_state_roundtrip():
    gs, m, step, batch, views = _step_setup()
    step(batch, _adjs(gs), views)
    sd = step.state.state_dict()
    model_sd = {k: v.clone() for k, v in m.state_dict().items()}
    r1 = step(batch, _adjs(gs), views)
    after1 = [p.detach().clone() for p in m.parameters()]
    m.load_state_dict(model_sd)
    step.state.load_state_dict(sd)
    r2 = step(batch, _adjs(gs), views)
    assert r1.losses == r2.losses
    for a, b in zip(after1, m.parameters()):
        assert torch.equal(a, b)


def test_make_generator_streams():
    a = torch.rand(3, generator=make_generator(1, 2, 3, "x"))
    assert torch.equal(a, torch.rand(3, generator=make_generator(1, 2, 3, "x")))
    assert not torch.equal(a, torch.rand(3, generator=make_generator(1, 2, 3, "y")))


@pytest.mark.parametrize("view_mode,use_cdm,interaction,n_layers", [
    ("target", True, False, 2), ("target", True, True, 3), ("target", False, False, 2), ("full", True, False, 2),
    ("full", False, True, 1), ("target", True, False, 1), ("target", True, "per_item", 2), ("target", True, "bias", 2)])
def test_fast_batched_backward_matches_autograd_per_task(view_mode, use_cdm, interaction, n_layers):
    """The production step (one batched reverse pass for all tasks) gives the same per-task
    gradients as one autograd pass per task, including None for unused parameters."""
    gs = _graphs(7)
    m = MBSSL(NU, NI, K, dim=4, n_layers=n_layers, att_dim=2, dtype=D, use_cdm=use_cdm,
              interaction_scoring=interaction in (True, "per_item"), interaction_per_item=interaction == "per_item",
              item_bias=interaction == "bias")
    interaction = m.interaction_scoring
    if m.use_item_bias:
        with torch.no_grad():
            m.item_bias.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(0))
    if interaction:
        with torch.no_grad():
            m.behavior_weight.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=D))
            if m.interaction_per_item:
                m.behavior_item_weight.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(1))
    step = _step(m, neg_weight=[0.1], decay=0.01, tau=0.5, view_propagation=view_mode)
    csr = [(g.indptr, g.indices) for g in gs]
    ufn = (torch.arange(NU + 1) * 2, torch.randint(0, NU, (2 * NU,), generator=torch.Generator().manual_seed(0)))
    batch = build_batch(csr, torch.tensor([0, 2, 5, 6]), NI, user_fn=ufn, interaction=interaction)
    adjs = _adjs(gs)
    views = make_views(gs[-1], "node", 0.5, 2020, 0, dtype=D)
    names = step.tasks + ["reg"]
    m.train()
    pnames = [k for k, p in m.named_parameters() if p.requires_grad]
    # twice: the second pass runs on the reused workspace buffers (stale contents must not leak)
    for seed in (1, 2):
        slow = oracle.compute_losses(step, batch, adjs, views, make_generator(seed, 0, 0, "dropout"))
        want = {n: torch.autograd.grad(slow[n], step.params, retain_graph=True, allow_unused=True) for n in names}
        fast, ctx = step.forward(batch, adjs, views, make_generator(seed, 0, 0, "dropout"))
        for n in names:
            assert torch.allclose(fast[n], slow[n], rtol=1e-12, atol=1e-12), n
        got = step.task_grads(fast, ctx)
        for n in names:
            for pn, a, b in zip(pnames, got[n], want[n]):
                assert (a is None) == (b is None), (n, pn)
                if a is not None:
                    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (n, pn, (a - b).abs().max())


def test_sparse_op_mm_into_accumulates_and_checks_shapes():
    """``_SparseOp.mm_into`` (scipy's in-place kernel) = A @ x / Aᵀ @ x, written or added into
    a slice of a larger buffer; wrong shapes raise instead of reaching the unchecked kernel."""
    from mbssl_dist.graph.sparse import sparse_op

    g = torch.Generator().manual_seed(3)
    dense = torch.rand(7, 5, generator=g, dtype=D) * (torch.rand(7, 5, generator=g, dtype=D) > 0.5)
    op = sparse_op(dense.to_sparse_csr())
    x = torch.randn(5, 3, generator=g, dtype=D)
    buf = torch.full((2, 7, 3), 4.0, dtype=D)
    op.mm_into(x, buf[1])
    assert torch.allclose(buf[1], dense @ x) and bool((buf[0] == 4.0).all())
    op.mm_into(x, buf[1], accumulate=True)
    assert torch.allclose(buf[1], 2 * dense @ x)
    y = torch.randn(7, 3, generator=g, dtype=D)
    out = torch.empty(5, 3, dtype=D)
    op.mm_into(y, out, transpose=True)
    assert torch.allclose(out, dense.T @ y)
    with pytest.raises(ValueError):
        op.mm_into(y, torch.empty(7, 3, dtype=D))


def test_batch_to_device_copies_every_tensor():
    import torch

    from mbssl_dist.training import build_batch

    csr = [(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1])), (torch.tensor([0, 1, 2]), torch.tensor([1, 0]))]
    fn = (torch.tensor([0, 1, 2]), torch.tensor([1, 0]))
    b = build_batch(csr, torch.tensor([0, 1]), 2, user_fn=fn, item_fn=fn, interaction=True)
    c = b.to("meta")
    assert c.users.device.type == "meta" and c.user_anchors.fn_indices.device.type == "meta"
    assert all(t.device.type == "meta" for pair in c.pos for t in pair)
    assert b.users.device.type == "cpu"  # the original is untouched


@pytest.mark.parametrize("head", [(), (3,)])
def test_block_uniform_rows_do_not_depend_on_which_rows_are_drawn(head):
    """A row's dropout uniforms depend only on (seed, side, global id): drawing any subset of
    rows, in any order, over several blocks gives the same rows as drawing all of them."""
    from mbssl_dist.utils.seeding import MASK_BLOCK_ROWS, block_uniform

    n = 2 * MASK_BLOCK_ROWS + 37
    full = block_uniform(head, torch.arange(n), n, 4, 12345, 0, "cpu")
    assert full.shape == head + (n, 4)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:500]
    sub = block_uniform(head, ids, n, 4, 12345, 0, "cpu")
    assert torch.equal(sub, full.index_select(len(head), ids))
    other = block_uniform(head, torch.arange(n), n, 4, 12345, 1, "cpu")  # another side / seed differs
    assert not torch.equal(other, full)
    assert 0.45 < full.mean().item() < 0.55


def test_init_scale_multiplies_embedding_bounds_only():
    a = MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2, dtype=D)
    b = MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2, dtype=D, init_scale=10.0)
    assert torch.allclose(b.user_embedding, 10 * a.user_embedding)
    assert torch.allclose(b.item_embedding, 10 * a.item_embedding)
    assert torch.equal(b.W_gc[0], a.W_gc[0]) and torch.equal(b.relation_embedding, a.relation_embedding)
    with pytest.raises(ValueError, match="init_scale"):
        MBSSL(NU, NI, K, dim=4, n_layers=1, init_scale=0.0)


def test_sparse_backend_selects_the_kernel(backend):
    """The backend in force decides which kernel runs: scipy builds (and caches) its CSR copy,
    torch never touches scipy (so CPU CI runs the CUDA path's products); 'scipy' on a
    non-CPU tensor is an error rather than a silent fallback; unknown names are refused."""
    from mbssl_dist.graph.sparse import set_sparse_backend, sparse_op

    g = torch.Generator().manual_seed(5)
    dense = torch.rand(6, 4, generator=g, dtype=D) * (torch.rand(6, 4, generator=g, dtype=D) > 0.4)
    op = sparse_op(dense.to_sparse_csr())
    x = torch.randn(4, 2, generator=g, dtype=D)
    assert torch.allclose(op.mm(x), dense @ x)
    out = torch.empty(4, 2, dtype=D)
    op.mm_into(torch.randn(6, 2, generator=g, dtype=D), out, transpose=True)
    assert bool(op._sp) == (backend == "scipy")
    if backend == "scipy":
        with pytest.raises(RuntimeError, match="needs CPU tensors"):
            op.mm(x.to("meta"))
    with pytest.raises(ValueError):
        set_sparse_backend("cusparse")


def test_item_bias_without_the_interaction_term():
    """``item_bias`` alone: one learned b_i added to every user's score of item i, no indicator
    weights; ``interaction_scoring`` brings its own."""
    gs = _graphs(3)
    m = MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2, dtype=D, item_bias=True)
    assert m.behavior_weight is None and m.behavior_item_weight is None and m.item_bias is not None
    assert not m.item_bias.any()  # starts at zero: the initial scores are the GNN's
    with torch.no_grad():
        m.item_bias.copy_(torch.arange(NI, dtype=D))
    m.eval()
    prop = m(_adjs(gs))
    users = torch.tensor([0, 3])
    plain = prop.users[users, -1] @ (prop.items[:, -1] * prop.relations[-1]).T
    assert torch.allclose(m.score(prop, users), plain + torch.arange(NI, dtype=D))
    assert MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2, interaction_scoring=True).use_item_bias
    assert MBSSL(NU, NI, K, dim=4, n_layers=1, att_dim=2).item_bias is None
