import math

import torch

from mbssl_dist.training.losses import (Anchors, InteractionTerms, InterBehaviorInfoNCE, IntraBehaviorInfoNCE,
                                     NonSamplingLoss, info_nce)

from .oracles import naive_nonsampling

D = torch.float64


def _pos(B, n_items, K, g, p=0.3):
    out = []
    for _ in range(K):
        m = torch.rand(B, n_items, generator=g) < p
        r, i = m.nonzero(as_tuple=True)
        out.append((r, i))
    return out


def test_nonsampling_equals_naive_minus_npos():
    g = torch.Generator().manual_seed(0)
    B, n_items, K, d = 5, 7, 3, 4
    users = torch.randn(B, K, d, generator=g, dtype=D)
    items = torch.randn(n_items, K, d, generator=g, dtype=D)
    rel = torch.randn(K, d, generator=g, dtype=D)
    pos = _pos(B, n_items, K, g)
    w, c = [0.2, 0.5, 0.3], [0.1, 0.3, 0.05]
    loss = NonSamplingLoss(w, c, decay=0.0)
    rec, reg, per = loss(users, items, rel, pos)
    const = sum(w[k] * pos[k][0].numel() for k in range(K))
    naive = naive_nonsampling(users, items, rel, pos, w, c)
    assert torch.allclose(rec, naive - const, atol=1e-10)
    assert reg.item() == 0.0


def test_nonsampling_reg_is_reference_decay():
    g = torch.Generator().manual_seed(1)
    users = torch.randn(3, 2, 4, generator=g, dtype=D)
    items = torch.randn(6, 2, 4, generator=g, dtype=D)
    rel = torch.randn(2, 4, generator=g, dtype=D)
    pos = _pos(3, 6, 2, g)
    _, reg, _ = NonSamplingLoss([0.5, 0.5], 0.1, decay=10.0)(users, items, rel, pos)
    assert torch.allclose(reg, 5.0 * (users.square().sum() + items.square().sum()))


def test_nonsampling_interaction_term_equals_naive():
    g = torch.Generator().manual_seed(2)
    B, n_items, K, d = 4, 9, 3, 3
    users = torch.randn(B, K, d, generator=g, dtype=D)
    items = torch.randn(n_items, K, d, generator=g, dtype=D)
    rel = torch.randn(K, d, generator=g, dtype=D)
    pos = _pos(B, n_items, K, g, 0.35)
    wk = torch.randn(K, generator=g, dtype=D)
    wk[-1] = 0.0  # target indicator excluded (model default)
    bias = torch.randn(n_items, generator=g, dtype=D)
    X = torch.zeros(K, B, n_items, dtype=D)
    for k in range(K):
        X[k, pos[k][0], pos[k][1]] = 1.0
    S = torch.einsum("k,kbi->bi", wk, X)
    supp = (X[:-1].sum(0) > 0).nonzero(as_tuple=True)
    inter = InteractionTerms(bias, S[pos[-1][0], pos[-1][1]], supp[0], supp[1], S[supp[0], supp[1]])
    w, c = [0.3, 0.3, 0.4], 0.2
    rec, _, _ = NonSamplingLoss(w, c, decay=0.0)(users, items, rel, pos, interaction=inter)
    const = sum(w[k] * pos[k][0].numel() for k in range(K))
    naive = naive_nonsampling(users, items, rel, pos, w, c, extra_scores=S + bias)
    assert torch.allclose(rec, naive - const, atol=1e-9)


def test_nonsampling_item_bias_alone_equals_naive():
    g = torch.Generator().manual_seed(5)
    B, n_items, K, d = 4, 7, 2, 3
    users = torch.randn(B, K, d, generator=g, dtype=D)
    items = torch.randn(n_items, K, d, generator=g, dtype=D)
    rel = torch.randn(K, d, generator=g, dtype=D)
    pos = _pos(B, n_items, K, g, 0.4)
    bias = torch.randn(n_items, generator=g, dtype=D)
    w, c = [0.5, 0.5], 0.2
    rec, _, _ = NonSamplingLoss(w, c, decay=0.0)(users, items, rel, pos, interaction=InteractionTerms(bias))
    const = sum(w[k] * pos[k][0].numel() for k in range(K))
    naive = naive_nonsampling(users, items, rel, pos, w, c, extra_scores=bias.expand(B, n_items))
    assert torch.allclose(rec, naive - const, atol=1e-9)


def test_nonsampling_gradcheck():
    g = torch.Generator().manual_seed(3)
    B, n_items, K, d = 3, 4, 2, 3
    users = torch.randn(B, K, d, generator=g, dtype=D, requires_grad=True)
    items = torch.randn(n_items, K, d, generator=g, dtype=D, requires_grad=True)
    rel = torch.randn(K, d, generator=g, dtype=D, requires_grad=True)
    bias = torch.randn(n_items, generator=g, dtype=D, requires_grad=True)
    pos = _pos(B, n_items, K, g, 0.5)
    loss = NonSamplingLoss([0.4, 0.6], 0.1, decay=0.5)

    def f(u, i, r, b):
        inter = InteractionTerms(b, None, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.5, -0.3], dtype=D))
        rec, reg, _ = loss(u, i, r, pos, interaction=inter)
        return rec + reg

    assert torch.autograd.gradcheck(f, (users, items, rel, bias))


# ----------------------------------------------------------------------------- InfoNCE
def _loop_infonce(anchor, positive, cands, tau, fn_lists, mode, weights=None, anchor_ids=None, extra=0):
    total = 0.0
    for a in range(anchor.shape[0]):
        za = anchor[a] / anchor[a].norm()
        zp = positive[a] / positive[a].norm()
        num = math.exp(float(za @ zp) / tau)
        den = 0.0
        fn = set(fn_lists[a]) if fn_lists is not None else set()
        own = anchor_ids[a] if anchor_ids is not None else None
        for v in range(cands.shape[0]):
            zv = cands[v] / cands[v].norm()
            if v in fn and (mode == "reference" or v != own):
                if mode == "reference":
                    den += 1.0  # logit set to 0
                continue
            den += math.exp(float(za @ zv) / tau)
        den += extra
        wgt = 1.0 if weights is None else float(weights[a])
        total += -wgt * math.log(num / den)
    return total


def _fn_csr(lists):
    ptr = torch.tensor([0] + list(torch.tensor([len(x) for x in lists]).cumsum(0).tolist()), dtype=torch.int64)
    idx = torch.tensor([v for x in lists for v in x], dtype=torch.int64)
    return ptr, idx


def test_infonce_remove_and_reference_match_loop():
    g = torch.Generator().manual_seed(4)
    n, d, tau = 8, 5, 0.4
    tar = torch.randn(n, d, generator=g, dtype=D)
    aux = torch.randn(n, d, generator=g, dtype=D)
    rows = torch.tensor([1, 3, 6])
    fn_lists = [[0, 2, 1], [5], []]  # anchor 1 lists itself: kept in 'remove' mode
    ptr, idx = _fn_csr(fn_lists)
    w = torch.tensor([2.0, 1.0, 3.0], dtype=D)
    for mode in ("remove", "reference"):
        a = Anchors(rows, w, rows, ptr, idx)
        got = info_nce(tar[rows], aux[rows], aux, tau, a, fn_mode=mode, candidates_sharded=True)
        want = _loop_infonce(tar[rows], aux[rows], aux, tau, fn_lists, mode, w, rows.tolist())
        assert abs(got.item() - want) < 1e-9, (mode, got.item(), want)


def test_infonce_candidate_ids_permuted():
    g = torch.Generator().manual_seed(5)
    n, d, tau = 6, 3, 0.5
    tar = torch.randn(n, d, generator=g, dtype=D)
    aux = torch.randn(n, d, generator=g, dtype=D)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # local row r holds global id perm[r]
    rows = torch.tensor([0, 2])
    fn_lists = [[1, 5], [0]]  # global ids
    ptr, idx = _fn_csr(fn_lists)
    a = Anchors(rows, None, perm[rows], ptr, idx)
    got = info_nce(tar[rows], aux[rows], aux, tau, a, candidates_sharded=True, candidate_ids=perm)
    # same thing in global order
    inv = torch.argsort(perm)
    aux_g = aux[inv]
    want = _loop_infonce(tar[rows], aux[rows], aux_g, tau, fn_lists, "remove", None, perm[rows].tolist())
    assert abs(got.item() - want) < 1e-9


def test_weighted_unique_anchors_equal_repeated_pairs():
    g = torch.Generator().manual_seed(6)
    n, d = 7, 4
    v1 = torch.randn(n, d, generator=g, dtype=D)
    v2 = torch.randn(n, d, generator=g, dtype=D)
    pairs_users = torch.tensor([0, 0, 0, 3, 5, 5])
    rep = info_nce(v1[pairs_users], v2[pairs_users], v2, 0.5)
    u, c = torch.unique(pairs_users, return_counts=True)
    uniq = info_nce(v1[u], v2[u], v2, 0.5, Anchors(u, c.to(D)))
    assert torch.allclose(rep, uniq)


def test_infonce_gradcheck_and_extra_logits():
    g = torch.Generator().manual_seed(7)
    n, d = 5, 3
    tar = torch.randn(n, d, generator=g, dtype=D, requires_grad=True)
    aux = torch.randn(n, d, generator=g, dtype=D, requires_grad=True)
    rows = torch.tensor([0, 4])
    ptr, idx = _fn_csr([[1], [2, 3]])
    for mode in ("remove", "reference"):
        a = Anchors(rows, torch.tensor([1.0, 2.0], dtype=D), rows, ptr, idx)
        assert torch.autograd.gradcheck(
            lambda t, x: info_nce(t[rows], x[rows], x, 0.3, a, fn_mode=mode, extra_zero_logits=1), (tar, aux))
    got = info_nce(tar[rows], aux[rows], aux, 0.3, Anchors(rows), extra_zero_logits=1)
    want = _loop_infonce(tar[rows].detach(), aux[rows].detach(), aux.detach(), 0.3, None, "remove", extra=1)
    assert abs(got.item() - want) < 1e-9


def test_inter_and_intra_modules_sum_user_and_item_sides():
    g = torch.Generator().manual_seed(8)
    nu, ni, d, tau = 6, 5, 4, 0.5
    ut, ua = torch.randn(nu, d, generator=g, dtype=D), torch.randn(nu, d, generator=g, dtype=D)
    it, ia = torch.randn(ni, d, generator=g, dtype=D), torch.randn(ni, d, generator=g, dtype=D)
    uptr, uidx = _fn_csr([[2], [0, 1]])
    iptr, iidx = _fn_csr([[1, 2, 3]])
    uanc = Anchors(torch.tensor([1, 4]), torch.tensor([1.0, 2.0], dtype=D), None, uptr, uidx)
    ianc = Anchors(torch.tensor([0]), torch.tensor([3.0], dtype=D), None, iptr, iidx)
    inter = InterBehaviorInfoNCE(tau, "remove")(ut, ua, uanc, it, ia, ianc, weight=0.5)
    want = 0.5 * (_loop_infonce(ut[[1, 4]], ua[[1, 4]], ua, tau, [[2], [0, 1]], "remove", [1.0, 2.0], [1, 4])
                  + _loop_infonce(it[[0]], ia[[0]], ia, tau, [[1, 2, 3]], "remove", [3.0], [0]))
    assert abs(inter.item() - want) < 1e-9
    intra = IntraBehaviorInfoNCE(tau)(ut, ua, uanc, it, ia, ianc)
    want = (_loop_infonce(ut[[1, 4]], ua[[1, 4]], ua, tau, None, "remove", [1.0, 2.0])
            + _loop_infonce(it[[0]], ia[[0]], ia, tau, None, "remove", [3.0]))
    assert abs(intra.item() - want) < 1e-9


def test_infonce_chunked_denominator_matches_loop(monkeypatch):
    """The chunked exp-sum (logits recomputed per row block in the backward) gives the same
    loss and gradients as one block, with false negatives spread over several chunks."""
    import mbssl_dist.training.losses as L

    g = torch.Generator().manual_seed(11)
    n, d = 9, 4
    tar = torch.randn(n, d, generator=g, dtype=D, requires_grad=True)
    aux = torch.randn(n, d, generator=g, dtype=D, requires_grad=True)
    rows = torch.tensor([0, 2, 3, 5, 8])
    lists = [[1], [2, 3], [], [4, 6, 0], [7]]
    ptr, idx = _fn_csr(lists)
    for mode in ("remove", "reference"):
        a = Anchors(rows, torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0], dtype=D), rows, ptr, idx)
        f = lambda t, x: info_nce(t[rows], x[rows], x, 0.3, a, fn_mode=mode)  # noqa: E731
        whole = f(tar, aux)
        g_whole = torch.autograd.grad(whole, (tar, aux))
        monkeypatch.setattr(L, "_CHUNK_ELEMS", 2 * n)  # 2 anchor rows per chunk
        part = f(tar, aux)
        g_part = torch.autograd.grad(part, (tar, aux))
        assert torch.allclose(whole, part, rtol=1e-13)
        assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-14) for x, y in zip(g_whole, g_part))
        want = _loop_infonce(tar[rows].detach(), aux[rows].detach(), aux.detach(), 0.3, lists, mode,
                             weights=a.weight, anchor_ids=rows)
        assert abs(part.item() - want) < 1e-9
        assert torch.autograd.gradcheck(f, (tar, aux))
        monkeypatch.setattr(L, "_CHUNK_ELEMS", 1 << 22)
