# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Sparse kernels of the two-block (dense Schur complement) path.

With the first random-effects term eliminated (its block is block-diagonal), the rest is a dense
Schur complement

    S = I + Λ M Λ − A Aᵀ     (q × q; Λ = diag(λ), M = Λ₂'s block of ZᵀWZ, sparse;
                              A = L₂₁, sparse q × m),

factored as S = L Lᵀ by LAPACK.  Two kernels feed and read that dense block.

``schur_lower`` forms the lower triangle of S in one pass, column by column (Gustavson's order):
column s of a Fortran-ordered S is contiguous, so it is zeroed, given its δ + λλM entries and
then, for each j in row s of A, the entries A[r, j] A[s, j] for rows r ≥ s of column j of A,
all while it stays in cache.  Column j's rows at or below s start at the entry (s, j) itself
(rows are sorted and rows s are visited in increasing order), so one pointer per column
replaces any search.  The work is Σ_j nnz(A[:, j])²/2.

``inverse_gram`` gives what the gradient and the conditional variances need from S⁻¹ without
forming it: with Li = L⁻¹ (LAPACK's dtrtri, q³/3 flops, half of dpotri's S⁻¹ = Li ᵀLi),

    diag(S⁻¹)_r = Σ_i Li[i, r]²,
    Y_a = W_aᵀ W_a,  W_a = Li A[:, cols of a]  (q × k),  for every group a of k columns of A,

so that ⟨S⁻¹, A_a A_aᵀ⟩ = tr Y_a.  Li is lower triangular and A sparse, so W_a costs
q·nnz(A[:, a]) at most; the rows of Li are taken in panels of NB: a panel's strip Li[panel, :]
is copied once into a contiguous buffer (NB values per column of Li, in L2 cache), and each
entry A[r, j] adds A[r, j]·Li[panel, r] to the panel's slice of column j of W.  Entries with r
past the panel's last row meet zeros of Li and are skipped (rows sorted), which halves the work.
The groups a are independent, so they are split over ``threads`` OpenMP threads: each thread
takes a contiguous range of groups of about equal work (Σ over its entries of the panels that
reach them) and walks all panels with its own copy of the strip, so the threads meet only once,
at the end (a barrier per panel costs a descheduled thread's time slice at every panel on a
busy machine).  Each Y_a is accumulated by one thread in the same order whatever the count,
and d by the first thread alone, so Y and d do not depend on the thread count, not even in rounding.
(The blocked path calls it at one thread: right after the bundled OpenBLAS's threaded inverse, whose
workers spin for ~0.1 s, a second OpenMP thread only shares their core.)  The loops over a panel's
groups are C (``include/gram_panel.h``), compiled for the baseline x86-64 and for AVX2 with FMA,
the variant picked once per process by the CPU's features (:data:`SIMD_VARIANT`).

Python checks shapes and dtypes ("Python validates, Cython trusts").
"""
import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange

cnp.import_array()

cdef extern from "include/gram_panel.h" nogil:
    # rows of Li per panel (32): the strip (NB × q doubles) stays in L2 for q up to ~4000
    enum: GRAM_NB
    void gram_panel_groups(const int *cp, const int *ci, const double *cx, Py_ssize_t k, Py_ssize_t a0,
                           Py_ssize_t a1, const Py_ssize_t *first, Py_ssize_t i1, const double *pan,
                           double *x, double *out)
    int gram_select()

cdef enum:
    NB = GRAM_NB
    PAD = 16     # doubles between the threads' buffers: two 64-byte cache lines, whatever the alignment

#: 1 where the Gram loops run their AVX2 + FMA variant on this CPU, 0 for the baseline x86-64 one
#: (include/gram_panel.h), chosen once, here
SIMD_VARIANT = gram_select()


def schur_lower(double[::1, :] S, const double[::1] lam,
                const int[::1] mp, const int[::1] mi, const double[::1] mx,
                const int[::1] rp, const int[::1] ri,
                const int[::1] cp, const int[::1] ci, const double[::1] cx):
    """S[r, s] = δ_rs + λ_r λ_s M[r, s] − (A Aᵀ)[r, s] for r ≥ s (the lower triangle; the upper
    one is not touched).

    M is q × q, given by its lower triangle (diagonal included) as CSC (mp, mi, mx; rows sorted);
    A is q × m, given by the pattern of its CSR (rp, ri) and its CSC (cp, ci, cx; rows sorted
    within each column), both of the same matrix."""
    cdef Py_ssize_t q = S.shape[0], m = cp.shape[0] - 1
    cdef Py_ssize_t s, r, kk, ll, j, end
    cdef double f, ls
    cdef double *col
    nxt_arr = np.empty(max(m, 1), dtype=np.int32)
    cdef int[::1] nxt = nxt_arr
    with nogil:
        for j in range(m):
            nxt[j] = cp[j]
        for s in range(q):
            col = &S[0, s]
            for r in range(s, q):
                col[r] = 0.0
            col[s] = 1.0
            ls = lam[s]
            for kk in range(mp[s], mp[s + 1]):
                r = mi[kk]
                if r >= s:
                    col[r] += ls * lam[r] * mx[kk]
            for kk in range(rp[s], rp[s + 1]):
                j = ri[kk]
                ll = nxt[j]                  # the entry (s, j) of column j
                end = cp[j + 1]
                f = cx[ll]
                while ll < end:
                    col[ci[ll]] -= f * cx[ll]
                    ll += 1
                nxt[j] += 1


cdef void _gram_groups(const double[::1, :] Li, const int[::1] cp, const int[::1] ci, const double[::1] cx,
                       Py_ssize_t k, Py_ssize_t a0, Py_ssize_t a1, const Py_ssize_t[::1] first,
                       double *pan, double *x, double[:, :, ::1] out, double[::1] d, bint with_d) noexcept nogil:
    """Y[a] (lower triangles) for the groups a0 ≤ a < a1, over all panels of Li's rows, with the
    buffers ``pan`` (q·NB: the strip) and ``x`` (k·NB: the panel's slice of W_a); with ``with_d``
    also d (module docstring)."""
    cdef Py_ssize_t q = Li.shape[0]
    cdef Py_ssize_t i0, i1, w, r, t, top
    cdef double acc
    cdef double *pr
    cdef const double *lr
    i0 = 0
    while i0 < q:
        i1 = min(i0 + NB, q)
        w = i1 - i0
        # the strip: pan[r, t] = Li[i0 + t, r] for r < i1, zero above Li's diagonal and past q
        for r in range(i1):
            pr = &pan[r * NB]
            lr = &Li[i0, r]
            top = r - i0 if r > i0 else 0
            for t in range(top):
                pr[t] = 0.0
            for t in range(top, w):
                pr[t] = lr[t]
            for t in range(w, NB):
                pr[t] = 0.0
            if with_d:
                acc = 0.0
                for t in range(NB):
                    acc = acc + pr[t] * pr[t]
                d[r] += acc
        # the groups' slices of W and their Gram products (include/gram_panel.h: compiled per
        # instruction set)
        if a1 > a0:
            gram_panel_groups(&cp[0], &ci[0], &cx[0], k, a0, a1, &first[0], i1, pan, x, &out[0, 0, 0])
        i0 = i1


def inverse_gram(const double[::1, :] Li, const int[::1] cp, const int[::1] ci, const double[::1] cx,
                 int k, int threads=1):
    """(Y, d) for the lower-triangular Li (q × q, its upper triangle is not read) and A (q × m,
    m = ℓk, CSC with rows sorted): Y[a] = W_aᵀ W_a (ℓ × k × k) with W_a = Li A[:, ak:ak+k], and
    d[r] = Σ_i Li[i, r]² (the diagonal of LiᵀLi); the groups split over ``threads`` OpenMP
    threads (at least one, at most one per group; the result is the same for every count)."""
    cdef Py_ssize_t q = Li.shape[0], m = cp.shape[0] - 1
    cdef Py_ssize_t nlev = m // k
    cdef Py_ssize_t nt = max(1, min(threads, nlev))
    out_arr = np.zeros((nlev, k, k), dtype=np.float64)
    d_arr = np.zeros(q, dtype=np.float64)
    # per thread: its strip and its W slice, PAD doubles apart so that no two threads write one
    # cache line
    cdef Py_ssize_t pstride = max(q, 1) * NB + PAD, xstride = k * NB + PAD
    pan_arr = np.zeros(nt * pstride, dtype=np.float64)
    x_arr = np.zeros(nt * xstride, dtype=np.float64)
    first_arr = np.empty(max(nlev, 1), dtype=np.intp)
    bound_arr = np.zeros(nt + 1, dtype=np.intp)
    cdef double[:, :, ::1] out = out_arr
    cdef double[::1] d = d_arr, pan = pan_arr, x = x_arr
    cdef Py_ssize_t[::1] first = first_arr, bound = bound_arr
    cdef Py_ssize_t a, c, col, ll, tid
    cdef double total = 0.0, acc = 0.0
    with nogil:
        # the first row of each group of k columns (q when they are all empty): a panel above it
        # adds nothing to the group; the groups' work, Σ over entries of the panels reaching them
        for a in range(nlev):
            first[a] = q
            for c in range(k):
                col = a * k + c
                if cp[col] < cp[col + 1] and ci[cp[col]] < first[a]:
                    first[a] = ci[cp[col]]
                for ll in range(cp[col], cp[col + 1]):
                    total += (q - ci[ll]) // NB + 1
        # thread tid takes the groups bound[tid] ≤ a < bound[tid + 1], about total / nt work each
        tid = 1
        for a in range(nlev):
            if tid >= nt:
                break
            for c in range(k):
                col = a * k + c
                for ll in range(cp[col], cp[col + 1]):
                    acc += (q - ci[ll]) // NB + 1
            if acc >= total * tid / nt:
                bound[tid] = a + 1
                tid += 1
        while tid < nt:
            bound[tid] = nlev
            tid += 1
        bound[nt] = nlev
        if nt == 1:
            _gram_groups(Li, cp, ci, cx, k, 0, nlev, first, &pan[0], &x[0], out, d, True)
        else:
            for tid in prange(nt, num_threads=nt, schedule="static", chunksize=1):
                _gram_groups(Li, cp, ci, cx, k, bound[tid], bound[tid + 1], first, &pan[tid * pstride],
                             &x[tid * xstride], out, d, tid == 0)
        for a in range(nlev):
            for c in range(k):
                for e in range(c):
                    out[a, e, c] = out[a, c, e]
    return out_arr, d_arr
