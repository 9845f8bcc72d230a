"""Swing similarity (DESIGN Eq 6), exact, with numpy/scipy only.

Definitions (one behavior).  ``X`` is a binary CSR matrix of shape ``(n_src, n_mid)``:
``X[s, m] = 1`` when source node ``s`` interacted with intermediary ``m``.  For item-item
swing the sources are items and the intermediaries users (``X = R.T``); for user-user swing
it is the mirror image (``X = R``).  With ``U_s`` the intermediaries of ``s`` and
``I_m`` the sources of ``m``::

    sim(i, j) = sum over unordered pairs {u, v} of distinct intermediaries in U_i & U_j
                of 1 / (alpha + |I_u & I_v|)

and ``sim(i, i)`` is not stored.

Algorithm.  Only intermediary pairs ``p = {u, v}`` with ``c_p = |I_u & I_v| >= 2`` can
contribute to an off-diagonal entry.  Let ``M`` be the ``pairs x sources`` 0/1 matrix whose
row ``p`` is ``I_u & I_v`` and ``w_p = 1 / (alpha + c_p)``; then ``sim = M^T diag(w) M``
(minus its diagonal).  So the work splits in two phases:

1. *Pair enumeration* (``enumerate_pairs``), sharded by ranges of the first intermediary
   ``u``: every triple ``(u, v, i)`` with ``u < v`` both in ``U_i`` is generated with
   ragged numpy gathers (``sum_i C(|U_i|, 2)`` triples in all) and grouped by pair through
   one CSR->CSC counting sort; groups of size >= 2 are the rows of ``M``.
2. *Similarity rows* (``stacked_topk``), by blocks of source nodes: the behaviors' pair rows
   are stacked into one ``diag(w) M`` (``w_p = weight_b / (alpha + c_p)``, ``StackedPairs``)
   with the pattern of its transpose ``M^T`` (pairs ascending per row); for a block of sources
   ``B``, ``sum_b weight_b sim_b(B, :) = M^T[B] diag(w) M`` is one scipy sparse product whose
   cost is ``sum_{p : B & I_p} c_p`` (``sum_p c_p^2`` over all sources), then each full row is
   cut to its top-N (``topk_csr``).

All accumulation is float64; every entry is summed in ascending stacked-pair order whatever
the blocks, chunks or workers, so any number of workers gives bit-identical scores.
No dense ``n x n`` array is ever built (the brute-force oracle lives in ``tests/oracles.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
DEFAULT_TOPN = 500
#: target number of (u, v, i) triples per pair-enumeration chunk (bounds chunk memory)
CHUNK_TRIPLES = 4_000_000
#: target number of multiply-adds per similarity block (bounds block memory)
BLOCK_FLOPS = 20_000_000


# --------------------------------------------------------------------------------------------
# input normalisation and index structures
# --------------------------------------------------------------------------------------------

def binary_csr(X: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    """Return ``X`` as a canonical binary CSR matrix (sorted indices, no duplicates/zeros)."""
    X = sp.csr_matrix(X, copy=True)
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    X.data = np.ones(X.nnz, dtype=np.float64)
    return X


@dataclass
class SideIndex:
    """Both orientations of one binary ``n_src x n_mid`` matrix, plus the entry map.

    ``src_indptr/src_indices``: CSR of ``X`` (row ``s`` = sorted intermediaries ``U_s``).
    ``mid_indptr/mid_indices``: CSR of ``X.T`` (row ``m`` = sorted sources ``I_m``).
    ``pos[k]``: index in ``src_indices`` of the ``k``-th entry of ``mid_indices``.
    ``mid_of_k[k]``: the intermediary (row) of the ``k``-th entry of ``mid_indices``.
    """

    n_src: int
    n_mid: int
    src_indptr: np.ndarray
    src_indices: np.ndarray
    mid_indptr: np.ndarray
    mid_indices: np.ndarray
    pos: np.ndarray
    mid_of_k: np.ndarray

    @classmethod
    def build(cls, X: sp.spmatrix) -> "SideIndex":
        X = binary_csr(X)
        n_src, n_mid = X.shape
        src_indptr = X.indptr.astype(np.int64)
        src_indices = X.indices.astype(np.int32)
        src_of_b = np.repeat(np.arange(n_src, dtype=np.int32), np.diff(src_indptr))
        # counting sort of the entries by intermediary (stable: sources stay ascending)
        order = np.argsort(src_indices, kind="stable")
        mid_indices = src_of_b[order]
        mid_indptr = np.zeros(n_mid + 1, dtype=np.int64)
        np.cumsum(np.bincount(src_indices, minlength=n_mid), out=mid_indptr[1:])
        mid_of_k = src_indices[order]
        return cls(n_src, n_mid, src_indptr, src_indices, mid_indptr, mid_indices,
                   order.astype(np.int64), mid_of_k)

    @property
    def nnz(self) -> int:
        return int(len(self.src_indices))

    def triples_per_entry(self) -> np.ndarray:
        """For entry ``k = (u, i)``: the number of ``v > u`` in ``U_i``."""
        i = self.mid_indices
        return (self.src_indptr[i.astype(np.int64) + 1] - self.pos - 1).astype(np.int64)

    def n_triples(self) -> int:
        return int(self.triples_per_entry().sum())


# --------------------------------------------------------------------------------------------
# phase 1: pair enumeration
# --------------------------------------------------------------------------------------------

def plan_chunks(index: SideIndex, target: int = CHUNK_TRIPLES) -> list[tuple[int, int, int]]:
    """Cut the intermediaries into contiguous ranges of about ``target`` triples each.

    Returns ``[(mid_lo, mid_hi, n_triples), ...]``.  Depends only on the data, never on the
    number of workers, so the pair order (hence the float summation order) is fixed.
    """
    if index.n_mid == 0:
        return []
    per_mid = np.bincount(index.mid_of_k, weights=index.triples_per_entry(),
                          minlength=index.n_mid).astype(np.int64)
    cum = np.cumsum(per_mid)
    total = int(cum[-1])
    if total == 0:
        return []
    chunks: list[tuple[int, int, int]] = []
    lo = 0
    while lo < index.n_mid:
        base = int(cum[lo - 1]) if lo > 0 else 0
        hi = int(np.searchsorted(cum, base + target, side="right"))
        hi = max(hi, lo + 1)
        hi = min(hi, index.n_mid)
        n = int(cum[hi - 1]) - base
        if n > 0:
            chunks.append((lo, hi, n))
        lo = hi
    return chunks


def enumerate_pairs(index: SideIndex, mid_lo: int, mid_hi: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of ``M`` for the pairs ``(u, v)``, ``u < v``, with ``mid_lo <= u < mid_hi``.

    Returns ``(lens, srcs)``: ``lens[p] = c_p >= 2`` and ``srcs`` the concatenated sorted
    source lists ``I_u & I_v``.  Pairs sharing a single source are dropped (they only touch
    the diagonal).
    """
    k0, k1 = int(index.mid_indptr[mid_lo]), int(index.mid_indptr[mid_hi])
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))
    if k1 <= k0:
        return empty
    i_loc = index.mid_indices[k0:k1]
    p = index.pos[k0:k1]
    L = index.src_indptr[i_loc.astype(np.int64) + 1] - p - 1
    g_indptr = np.zeros(k1 - k0 + 1, dtype=np.int64)
    np.cumsum(L, out=g_indptr[1:])
    T = int(g_indptr[-1])
    if T == 0:
        return empty
    # ragged gather: row k of G lists the v > u of U_i (already ascending)
    ptype = np.int32 if index.nnz + T < 2**31 - 1 else np.int64   # positions and offsets fit
    idx = np.repeat((p + 1 - g_indptr[:-1]).astype(ptype), L)
    idx += np.arange(T, dtype=ptype)
    v = index.src_indices[idx]
    del idx
    itype = np.int32 if T < 2**31 - 1 else np.int64
    G = sp.csr_matrix((np.ones(T, dtype=np.bool_), v.astype(itype, copy=False), g_indptr.astype(itype)),
                      shape=(k1 - k0, index.n_mid))
    del v
    Gc = G.tocsc()  # counting sort by v, stable in k (so grouped by u, then i ascending)
    del G
    kk = Gc.indices
    uu = index.mid_of_k[k0:k1][kk]
    # a new group starts where u changes or a new column v begins
    flag = np.empty(T + 1, dtype=np.bool_)
    flag[0] = True
    flag[T] = True
    np.not_equal(uu[1:], uu[:-1], out=flag[1:T])
    col_starts = Gc.indptr[:-1]
    flag[col_starts[col_starts < T]] = True
    # entries of groups of size >= 2: not a start, or followed by a non-start
    inrun = ~flag[1:]
    inrun[1:] |= ~flag[1:T]
    sel = np.flatnonzero(inrun)
    del inrun
    if len(sel) == 0:
        return empty
    starts = np.flatnonzero(flag[sel])
    lens = np.diff(np.append(starts, len(sel)))
    # reorder the kept pairs from (v, u) to (u, v) order (stable sort of the few kept pairs by u):
    # this locality makes the similarity product markedly faster
    n_runs = len(starts)
    order = sp.csr_matrix((np.ones(n_runs, dtype=np.bool_), (uu[sel[starts]] - mid_lo).astype(np.int32),
                           np.arange(n_runs + 1, dtype=np.int32 if n_runs < 2**31 - 1 else np.int64)),
                          shape=(n_runs, mid_hi - mid_lo)).tocsc().indices  # stable counting sort by u
    out_lens = lens[order]
    run_off = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(out_lens, out=run_off[1:])
    gidx = np.repeat(starts[order] - run_off[:-1], out_lens)
    gidx += np.arange(len(gidx), dtype=np.int64)
    srcs = i_loc[kk[sel[gidx]]].astype(np.int32)
    return out_lens.astype(np.int32), srcs


def _itype(n: int) -> type:
    return np.int32 if n < 2**31 - 1 else np.int64


@dataclass
class PairMatrix:
    """``M`` of one behavior (pairs x sources, CSR pattern) and its pair sizes ``c_p``."""

    n_src: int
    indptr: np.ndarray   # int32 (int64 when nnz >= 2**31), len P+1
    indices: np.ndarray  # int32 source ids, ascending within a pair
    lens: np.ndarray     # int32 c_p

    @classmethod
    def from_chunks(cls, n_src: int, chunks: Sequence[tuple[np.ndarray, np.ndarray]]) -> "PairMatrix":
        if not chunks:
            z = np.zeros(0, np.int32)
            return cls(n_src, np.zeros(1, np.int32), z, z)
        lens = np.concatenate([np.asarray(c[0], dtype=np.int32) for c in chunks])
        indices = np.concatenate([np.asarray(c[1], dtype=np.int32) for c in chunks])
        indptr = np.zeros(len(lens) + 1, dtype=_itype(len(indices)))
        np.cumsum(lens, out=indptr[1:])
        return cls(n_src, indptr, indices, lens)

    @property
    def n_pairs(self) -> int:
        return int(len(self.lens))

    @property
    def run(self) -> np.ndarray:
        """Pair index of each entry."""
        return np.repeat(np.arange(self.n_pairs, dtype=_itype(self.n_pairs)), self.lens)

    def weights(self, alpha: float) -> np.ndarray:
        return 1.0 / (alpha + self.lens.astype(np.float64))

    def source_costs(self) -> np.ndarray:
        """Multiply-adds of the similarity row of each source: ``sum_{p : s in I_p} c_p``."""
        return source_costs(self.lens, self.indices, self.n_src)


def source_costs(lens: np.ndarray, srcs: np.ndarray, n_src: int) -> np.ndarray:
    """``sum_{p : s in I_p} c_p`` per source, for the pairs ``lens`` with entries ``srcs``."""
    return np.bincount(srcs, weights=np.repeat(lens.astype(np.float64), lens), minlength=n_src)


def entry_weights(lens: np.ndarray, alpha: float, weight: float = 1.0) -> np.ndarray:
    """Per entry of ``M``: ``weight / (alpha + c_p)`` of its pair (the data of ``diag(w) M``)."""
    w = 1.0 / (alpha + np.asarray(lens).astype(np.float64))
    if weight != 1.0:
        w *= weight
    return np.repeat(w, lens)


def build_pair_matrix(index: SideIndex, chunk_triples: int = CHUNK_TRIPLES) -> PairMatrix:
    """Serial phase 1 over all chunks."""
    chunks = [enumerate_pairs(index, lo, hi) for lo, hi, _ in plan_chunks(index, chunk_triples)]
    return PairMatrix.from_chunks(index.n_src, chunks)


# --------------------------------------------------------------------------------------------
# phase 2: similarity rows, behavior combination, top-N
# --------------------------------------------------------------------------------------------

@dataclass
class StackedPairs:
    """The pair rows of all (weighted) behaviors of one side, stacked, in both orientations.

    ``indptr/indices/data``: ``diag(w) M`` as CSR (``P x n_src``), where the rows of behavior
    ``b`` come after those of behaviors ``< b`` and ``w_p = weight_b / (alpha + c_p)``.
    ``t_indptr/t_indices``: the pattern of ``M^T`` as CSR (``n_src x P``), pairs ascending
    in each row.  ``costs``: multiply-adds per source row.  Then for a set of sources ``B``
    ``sum_b weight_b sim_b(B, :) = M^T[B] (diag(w) M)``: one sparse product, whose every
    entry is accumulated in ascending pair order whatever ``B`` is (so results never depend
    on blocking or worker count).  The arrays may be memory-mapped ``.npy`` files.
    """

    n_src: int
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    t_indptr: np.ndarray
    t_indices: np.ndarray
    costs: np.ndarray

    @classmethod
    def build(cls, pms: Sequence[PairMatrix], weights: Sequence[float], alpha: float) -> "StackedPairs":
        """In-memory construction (the parallel driver fills the same arrays chunk by chunk)."""
        n_src = pms[0].n_src
        P = sum(pm.n_pairs for pm in pms)
        nnz = sum(len(pm.indices) for pm in pms)
        it = index_dtype(nnz, P, n_src)
        lens = np.concatenate([pm.lens for pm in pms]) if pms else np.zeros(0, np.int32)
        indptr = np.zeros(P + 1, dtype=it)
        np.cumsum(lens, out=indptr[1:])
        indices = np.concatenate([pm.indices for pm in pms]).astype(it, copy=False)
        data = np.concatenate([entry_weights(pm.lens, alpha, wt) for pm, wt in zip(pms, weights)])
        # M^T by a stable counting sort (scipy's CSR -> CSC): pairs stay ascending in each row
        t = sp.csr_matrix((np.ones(nnz, dtype=np.bool_), indices, indptr), shape=(P, n_src)).tocsc()
        costs = source_costs(lens, indices, n_src)
        return cls(n_src, indptr, indices, data, t.indptr.astype(it, copy=False),
                   t.indices.astype(it, copy=False), costs)

    @property
    def n_pairs(self) -> int:
        return int(len(self.indptr) - 1)

    def right(self) -> sp.csr_matrix:
        return _csr_nocopy(self.data, self.indices, self.indptr, (self.n_pairs, self.n_src))

    def left(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows ``rows`` (sorted) of the pattern of ``M^T`` as a float64 CSR."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):   # contiguous: slices only
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            a, b = int(self.t_indptr[lo]), int(self.t_indptr[hi])
            ip = np.asarray(self.t_indptr[lo:hi + 1]) - a
            ind = self.t_indices[a:b]
        else:
            starts = np.asarray(self.t_indptr[rows], dtype=np.int64)
            cnt = np.asarray(self.t_indptr[rows + 1], dtype=np.int64) - starts
            ip = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(cnt, out=ip[1:])
            g = np.repeat(starts - ip[:-1], cnt)
            g += np.arange(len(g), dtype=np.int64)
            ind = np.asarray(self.t_indices)[g]
        it = self.t_indices.dtype
        return _csr_nocopy(np.ones(len(ind)), ind, ip.astype(it, copy=False), (len(rows), self.n_pairs))

    def rows_topk(self, rows: np.ndarray, topn: int, right: sp.csr_matrix | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if right is None:
            right = self.right()
        S = self.left(rows) @ right
        return topk_csr(S, np.asarray(rows, dtype=np.int64), topn)


def index_dtype(nnz: int, n_pairs: int, n_src: int) -> type:
    """One index dtype for all index arrays, so that scipy never converts (copies) them."""
    return _itype(max(nnz, n_pairs + 1, n_src + 1))


def _csr_nocopy(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]
                ) -> sp.csr_matrix:
    """A CSR matrix on the given (possibly memory-mapped) arrays, without copies or checks."""
    A = sp.csr_matrix(shape, dtype=np.float64)
    A.data, A.indices, A.indptr = data, indices, indptr
    return A


_ROW_BITS = 12                 # rows per top-N sort group (4096)
_SCORE_SHIFT = 12              # drop 12 of 52 mantissa bits: ties up to ~1e-12 relative
_SCORE_MAX = (1 << 51) - 1


def topk_csr(S: sp.csr_matrix, row_ids: np.ndarray, topn: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``topn`` entries of each row of ``S`` (global row id ``row_ids[r]``), self excluded.

    Order: score descending; scores equal up to ~1e-12 relative (rounding noise) are ties,
    broken by the smaller column id.  Returns ``(src, dst, score, rank)`` sorted by
    (src, rank).  Scores must be >= 0; zeros are dropped.  ``S`` need not have sorted indices.

    Per group of rows: one (unstable) sort of the keys ``(row, truncated score desc)`` gives
    each row's ``topn``-th key; only the entries at or above it (``topn`` plus ties) are then
    ordered by a stable sort of their keys, columns being ascending within each row.
    """
    S = S.tocsc().tocsr()    # two linear counting sorts: column indices ascending in each row
    n = S.shape[0]
    counts = np.diff(S.indptr)
    rows = np.repeat(np.arange(n, dtype=np.int64), counts)
    cols = S.indices
    vals = S.data.astype(np.float64, copy=False)
    keep = (vals > 0) & (cols != row_ids[rows])
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    out = ([], [], [], [])
    bounds = np.searchsorted(rows, np.arange(0, n + (1 << _ROW_BITS), 1 << _ROW_BITS))
    for g in range(len(bounds) - 1):
        a, b = int(bounds[g]), int(bounds[g + 1])
        if b <= a:
            continue
        r = rows[a:b]
        c = cols[a:b]
        v = vals[a:b]
        key = (r - (g << _ROW_BITS)) << 51
        key |= _SCORE_MAX - (v.view(np.int64) >> _SCORE_SHIFT)
        ng = min(n - (g << _ROW_BITS), 1 << _ROW_BITS)
        rc = np.bincount(r - (g << _ROW_BITS), minlength=ng)
        if rc.max() > topn:                       # keep only each row's top-N keys, ties included
            skey = np.sort(key)
            rstart = np.zeros(ng, dtype=np.int64)
            np.cumsum(rc[:-1], out=rstart[1:])
            kth = skey[rstart + np.minimum(rc, topn) - 1]          # garbage for empty rows: unused
            cand = np.flatnonzero(key <= kth[r - (g << _ROW_BITS)])
            r, c, v, key = r[cand], c[cand], v[cand], key[cand]
        order = np.argsort(key, kind="stable")    # columns ascending within a row: ties by column
        r, c, v = r[order], c[order], v[order]
        new = np.empty(len(r), dtype=np.bool_)
        new[0] = True
        np.not_equal(r[1:], r[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        rank = np.arange(len(r), dtype=np.int64) - np.repeat(starts, np.diff(np.append(starts, len(r))))
        m = rank < topn
        out[0].append(row_ids[r[m]])
        out[1].append(c[m].astype(np.int64))
        out[2].append(v[m])
        out[3].append(rank[m])
    if not out[0]:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float64), z
    return tuple(np.concatenate(x) for x in out)  # type: ignore[return-value]


def plan_blocks(costs: np.ndarray, target: float = BLOCK_FLOPS) -> list[tuple[int, int]]:
    """Contiguous blocks of positions with about ``target`` total cost each."""
    n = len(costs)
    if n == 0:
        return []
    cum = np.cumsum(costs)
    blocks = []
    lo = 0
    while lo < n:
        base = cum[lo - 1] if lo > 0 else 0.0
        hi = int(np.searchsorted(cum, base + target, side="right"))
        hi = min(max(hi, lo + 1), n)
        blocks.append((lo, hi))
        lo = hi
    return blocks


def similarity_topk(pms: Sequence[PairMatrix], weights: Sequence[float], alpha: float, topn: int,
                    sources: np.ndarray | None = None, block_flops: float = BLOCK_FLOPS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``topn`` of ``sum_b weights[b] * sim_b`` for each source in ``sources``.

    ``pms`` are the pair matrices of the behaviors (same ``n_src``).  Returns
    ``(src, dst, score, rank)`` sorted by (src, rank); sources without any neighbor
    have no row.
    """
    if not pms:
        raise ValueError("no behavior to combine")
    n_src = pms[0].n_src
    if sources is None:
        sources = np.arange(n_src, dtype=np.int64)
    sources = np.unique(np.asarray(sources, dtype=np.int64))
    if len(sources) and (sources[0] < 0 or sources[-1] >= n_src):
        raise ValueError(f"sources out of range [0, {n_src})")
    active = [(pm, float(wt)) for pm, wt in zip(pms, weights) if wt != 0.0]
    if not active:
        raise ValueError("all behavior weights are zero")
    st = StackedPairs.build([p for p, _ in active], [w for _, w in active], alpha)
    return stacked_topk(st, sources, topn, block_flops)


def stacked_topk(st: StackedPairs, sources: np.ndarray, topn: int, block_flops: float = BLOCK_FLOPS,
                 next_block=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-N rows of the sorted ``sources``, block by block (``next_block()``: dynamic sharing)."""
    costs = np.asarray(st.costs)[sources]
    blocks = [(lo, hi) for lo, hi in plan_blocks(costs, block_flops) if costs[lo:hi].sum() > 0]
    right = st.right()
    out = ([], [], [], [])
    k = 0
    while True:
        i = next_block() if next_block is not None else k
        k += 1
        if i >= len(blocks):
            break
        lo, hi = blocks[i]
        for o, x in zip(out, st.rows_topk(sources[lo:hi], topn, right)):
            o.append(x)
    if not out[0]:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0, np.float64), z
    return tuple(np.concatenate(x) for x in out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# convenience single-process API
# --------------------------------------------------------------------------------------------

def _check_params(alpha: float, topn: int) -> None:
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if int(topn) != topn or topn < 1:
        raise ValueError(f"topn must be an integer >= 1, got {topn!r}")


def swing_topk(X: sp.spmatrix, alpha: float = DEFAULT_ALPHA, topn: int = DEFAULT_TOPN,
               sources: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``topn`` swing neighbors of each source row of ``X`` (``n_src x n_mid``, binary).

    Item-item swing of a user x item matrix ``R``: ``swing_topk(R.T)``; user-user:
    ``swing_topk(R)``.  Returns ``(src, dst, score)`` sorted by (src, rank).
    """
    s, d, v, _ = swing_topk_combined([X], [1.0], alpha, topn, sources)
    return s, d, v


def swing_topk_combined(Xs: Sequence[sp.spmatrix], weights: Sequence[float],
                        alpha: float = DEFAULT_ALPHA, topn: int = DEFAULT_TOPN,
                        sources: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-N of the weighted sum of per-behavior swing (summed *before* truncation).

    ``Xs``: one ``n_src x n_mid`` matrix per behavior (same shape).  Returns
    ``(src, dst, score, rank)``.
    """
    _check_params(alpha, topn)
    if len(Xs) != len(weights):
        raise ValueError("one weight per behavior matrix is required")
    if not any(w != 0 for w in weights):
        raise ValueError("all behavior weights are zero")
    pms = [build_pair_matrix(SideIndex.build(X)) if w != 0 else None for X, w in zip(Xs, weights)]
    pms_w = [(pm, w) for pm, w in zip(pms, weights) if pm is not None]
    return similarity_topk([p for p, _ in pms_w], [w for _, w in pms_w], alpha, topn, sources)


def swing_full(X: sp.spmatrix, alpha: float = DEFAULT_ALPHA) -> sp.csr_matrix:
    """Full (untruncated) swing matrix of one behavior as CSR ``n_src x n_src``, zero diagonal.

    Memory is ``O(nnz of the result)``; meant for checks against reference matrices.
    """
    pm = build_pair_matrix(SideIndex.build(X))
    n = pm.n_src
    right = sp.csr_matrix((np.ones(len(pm.indices)), pm.indices, pm.indptr), shape=(pm.n_pairs, n))
    left = sp.csr_matrix((entry_weights(pm.lens, alpha), pm.indices, pm.indptr), shape=(pm.n_pairs, n)).T.tocsr()
    S = (left @ right).tocsr()
    S.setdiag(0.0)
    S.eliminate_zeros()
    S.sort_indices()
    return S


def topk_dense(S: np.ndarray, topn: int) -> list[list[tuple[int, float]]]:
    """Per row, the nonzero entries sorted by (score desc, column asc), cut to ``topn``."""
    out = []
    for i in range(S.shape[0]):
        nz = np.flatnonzero(S[i])
        order = sorted(nz.tolist(), key=lambda j: (-S[i, j], j))
        out.append([(j, float(S[i, j])) for j in order[:topn]])
    return out

