# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sparse Gram products into dense matrices, for the two-block (dense Schur complement) path.

With the first random-effects term eliminated (its block is block-diagonal), the Schur
complement of the rest is dense:  S = A₂₂ − L₂₁ L₂₁ᵀ,  L₂₁ sparse (q₂ × q₁).  Forming L₂₁L₂₁ᵀ
as a sparse product and densifying it (or scattering one column outer product at a time into
S, as a supernodal factorization does) touches S in random order; here each column s of the
result is accumulated in place, column by column (Gustavson's order):

    S[r, s] += α Σ_j A[r, j] w_j A[s, j]      for r ≥ s,

reading row s of A (CSR) and, for each j in it, column j of A (CSC, rows sorted).  Column s of
a Fortran-ordered S is contiguous, so the writes stay in cache; the work is Σ_j nnz(A[:, j])²/2.

``gram_inner`` gives ⟨S, A diag(w) Bᵀ⟩ = Σ_{r,s} S[r,s] (A diag(w) Bᵀ)[r,s] for a full
symmetric S without forming the product (the gradient's trace terms), accumulating each column
of the product in a dense buffer and dotting it with S's column.

Python checks shapes and dtypes ("Python validates, Cython trusts").
"""
import numpy as np
cimport numpy as cnp

cnp.import_array()


def gram_lower_update(double[::1, :] S, const int[::1] rp, const int[::1] ri, const double[::1] rx,
                      const int[::1] cp, const int[::1] ci, const double[::1] cx,
                      const double[::1] w, double alpha):
    """S[r, s] += α (A diag(w) Aᵀ)[r, s] for r ≥ s (lower triangle, in place).

    A is q × m, given both as CSR (rp, ri, rx) and CSC (cp, ci, cx; row indices sorted within
    each column); ``w`` has m entries (all ones for A Aᵀ)."""
    cdef Py_ssize_t q = S.shape[0]
    cdef Py_ssize_t s, kk, ll, j, r
    cdef double f
    cdef double *col
    with nogil:
        for s in range(q):
            col = &S[0, s]
            for kk in range(rp[s], rp[s + 1]):
                j = ri[kk]
                f = alpha * w[j] * rx[kk]
                # rows of column j at or below s: skip the sorted prefix above s
                ll = cp[j + 1] - 1
                while ll >= cp[j] and ci[ll] >= s:
                    r = ci[ll]
                    col[r] += f * cx[ll]
                    ll -= 1


def gram_inner(const double[::1, :] S, const int[::1] acp, const int[::1] aci, const double[::1] acx,
               const int[::1] brp, const int[::1] bri, const double[::1] brx, const double[::1] w):
    """Σ_{r,s} S[r, s] (A diag(w) Bᵀ)[r, s] for full S (q × q), A and B q × m sparse:
    A as CSC (acp, aci, acx), B as CSR (brp, bri, brx)."""
    cdef Py_ssize_t q = S.shape[0]
    cdef Py_ssize_t s, kk, ll, j, r, t
    cdef double f, acc = 0.0, part
    cdef double[::1] buf = np.zeros(q)
    cdef cnp.ndarray[cnp.int32_t, ndim=1] touched_arr = np.empty(q, dtype=np.int32)
    cdef int[::1] touched = touched_arr
    cdef cnp.ndarray[cnp.uint8_t, ndim=1] mark_arr = np.zeros(q, dtype=np.uint8)
    cdef unsigned char[::1] mark = mark_arr
    cdef Py_ssize_t nt
    with nogil:
        for s in range(q):
            nt = 0
            for kk in range(brp[s], brp[s + 1]):
                j = bri[kk]
                f = w[j] * brx[kk]
                for ll in range(acp[j], acp[j + 1]):
                    r = aci[ll]
                    if not mark[r]:
                        mark[r] = 1
                        touched[nt] = <int> r
                        nt += 1
                    buf[r] += f * acx[ll]
            part = 0.0
            for t in range(nt):
                r = touched[t]
                part += S[r, s] * buf[r]
                buf[r] = 0.0
                mark[r] = 0
            acc += part
    return acc


def gram_inner_sym(const double[::1, :] S, const int[::1] rp, const int[::1] ri, const double[::1] rx,
                   const int[::1] cp, const int[::1] ci, const double[::1] cx, const double[::1] w):
    """⟨S, A diag(w) Aᵀ⟩ for symmetric S given by its lower triangle (the upper one is not read):
    2 Σ_{r>s} S[r,s] P[r,s] + Σ_r S[r,r] P[r,r] with P = A diag(w) Aᵀ accumulated column by column
    (only r ≥ s), A as CSR and CSC as in :func:`gram_lower_update`."""
    cdef Py_ssize_t q = S.shape[0]
    cdef Py_ssize_t s, kk, ll, j, r
    cdef double f, acc = 0.0, part
    with nogil:
        for s in range(q):
            part = 0.0
            for kk in range(rp[s], rp[s + 1]):
                j = ri[kk]
                f = w[j] * rx[kk]
                ll = cp[j + 1] - 1
                while ll >= cp[j] and ci[ll] > s:
                    r = ci[ll]
                    part += 2.0 * f * cx[ll] * S[r, s]
                    ll -= 1
                if ll >= cp[j] and ci[ll] == s:
                    part += f * cx[ll] * S[s, s]
            acc += part
    return acc
