# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Selected inverse of the compiled kernel's CHOLMOD factor: diagonal entries and per-level
diagonal blocks of (A + I)⁻¹, A = ΛᵀZᵀWZΛ, without forming the inverse.

Z = (L Lᵀ)⁻¹ = P (A + I)⁻¹ Pᵀ is computed on the nonzero pattern of L (Takahashi / Erisman–Tinney
recurrences, supernode by supernode in reverse order; see ``_selinv_sweep``).  It is cached on the
kernel for the factor of its last update(): the factor is a function of Tflat alone (M and the
symbolic analysis are fixed), so a copy of Tflat is the cache key.  The large products go to the
BLAS that CHOLMOD itself calls, found at import (``selinv_blas``), or SciPy's.

``inverse_diag(kernel)`` and ``inverse_blocks(kernel, col_offset, k, nlevels)`` read the
factor of a :class:`fastlmm_ext._kernel.PLSKernel` (declared in ``fastlmm_ext/_kernel.pxd``).
"""
import numpy as np
cimport numpy as cnp
from scipy.linalg.cython_blas cimport dgemm

from cholmod cimport *
from fastlmm_ext._kernel cimport PLSKernel

from fastlmm_ext._exceptions import CholmodError

cnp.import_array()

__all__ = ["inverse_diag", "inverse_blocks", "selinv_blas"]


cdef object _si_ensure(PLSKernel kernel):
    """Compute (or reuse) Z for the kernel's current factor; returns (Z, layout arrays)."""
    if not kernel.has_state:
        raise RuntimeError("call update(theta) first")
    if not kernel.L.is_ll:
        raise CholmodError("selected inverse needs an LLᵀ factor (got LDLᵀ)")
    key = (np.asarray(kernel.Tflat).tobytes(), bool(kernel.L.is_super), <size_t> kernel.L.x,
           _si_nb, <size_t> _si_dgemm)
    if kernel.selinv_cache is not None and kernel.selinv_cache[0] == key:
        return kernel.selinv_cache[1], kernel.selinv_cache[2]
    kernel.selinv_cache = None
    cdef int n = kernel.q, nsn, s, j, maxm = 1, maxnr = 1, nc, m, st = 0
    cdef int *sup_L
    cdef int *pi_L
    cdef int *px_L
    cdef int *Lp
    cdef int *Lnz
    cdef int *perm = <int *> kernel.L.Perm
    cdef Py_ssize_t xsize
    nsn = <int> kernel.L.nsuper if kernel.L.is_super else n
    sup_a = np.empty(nsn + 1, dtype=np.int32)
    rptr_a = np.empty(max(nsn, 1), dtype=np.int32)
    nrow_a = np.empty(max(nsn, 1), dtype=np.int32)
    vptr_a = np.empty(max(nsn, 1), dtype=np.int32)
    col2sn_a = np.empty(max(n, 1), dtype=np.int32)
    iperm_a = np.empty(max(n, 1), dtype=np.int32)
    cdef int[::1] sup = sup_a, rptr = rptr_a, nrow = nrow_a, vptr = vptr_a
    cdef int[::1] col2sn = col2sn_a, iperm = iperm_a
    with nogil:
        if kernel.L.is_super:
            sup_L = <int *> kernel.L.super
            pi_L = <int *> kernel.L.pi
            px_L = <int *> kernel.L.px
            for s in range(nsn):
                sup[s] = sup_L[s]
                rptr[s] = pi_L[s]
                nrow[s] = pi_L[s + 1] - pi_L[s]
                vptr[s] = px_L[s]
            sup[nsn] = sup_L[nsn]
            xsize = px_L[nsn]
        else:
            Lp = <int *> kernel.L.p
            Lnz = <int *> kernel.L.nz
            for s in range(nsn):
                sup[s] = s
                rptr[s] = Lp[s]
                nrow[s] = Lnz[s]
                vptr[s] = Lp[s]
            sup[nsn] = nsn
            xsize = Lp[n]
            for s in range(nsn):
                xsize = max(xsize, <Py_ssize_t> Lp[s] + Lnz[s])
        for s in range(nsn):
            nc = sup[s + 1] - sup[s]
            m = nrow[s]
            maxm = max(maxm, m)
            maxnr = max(maxnr, m - nc)
            for j in range(sup[s], sup[s + 1]):
                col2sn[j] = s
        for j in range(n):
            iperm[perm[j] if perm != NULL else j] = j
    Z_a = np.zeros(max(xsize, 1), dtype=np.float64)
    Zrr_a = np.empty(<Py_ssize_t> maxnr * maxnr, dtype=np.float64)
    cdef int nb = _si_nb
    Y_a = np.empty(<Py_ssize_t> maxm * nb, dtype=np.float64)
    Linv_a = np.empty(<Py_ssize_t> nb * nb, dtype=np.float64)
    loc_a = np.empty(maxnr, dtype=np.int32)
    cdef double[::1] Z = Z_a, Zrr = Zrr_a, Y = Y_a, Linv = Linv_a
    cdef int[::1] loc = loc_a
    cdef const int *rows = <int *> (kernel.L.s if kernel.L.is_super else kernel.L.i)
    if n > 0:
        with nogil:
            st = _selinv_sweep(nsn, &sup[0], &rptr[0], &nrow[0], &vptr[0], &col2sn[0], rows,
                               <double *> kernel.L.x, &Z[0], &Zrr[0], &Y[0], &Linv[0], &loc[0], nb)
    if st == -1:
        raise CholmodError("selected inverse: factor pattern is not closed (row missing in an "
                           "ancestor supernode)")
    if st != 0:
        raise CholmodError(f"selected inverse: zero pivot in the factor (supernode column {st - 1})")
    layout = (sup_a, rptr_a, nrow_a, vptr_a, col2sn_a, iperm_a)
    kernel.selinv_cache = (key, Z_a, layout)
    return Z_a, layout


def inverse_diag(PLSKernel kernel):
    """diag((A + I)⁻¹), A = ΛᵀZᵀZΛ, in the original (unpermuted) column order, from the
    selected inverse of the kernel's current factor (call its update(theta) first)."""
    Z_a, layout = _si_ensure(kernel)
    sup_a, rptr_a, nrow_a, vptr_a, col2sn_a, iperm_a = layout
    cdef double[::1] Z = Z_a
    cdef int[::1] sup = sup_a, nrow = nrow_a, vptr = vptr_a, iperm = iperm_a
    cdef int n = kernel.q, nsn = sup_a.shape[0] - 1, s, j, m
    cdef const int *perm = <int *> kernel.L.Perm
    out_a = np.empty(n, dtype=np.float64)
    cdef double[::1] out = out_a
    with nogil:
        for s in range(nsn):
            m = nrow[s]
            for j in range(sup[s + 1] - sup[s]):
                out[perm[sup[s] + j] if perm != NULL else sup[s] + j] = \
                    Z[<Py_ssize_t> vptr[s] + <Py_ssize_t> j * m + j]
    return out_a


def inverse_blocks(PLSKernel kernel, int col_offset, int k, int nlevels):
    """Diagonal k×k blocks of (A + I)⁻¹ (original order) of a term occupying columns
    col_offset + a·k + i (level a < nlevels, i < k): float64[nlevels, k, k].  Every entry of
    such a block lies in the pattern of A, hence in that of the (permuted) factor."""
    if k < 1 or nlevels < 0 or col_offset < 0 or col_offset + <long> k * nlevels > kernel.q:
        raise ValueError(f"columns {col_offset} + {k}×{nlevels} outside 0..{kernel.q}")
    Z_a, layout = _si_ensure(kernel)
    sup_a, rptr_a, nrow_a, vptr_a, col2sn_a, iperm_a = layout
    cdef double[::1] Z = Z_a
    cdef int[::1] sup = sup_a, rptr = rptr_a, nrow = nrow_a, vptr = vptr_a
    cdef int[::1] col2sn = col2sn_a, iperm = iperm_a
    cdef const int *rows = <int *> (kernel.L.s if kernel.L.is_super else kernel.L.i)
    out_a = np.empty((nlevels, k, k), dtype=np.float64)
    if nlevels == 0:
        return out_a
    cdef double[:, :, ::1] out = out_a
    cdef int a, i, j, pi_, pj, c0
    cdef Py_ssize_t pos
    cdef bint missing = False
    with nogil:
        for a in range(nlevels):
            c0 = col_offset + a * k
            for j in range(k):
                pj = iperm[c0 + j]
                for i in range(j, k):
                    pi_ = iperm[c0 + i]
                    if pi_ >= pj:
                        pos = _selinv_find(pi_, pj, &sup[0], &rptr[0], &nrow[0], &vptr[0],
                                           &col2sn[0], rows)
                    else:
                        pos = _selinv_find(pj, pi_, &sup[0], &rptr[0], &nrow[0], &vptr[0],
                                           &col2sn[0], rows)
                    if pos < 0:
                        missing = True
                        out[a, i, j] = 0.0
                    else:
                        out[a, i, j] = Z[pos]
                    out[a, j, i] = out[a, i, j]
    if missing:
        raise CholmodError("inverse_blocks: a block entry is outside the pattern of the factor")
    return out_a


# ---------------------------------------------------------------------- C level
cdef extern from *:
    """
    #include <dlfcn.h>
    typedef void (*flmm_dgemm_t)(char *, char *, int *, int *, int *, double *, double *, int *,
                                 double *, int *, double *, double *, int *);
    /* dgemm_ of the BLAS that CHOLMOD itself calls, looked up in CHOLMOD's own dependency tree;
       NULL when it cannot be found or does not take 32-bit integers. */
    static flmm_dgemm_t flmm_cholmod_dgemm(void) {
        Dl_info info;
        void *h, *f;
        int ok = 1;
    #if defined(SUITESPARSE_BLAS_INT)
        ok = sizeof(SUITESPARSE_BLAS_INT) == sizeof(int);
    #elif defined(BLAS64) || defined(LONGBLAS)
        ok = 0;
    #endif
        if (!ok) return NULL;
        if (!dladdr((void *) &cholmod_start, &info) || info.dli_fname == NULL) return NULL;
        h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        if (h == NULL) return NULL;
        f = dlsym(h, "dgemm_");
        dlclose(h);
        return (flmm_dgemm_t) f;
    }
    """
    ctypedef void (*flmm_dgemm_t)(char *, char *, int *, int *, int *, double *, double *, int *,
                                  double *, int *, double *, double *, int *) noexcept nogil
    flmm_dgemm_t flmm_cholmod_dgemm()


# The selected inverse's products go to CHOLMOD's BLAS when it can be found, else to SciPy's.
# Two OpenBLAS builds in one process keep two thread pools; when one runs right after the other
# (the sweep follows CHOLMOD's factorization), the first pool's workers are still spinning and
# the second one's threaded calls stall on a machine with few cores (measured: seconds instead
# of ~0.1 s on a 2-core box).  With a single pool there is no such contention.
cdef flmm_dgemm_t _si_cholmod_dgemm = flmm_cholmod_dgemm()
cdef flmm_dgemm_t _si_dgemm = _si_cholmod_dgemm


def _selinv_options(nb=None, blas=None):
    """Testing hook: set the panel width and the BLAS ("cholmod" or "scipy") of the selected
    inverse; returns the previous (nb, blas).  Not thread-safe; meant for tests only."""
    global _si_nb, _si_dgemm
    old = (_si_nb, "cholmod" if _si_dgemm != NULL else "scipy")
    if nb is not None:
        if int(nb) < 1:
            raise ValueError("nb must be positive")
        _si_nb = int(nb)
    if blas is not None:
        if blas not in ("cholmod", "scipy"):
            raise ValueError("blas must be 'cholmod' or 'scipy'")
        if blas == "cholmod" and _si_cholmod_dgemm == NULL:
            raise RuntimeError("CHOLMOD's dgemm_ was not found")
        _si_dgemm = _si_cholmod_dgemm if blas == "cholmod" else NULL
    return old


def selinv_blas():
    """Which BLAS the selected inverse's large products use: "cholmod" (the library CHOLMOD
    calls, found at import) or "scipy" (SciPy's, when CHOLMOD's could not be found)."""
    return "cholmod" if _si_dgemm != NULL else "scipy"


cdef inline Py_ssize_t _selinv_find(int r, int c, const int *sup, const int *rptr, const int *nrow,
                                    const int *vptr, const int *col2sn, const int *rows) noexcept nogil:
    """Position in x of the entry (r, c), r ≥ c (permuted order), of a factor in the uniform
    supernode view; -1 if it is not in the pattern.  Row lists are sorted (CHOLMOD keeps them so)."""
    cdef int s = col2sn[c], f = sup[s], nc = sup[s + 1] - sup[s], m = nrow[s]
    cdef int lo, hi, mid, l
    cdef const int *rl = rows + rptr[s]
    if r < f + nc:
        l = r - f
    else:
        lo = nc
        hi = m - 1
        l = -1
        while lo <= hi:
            mid = (lo + hi) >> 1
            if rl[mid] < r:
                lo = mid + 1
            elif rl[mid] > r:
                hi = mid - 1
            else:
                l = mid
                break
        if l < 0:
            return -1
    return <Py_ssize_t> vptr[s] + <Py_ssize_t> (c - f) * m + l


cdef enum:
    _SI_BLAS_MIN = 32768      # m·n·k below which products are done in plain loops

cdef int _si_nb = 64          # panel width: wide supernodes are processed in panels of this many columns


cdef void _si_gemm(bint transa, int m, int n, int k, double alpha, const double *A, int lda,
                   const double *B, int ldb, double beta, double *C, int ldc) noexcept nogil:
    """C = alpha op(A) B + beta C, op(A) = A or Aᵀ; dgemm for large products, loops for small."""
    cdef char cN = b'N', cT = b'T'
    cdef int i, j, l
    cdef double acc, v
    cdef const double *a
    cdef const double *b
    cdef double *c
    if m <= 0 or n <= 0:
        return
    if <long> m * n * k >= _SI_BLAS_MIN:
        if _si_dgemm != NULL:
            _si_dgemm(&cT if transa else &cN, &cN, &m, &n, &k, &alpha, <double *> A, &lda,
                      <double *> B, &ldb, &beta, C, &ldc)
        else:
            dgemm(&cT if transa else &cN, &cN, &m, &n, &k, &alpha, <double *> A, &lda,
                  <double *> B, &ldb, &beta, C, &ldc)
        return
    for j in range(n):
        c = C + <Py_ssize_t> j * ldc
        b = B + <Py_ssize_t> j * ldb
        if transa:
            for i in range(m):
                a = A + <Py_ssize_t> i * lda
                acc = 0.0
                for l in range(k):
                    acc = acc + a[l] * b[l]
                c[i] = alpha * acc + (beta * c[i] if beta != 0.0 else 0.0)
        else:
            if beta == 0.0:
                for i in range(m):
                    c[i] = 0.0
            elif beta != 1.0:
                for i in range(m):
                    c[i] = beta * c[i]
            for l in range(k):
                v = alpha * b[l]
                a = A + <Py_ssize_t> l * lda
                for i in range(m):
                    c[i] = c[i] + a[i] * v


cdef int _selinv_sweep(int nsn, const int *sup, const int *rptr, const int *nrow, const int *vptr,
                       const int *col2sn, const int *rows, const double *Lx, double *Zx,
                       double *Zrr, double *Y, double *Linv, int *loc, int nb) noexcept nogil:
    """Z = (L Lᵀ)⁻¹ on the pattern of L, written into Zx (same layout as Lx).

    Supernode s: columns J (nc of them), rows below R (nr).  With L_J = [L_JJ; L_RJ], from
    Z L = L⁻ᵀ (upper triangular, so its (R, J) block is 0) and Lᵀ Z = L⁻¹ (its (J, J) block is L_JJ⁻¹):
        Y    = L_RJ L_JJ⁻¹
        Z_RJ = −Z_RR Y
        Z_JJ = L_JJ⁻ᵀ L_JJ⁻¹ − Yᵀ Z_RJ      (= L_JJ⁻ᵀL_JJ⁻¹ + Yᵀ Z_RR Y)
    Z_RR is gathered (both triangles, into Zrr) from the already computed columns R: R is a
    clique of the filled graph, so every (r_i, r_j), i ≥ j, lies in the row list of the supernode
    holding column r_j.

    A wide supernode is processed as a chain of panels of ≤ nb columns, last panel first, by
    the same recurrence: for panel P with trailing columns T (inside the supernode) and the rows
    below R, the rows after P are T ∪ R, and Z_{T∪R, T∪R} is [Z_TT Z_RTᵀ; Z_RT Z_RR] with Z_TT and
    Z_RT already in the supernode's own block of Zx (its diagonal block is kept full symmetric)
    and Z_RR in Zrr.  So everything is dgemm (or plain loops for small products) plus the
    inverse of a ≤ nb triangular block, by forward substitution.  (LAPACK's dtrtri/dlauum
    are avoided: a threaded OpenBLAS runs them with many small thread hand-offs, which on a
    loaded machine cost orders of magnitude more than their flops.)
    Single columns (simplicial factors) use plain loops.
    Returns 0, -1 for a pattern inconsistency, or j+1 for a zero pivot in column j of a panel."""
    cdef int s, i, jj, j, j1, l, nc, m, nr, f, t, ft, lt, mt, ptr, p0, w, t0, nt, mr
    cdef const int *R
    cdef const int *rt
    cdef const double *Lb
    cdef const double *Lp
    cdef double *Zb
    cdef double *C
    cdef double *D
    cdef const double *zt
    cdef const double *col
    cdef double *zc
    cdef double d, acc, v
    for s in range(nsn - 1, -1, -1):
        f = sup[s]
        nc = sup[s + 1] - f
        m = nrow[s]
        nr = m - nc
        Lb = Lx + vptr[s]
        Zb = Zx + vptr[s]
        R = rows + rptr[s] + nc
        # Gather Z_RR (full symmetric, leading dimension nr), one run of R's columns per ancestor.
        j = 0
        while j < nr:
            t = col2sn[R[j]]
            ft = sup[t]
            lt = sup[t + 1]
            mt = nrow[t]
            rt = rows + rptr[t]
            zt = Zx + vptr[t]
            j1 = j
            while j1 < nr and R[j1] < lt:
                loc[j1] = R[j1] - ft
                j1 += 1
            ptr = lt - ft
            for i in range(j1, nr):
                while ptr < mt and rt[ptr] < R[i]:
                    ptr += 1
                if ptr == mt or rt[ptr] != R[i]:
                    return -1
                loc[i] = ptr
            for jj in range(j, j1):
                col = zt + <Py_ssize_t> (R[jj] - ft) * mt
                zc = Zrr + <Py_ssize_t> jj * nr
                for i in range(jj, nr):
                    v = col[loc[i]]
                    zc[i] = v
                    Zrr[jj + <Py_ssize_t> i * nr] = v
            j = j1
        if nc == 1:
            if Lb[0] == 0.0:
                return 1
            d = 1.0 / Lb[0]
            acc = d * d
            if nr > 0:
                for i in range(nr):
                    Y[i] = Lb[1 + i] * d
                for i in range(nr):
                    Zb[1 + i] = 0.0
                for l in range(nr):
                    v = Y[l]
                    zc = Zrr + <Py_ssize_t> l * nr
                    for i in range(nr):
                        Zb[1 + i] -= zc[i] * v
                for i in range(nr):
                    acc -= Y[i] * Zb[1 + i]
            Zb[0] = acc
            continue
        p0 = ((nc - 1) // nb) * nb
        while p0 >= 0:
            w = min(nb, nc - p0)
            t0 = p0 + w
            nt = nc - t0
            mr = m - t0
            Lp = Lb + p0 + <Py_ssize_t> p0 * m           # L_PP, leading dimension m
            # Linv = L_PP⁻¹ (w × w, lower, upper zero), column by column by forward substitution.
            for j in range(w):
                zc = Linv + <Py_ssize_t> j * w
                for i in range(j):
                    zc[i] = 0.0
                d = Lp[j + <Py_ssize_t> j * m]
                if d == 0.0:
                    return p0 + j + 1
                zc[j] = 1.0 / d
                for i in range(j + 1, w):
                    acc = 0.0
                    for l in range(j, i):
                        acc = acc + Lp[i + <Py_ssize_t> l * m] * zc[l]
                    zc[i] = -acc / Lp[i + <Py_ssize_t> i * m]
            # D = Z_PP starts as Linvᵀ Linv (both triangles).
            D = Zb + p0 + <Py_ssize_t> p0 * m
            for j in range(w):
                for i in range(j, w):
                    acc = 0.0
                    for l in range(i, w):
                        acc = acc + Linv[l + <Py_ssize_t> i * w] * Linv[l + <Py_ssize_t> j * w]
                    D[i + <Py_ssize_t> j * m] = acc
                    D[j + <Py_ssize_t> i * m] = acc
            if mr > 0:
                # Y = L_{T∪R, P} Linv  (mr × w, leading dimension mr)
                _si_gemm(False, mr, w, w, 1.0, Lb + t0 + <Py_ssize_t> p0 * m, m, Linv, w, 0.0, Y, mr)
                # C = Z_{T∪R, P} = −Z_{T∪R, T∪R} Y
                C = Zb + t0 + <Py_ssize_t> p0 * m
                if nt > 0:
                    _si_gemm(False, mr, w, nt, -1.0, Zb + t0 + <Py_ssize_t> t0 * m, m, Y, mr, 0.0, C, m)
                if nr > 0:
                    if nt > 0:
                        _si_gemm(True, nt, w, nr, -1.0, Zb + nc + <Py_ssize_t> t0 * m, m, Y + nt, mr,
                                 1.0, C, m)
                    _si_gemm(False, nr, w, nr, -1.0, Zrr, nr, Y + nt, mr, 1.0 if nt > 0 else 0.0,
                             C + nt, m)
                # Z_PP −= Yᵀ C, then exact symmetry from the lower triangle
                _si_gemm(True, w, w, mr, -1.0, Y, mr, C, m, 1.0, D, m)
                for j in range(w):
                    for i in range(j + 1, w):
                        D[j + <Py_ssize_t> i * m] = D[i + <Py_ssize_t> j * m]
                # upper part of the supernode's diagonal block: Z_{P,T} = Z_{T,P}ᵀ
                for j in range(t0, nc):
                    for i in range(p0, t0):
                        Zb[i + <Py_ssize_t> j * m] = Zb[j + <Py_ssize_t> i * m]
            p0 -= nb
    return 0
