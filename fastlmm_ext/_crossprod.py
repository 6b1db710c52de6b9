"""Cross-products of [Z X y]: the only way the compiled criterion sees the data.

The profiled criterion depends on the data only through

    ZᵀWZ, ZᵀWX, ZᵀWy, XᵀWX, XᵀWy, yᵀWy, n, Σ log wᵢ

(W the prior weights).  They are formed once per model; ZᵀWZ is stored on its
*block-closed lower pattern*: for every pair of level blocks (level a of term i, level b of
term j, i ≥ j) that share an observation, the whole k_i × k_j block is kept, so that
Λᵀ(ZᵀWZ)Λ has exactly the same pattern for every θ and the kernel can overwrite values in place.

A model with one random-effects term has a block-diagonal ZᵀWZ: its level blocks and ZᵀW[X ỹ] are
summed in one compiled pass over the rows (``_blockdiag.level_crossproducts``), without Z, with
the same products and the same row order as the general path's bincounts and sparse products.

Numerical note: the criterion is invariant to y → y − X b for any b (β̂ absorbs b), so the
cross-products use the OLS residual of y (``_ols.ols_shift``, which also keeps the digits of a
response with a large common level).  This removes the large mean of y from yᵀy and avoids
cancellation in r² = yᵀy − ‖c_u‖² − ‖c_β‖²; β̂ is shifted back by b afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._blockdiag import level_crossproducts
from ._design import ModelStructure
from ._ols import response_shift
from ._params import flat_positions

__all__ = ["CrossProducts", "block_lower_ZtZ", "block_diagonal_csc", "level_blocks", "ztz_triplets",
           "sum_duplicates", "lower_csc", "kernel_layout", "log_weight_sum", "full_ZtWZ"]


@dataclass(frozen=True)
class CrossProducts:
    """Sufficient statistics of a Gaussian LMM for a fixed design (see module docstring)."""
    Ap: np.ndarray          # int32[q+1] CSC column pointers of ZᵀWZ (block-closed lower pattern)
    Ai: np.ndarray          # int32[nnz] row indices
    Mx: np.ndarray          # float64[nnz] values
    ZtXy: np.ndarray        # float64[q, p+1] Fortran: [ZᵀWX  ZᵀWỹ]
    XyXy: np.ndarray        # float64[p+1, p+1] Fortran: [XᵀWX XᵀWỹ; ỹᵀWX ỹᵀWỹ]
    beta_shift: np.ndarray  # b with ỹ = y − offset − X b
    n: int
    sum_log_w: float

    @classmethod
    def from_structure(cls, s: ModelStructure) -> "CrossProducts":
        X = s.X
        w = s.weights
        yt, b, _ = response_shift(s.y, X, s.offset, w)
        # Column-major [X ỹ]: contiguous columns to copy in, and one sparse mat-vec per column
        # (a row-major copy of a 500k-row X costs more than all the products).
        Xy = np.empty((s.n, s.p + 1), order="F")
        Xy[:, :s.p] = X
        Xy[:, s.p] = yt
        WXy = Xy if w is None else Xy * w[:, None]
        if len(s.terms) == 1:
            t = s.terms[0]
            M, ZtXy = level_crossproducts(np.ascontiguousarray(t.codes, dtype=np.int64),
                                          np.ascontiguousarray(t.Xi, dtype=np.float64), Xy,
                                          None if w is None else np.ascontiguousarray(w, dtype=np.float64),
                                          t.nlevels)
            Ap, Ai, Mx = block_diagonal_csc(M)
        else:
            Ap, Ai, Mx = block_lower_ZtZ(s, w)
            Zt = s.Z.T.tocsr() if s.q else None
            ZtXy = np.empty((s.q, s.p + 1), order="F")
            for j in range(s.p + 1):
                ZtXy[:, j] = Zt @ WXy[:, j] if s.q else 0.0
        XyXy = np.asfortranarray(Xy.T @ WXy)
        return cls(Ap=Ap, Ai=Ai, Mx=Mx, ZtXy=ZtXy, XyXy=XyXy, beta_shift=b, n=s.n, sum_log_w=log_weight_sum(w))


def log_weight_sum(w: np.ndarray | None) -> float:
    """Σ log wᵢ over the rows of positive weight (0 without weights): the −log|W| of the criterion."""
    return 0.0 if w is None else float(np.sum(np.log(w[w > 0])))


def level_blocks(cp: CrossProducts, t) -> np.ndarray:
    """The k×k diagonal level blocks of ZᵀWZ for term ``t``, as an (ℓ, k, k) array [l, i, j].

    In the block-closed storage, column (l, j) of a term starts with all k rows (l, 0..k−1) of
    its own level block (stored in both triangles); rows of other terms come after them."""
    k, ell = t.k, t.nlevels
    starts = cp.Ap[t.col_offset:t.col_offset + t.q].reshape(ell, 1, k)      # [l, ·, j]
    return cp.Mx[starts + np.arange(k).reshape(1, k, 1)]


def full_ZtWZ(cp: CrossProducts, s: ModelStructure) -> sp.csr_matrix:
    """ZᵀWZ as a full symmetric sparse matrix from its block-closed lower storage (entries
    inside a diagonal level block are stored in both triangles already)."""
    q = s.q
    L = sp.csc_matrix((cp.Mx, cp.Ai, cp.Ap), shape=(q, q))
    bstart = kernel_layout(s)[0]
    coo = L.tocoo()
    off = bstart[coo.row] != bstart[coo.col]
    upper = sp.csc_matrix((coo.data[off], (coo.col[off], coo.row[off])), shape=(q, q))
    return (L + upper).tocsr()


def block_diagonal_csc(M: np.ndarray):
    """The block-closed lower CSC arrays of blockdiag_l(M_l) for level blocks M (ℓ, k, k): column
    (l, j) holds rows (l, 0..k−1), entry M_l[i, j] (the layout :func:`level_blocks` reads)."""
    ell, k = M.shape[0], M.shape[1]
    q = ell * k
    if q * k >= 2**31 - 1:
        raise MemoryError("ZᵀZ has more than 2^31 stored entries; too large for the 32-bit kernel")
    Ap = np.arange(0, q * k + 1, k, dtype=np.int32)
    Ai = np.repeat(np.arange(q, dtype=np.int32).reshape(ell, 1, k), k, axis=1).ravel()
    Mx = np.ascontiguousarray(M.transpose(0, 2, 1)).ravel()
    return Ap, Ai, Mx


def block_lower_ZtZ(s: ModelStructure, w: np.ndarray | None = None):
    """ZᵀWZ on the block-closed lower pattern, as int32/int32/float64 CSC arrays."""
    return lower_csc(*ztz_triplets(s.terms, w), s.q)


def ztz_triplets(terms, w: np.ndarray | None = None):
    """(row, col, value) of ZᵀWZ's block-closed lower pattern, each entry once.

    Block (a, b) of terms (i, j) is Σ_{r: code_i(r)=a, code_j(r)=b} w_r X_i[r,:]ᵀ X_j[r,:]; the
    pairs present are found with one sort of the combined codes, the sums with bincount.
    ``terms`` need ``codes``, ``Xi``, ``k``, ``nlevels`` and ``col_offset``."""
    rows, cols, vals = [], [], []
    for i, ti in enumerate(terms):
        Xi = ti.Xi if w is None else ti.Xi * w[:, None]
        for j in range(i + 1):
            tj = terms[j]
            if i == j:
                blk_i = blk_j = np.arange(ti.nlevels, dtype=np.int64)
                inv, nb = ti.codes, ti.nlevels
            else:
                key = ti.codes * tj.nlevels + tj.codes
                uniq, inv = np.unique(key, return_inverse=True)
                blk_i, blk_j, nb = uniq // tj.nlevels, uniq % tj.nlevels, uniq.size
            for u in range(ti.k):
                for v in range(tj.k):
                    vals.append(np.bincount(inv, weights=Xi[:, u] * tj.Xi[:, v], minlength=nb))
                    rows.append(ti.col_offset + blk_i * ti.k + u)
                    cols.append(tj.col_offset + blk_j * tj.k + v)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def sum_duplicates(r: np.ndarray, c: np.ndarray, x: np.ndarray, q: int):
    """Triplets with repeated (row, col) summed; explicit zeros are kept (the kernel needs the
    whole block pattern, not just the non-zero values)."""
    key = c.astype(np.int64) * q + r
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq % q, uniq // q, np.bincount(inv.ravel(), weights=x, minlength=uniq.size)


def lower_csc(r: np.ndarray, c: np.ndarray, x: np.ndarray, q: int):
    """int32 CSC arrays (Ap, Ai, Mx) of distinct lower-pattern triplets."""
    if r.size == 0:
        return np.zeros(q + 1, np.int32), np.zeros(0, np.int32), np.zeros(0)
    if r.size >= 2**31 - 1:
        raise MemoryError("ZᵀZ has more than 2^31 stored entries; too large for the 32-bit kernel")
    # SciPy's COO → CSC is a counting sort by column, then rows sorted within each column: linear
    # where a lexsort of (column, row) is not (InstEval: 1.5 ms instead of 23 ms).  The triplets
    # are distinct, so nothing is summed, and explicit zeros stay (the kernel needs the pattern).
    A = sp.csc_matrix((x, (r, c)), shape=(q, q))
    A.sort_indices()
    return A.indptr.astype(np.int32), A.indices.astype(np.int32), np.ascontiguousarray(A.data, dtype=np.float64)


def kernel_layout(s: ModelStructure):
    """Per-column block metadata and θ positions for the compiled kernel:
    block start, block size k, offset of the term's T in the flat T storage, and for each θ
    element its index in that storage (T column-major, θ = lower triangle column by column)."""
    bstart, bsize, toff, theta_pos = [], [], [], []
    off = 0
    for t in s.terms:
        cols = np.arange(t.q, dtype=np.int64)
        bstart.append(t.col_offset + (cols // t.k) * t.k)
        bsize.append(np.full(t.q, t.k, dtype=np.int64))
        toff.append(np.full(t.q, off, dtype=np.int64))
        theta_pos.extend(off + flat_positions(t.k))
        off += t.k * t.k
    cat = lambda a: np.ascontiguousarray(np.concatenate(a).astype(np.int32)) if a else np.zeros(0, np.int32)
    return cat(bstart), cat(bsize), cat(toff), np.zeros(off), np.array(theta_pos, dtype=np.int32)
