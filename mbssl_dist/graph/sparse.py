"""Sparse kernels in one place: the adjacency product (scipy's in-place CSR kernel on CPU,
torch's sparse products elsewhere), its autograd Function, and the CSR row-gather idioms.

The model's propagation, the LightGCN baseline and the batch builder all go through here, so
the kernel choice (``train.sparse_backend``) applies to every product of a process.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np
import torch

try:  # scipy's in-place CSR x dense kernel (Y += A X); private, so guarded
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except Exception:  # pragma: no cover
    _csr_matvecs = None

SPARSE_BACKENDS = ("auto", "scipy", "torch")
_BACKEND = "auto"


def set_sparse_backend(name: str) -> str:
    """Select the kernel of every sparse adjacency product in this process (config field
    ``train.sparse_backend``) and return the previous choice. ``auto``: scipy for CPU
    tensors, torch's sparse kernels otherwise; ``torch``: torch everywhere, so the CUDA code
    path runs (and is tested) on CPU; ``scipy``: scipy, an error for non-CPU tensors."""
    global _BACKEND
    if name not in SPARSE_BACKENDS:
        raise ValueError(f"sparse backend {name!r}: expected one of {', '.join(SPARSE_BACKENDS)}")
    prev, _BACKEND = _BACKEND, name
    return prev


def get_sparse_backend() -> str:
    return _BACKEND


@contextmanager
def sparse_backend(name: str):
    """``with sparse_backend("torch"): ...`` -- the backend for a block (tests)."""
    prev = set_sparse_backend(name)
    try:
        yield
    finally:
        set_sparse_backend(prev)


class SparseOp:
    """A constant sparse matrix with a cached transpose, for ``A @ x`` with autograd w.r.t. x.

    torch's CSR backward re-sorts the matrix to transpose it on every call (the dominant cost
    on CPU); here the transpose is built once per matrix. Which kernel runs is
    :func:`set_sparse_backend`'s choice: scipy for CPU CSR matrices under ``auto`` (several
    times faster than torch's CSR kernel on these shapes), torch's sparse products otherwise
    (the only option on CUDA).
    """

    def __init__(self, a: torch.Tensor) -> None:
        self.a = a
        self.shape = tuple(a.shape)
        self._sp: dict = {}
        self._t: torch.Tensor | None = None

    def _use_scipy(self, x: torch.Tensor) -> bool:
        if _BACKEND == "torch":
            return False
        cpu = x.device.type == "cpu" and self.a.device.type == "cpu"
        if _BACKEND == "scipy" and not cpu:
            raise RuntimeError(f"sparse backend 'scipy' needs CPU tensors, got {x.device}: "
                               "set train.sparse_backend to 'auto' or 'torch'")
        return cpu and self.a.layout == torch.sparse_csr

    def _scipy(self, dtype) -> tuple:
        key = dtype
        if key not in self._sp:
            import scipy.sparse as sps

            a = self.a
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            m = sps.csr_matrix((a.values().detach().numpy().astype(np_dtype), a.col_indices().numpy(),
                                a.crow_indices().numpy()), shape=self.shape)
            self._sp[key] = (m, m.T.tocsr())
        return self._sp[key]

    def mm_into(self, x: torch.Tensor, out: torch.Tensor, transpose: bool = False, accumulate: bool = False) -> None:
        """``out (+)= A @ x`` (or Aᵀ) written in place into a contiguous ``out``: with scipy
        through its ``csr_matvecs`` kernel directly (it accumulates into its output), so there
        is no fresh result array (page faults on every call for large outputs) and no copy.
        Shapes are checked on every backend (the raw scipy kernel does no bounds checks)."""
        rows, cols = (self.shape[1], self.shape[0]) if transpose else self.shape
        n_vecs = x.shape[1] if x.ndim == 2 else 1
        if x.shape[0] != cols or out.shape[0] != rows or out.numel() != rows * n_vecs:
            raise ValueError(f"mm_into: {(rows, cols)} @ {tuple(x.shape)} -> {tuple(out.shape)}")
        if (self._use_scipy(x) and out.is_contiguous() and out.device.type == "cpu"
                and out.dtype == x.dtype and _csr_matvecs is not None):
            m, mt = self._scipy(x.dtype)
            a = mt if transpose else m
            xn = x.detach().contiguous().numpy()
            if not accumulate:
                out.zero_()
            _csr_matvecs(a.shape[0], a.shape[1], n_vecs, a.indptr, a.indices, a.data, xn.ravel(),
                         out.detach().numpy().reshape(-1))
            return
        r = self.mm(x, transpose).view(out.shape)
        if accumulate:
            out.add_(r)
        else:
            out.copy_(r)

    def mm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        if self._use_scipy(x):
            m, mt = self._scipy(x.dtype)
            xn = x.detach().contiguous().numpy()
            return torch.from_numpy(np.asarray((mt if transpose else m) @ xn))
        if not transpose:
            return self.a.to(x.dtype) @ x
        if self._t is None:
            self._t = self.a.t().to_sparse_csr() if self.a.layout == torch.sparse_csr else self.a.t().coalesce()
        return self._t.to(x.dtype) @ x


class _SpMMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):  # type: ignore[override]
        ctx.op = op
        return op.mm(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return ctx.op.mm(g, transpose=True), None


_OPS: dict[int, tuple] = {}


def spmm(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for a constant sparse ``a`` (CSR or COO); gradient w.r.t. ``x`` only."""
    return _SpMMFn.apply(x, sparse_op(a))


def sparse_op(a: torch.Tensor) -> SparseOp:
    """The cached :class:`SparseOp` of a constant sparse matrix (keyed by tensor identity)."""
    key = id(a)
    hit = _OPS.get(key)
    if hit is None or hit[0]() is not a:
        if len(_OPS) > 256:
            for k in [k for k, (r, _) in _OPS.items() if r() is None]:
                del _OPS[k]
        op = SparseOp(a)
        _OPS[key] = (weakref.ref(a), op)
    else:
        op = hit[1]
    return op


def csr_row_entries(indptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in ``rows``, entry index into the CSR arrays) of every entry of the selected
    rows: the one CSR row-gather of the package (batches, false-negative tables, dense rows)."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    pos = torch.repeat_interleave(torch.arange(rows.numel(), device=indptr.device), counts)
    first = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return pos, first + torch.arange(pos.numel(), device=indptr.device)


def csr_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row position in ``rows``, column) of every entry of the selected CSR rows."""
    pos, e = csr_row_entries(indptr, rows)
    return pos, indices[e]


def csr_rows_table(table: tuple[torch.Tensor, torch.Tensor] | None, rows: torch.Tensor):
    """Rows ``rows`` of a CSR table (indptr, indices) as a new (indptr, indices) table."""
    if table is None:
        return None, None
    indptr, indices = table
    pos, cols = csr_rows(indptr, indices, rows)
    out_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    out_ptr[1:] = torch.cumsum(torch.bincount(pos, minlength=rows.numel()), 0)
    return out_ptr, cols.to(torch.int64)


def dense_rows(X: torch.Tensor, rows: torch.Tensor, dtype) -> torch.Tensor:
    """Rows ``rows`` of a sparse CSR (or dense) matrix as a dense [len(rows), n_cols] tensor."""
    if X.layout != torch.sparse_csr:
        return (X.to_dense() if X.is_sparse else X)[rows].to(dtype)
    pos, e = csr_row_entries(X.crow_indices(), rows)
    out = torch.zeros(rows.numel(), X.shape[1], dtype=dtype, device=X.device)
    out[pos, X.col_indices()[e]] = X.values()[e].to(dtype)
    return out
