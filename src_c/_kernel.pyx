# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled evaluation of lme4's profiled criterion through CHOLMOD.

The kernel works on the cross-products of [Z X y] only (computed once in
Python, see ``fastlmm_ext._crossprod``).  For each θ it

1. writes θ into the per-term lower-triangular blocks T (Λ = blockdiag(I ⊗ T)),
2. forms A = Λᵀ(ZᵀZ)Λ in place on the fixed, block-closed lower pattern of ZᵀZ,
3. refactorizes numerically  L Lᵀ = P (A + I) Pᵀ  (the symbolic analysis, with its
   fill-reducing permutation P, was done once at construction),
4. solves  L C = P Λᵀ [ZᵀX  Zᵀy]  so that  C = [R_ZX  c_u],
5. forms the (p+1)×(p+1) Schur complement  S = [XᵀX Xᵀy; yᵀX yᵀy] - CᵀC and its
   Cholesky factor  S = R Rᵀ  (R lower).  The leading p×p block of R is R_Xᵀ and the
   last diagonal element is the square root of the penalised RSS r²(θ).

It reports log|L|², log|R_X|² and r²(θ); the criterion is computed from them by
``fastlmm_ext._pls.profiled_criterion``, the one home of that formula.

Python validates every input before it reaches this module ("Python validates,
Cython trusts"); CHOLMOD status codes become Python exceptions.  The class's fields are declared
in ``src_c/fastlmm_ext/_kernel.pxd`` so that the selected inverse (``_selinv.pyx``) can read the
factor; it lives in its own module.
"""
import numpy as np
cimport numpy as cnp
from scipy.linalg import solve_triangular
from libc.math cimport log, sqrt
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport dsyrk
from scipy.linalg.cython_lapack cimport dpotrf

from cholmod cimport *

from fastlmm_ext._exceptions import CholmodError, NotPositiveDefiniteError

cnp.import_array()

cdef extern from *:
    """
    #include "cholmod.h"
    /* CHOLMOD >= 4 (SuiteSparse 7) sizes the OpenMP teams of its supernodal factorization by
       Common->nthreads_max; CHOLMOD 3 (SuiteSparse 5) has no such field and runs its
       factorization without OpenMP, so there is nothing to set. */
    static int fastlmm_set_nthreads_max(cholmod_common *c, int n) {
    #if defined(CHOLMOD_MAIN_VERSION) && CHOLMOD_MAIN_VERSION >= 4
        c->nthreads_max = n;
        return 1;
    #else
        (void) c; (void) n;
        return 0;
    #endif
    }
    """
    int fastlmm_set_nthreads_max(cholmod_common *c, int n) nogil

_STATUS = {
    -1: "CHOLMOD not installed (method unavailable)",
    -2: "CHOLMOD ran out of memory",
    -3: "problem too large for CHOLMOD's integer type",
    -4: "invalid input to CHOLMOD",
    -5: "CHOLMOD GPU problem",
}


cdef inline void _check(cholmod_common *c, str where) except *:
    if c.status < 0:
        raise CholmodError(f"{where}: {_STATUS.get(c.status, 'CHOLMOD error')} (status {c.status})")


cdef void _set_ordering(cholmod_common *c, str ordering) except *:
    """Common's ordering options for "default" (CHOLMOD's choice), "amd" or "natural"."""
    if ordering == "natural":
        c.nmethods = 1
        c.method[0].ordering = CHOLMOD_NATURAL
        c.postorder = 0
    elif ordering == "amd":
        c.nmethods = 1
        c.method[0].ordering = CHOLMOD_AMD
    elif ordering != "default":
        raise ValueError(f"unknown ordering {ordering!r}; use 'default', 'amd' or 'natural'")


cdef dict _factor_facts(cholmod_factor *L, cholmod_common *c):
    """What a symbolic analysis says about L (see PLSKernel.factor_info)."""
    cdef size_t s, nsn, j
    cdef int *sup
    cdef int *pi
    cdef int *Ls
    cdef int p, last, sn
    cdef long long nupdates = 0
    cdef long long[::1] ncols, nrows
    cdef int[::1] col2sn
    cdef int[::1] Lperm = <int[:L.n]> (<int *> L.Perm) if L.n > 0 else None
    info = {"is_super": bool(L.is_super), "ordering": int(L.ordering), "n": int(L.n),
            "lnz": float(c.lnz), "fl": float(c.fl), "anz": float(c.anz),
            "nsuper": 0, "super_ncols": None, "super_nrows": None, "nupdates": 0,
            "perm": np.array(Lperm, dtype=np.int32) if L.n > 0 else np.zeros(0, dtype=np.int32)}
    if L.is_super:
        nsn = L.nsuper
        sup = <int *> L.super
        pi = <int *> L.pi
        Ls = <int *> L.s
        ncols_a = np.empty(nsn, dtype=np.int64)
        nrows_a = np.empty(nsn, dtype=np.int64)
        col2sn_a = np.empty(L.n, dtype=np.int32)
        ncols = ncols_a
        nrows = nrows_a
        col2sn = col2sn_a
        for s in range(nsn):
            ncols[s] = sup[s + 1] - sup[s]
            nrows[s] = pi[s + 1] - pi[s]
            for j in range(<size_t> sup[s], <size_t> sup[s + 1]):
                col2sn[j] = <int> s
        # supernode-to-ancestor updates: the distinct supernodes of the rows below each supernode's
        # diagonal block (rows are sorted, supernodes are ranges of columns)
        for s in range(nsn):
            last = -1
            for p in range(pi[s] + sup[s + 1] - sup[s], pi[s + 1]):
                sn = col2sn[Ls[p]]
                if sn != last:
                    nupdates += 1
                    last = sn
        info.update(nsuper=int(nsn), super_ncols=ncols_a, super_nrows=nrows_a, nupdates=int(nupdates))
    return info


def symbolic_facts(const int[::1] Ap, const int[::1] Ai, str ordering="default"):
    """A symbolic analysis alone of the symmetric q × q matrix whose lower triangle has the CSC
    pattern (Ap, Ai), as the kernel would analyse it with ``ordering``: the facts of
    :attr:`PLSKernel.factor_info` (fl, lnz, supernodes), without values and without keeping a
    factor (what ``backend="auto"`` weighs the CHOLMOD path by).  CHOLMOD's defaults otherwise,
    so the simplicial/supernodal switch is the kernel's.  ``perm`` is the analysis's final
    permutation (fill-reducing ordering and postorder): a kernel on the same pattern given these
    facts (``PLSKernel(..., analysis=facts)``) builds the same factor without ordering again."""
    cdef cholmod_common c
    cdef cholmod_sparse A
    cdef cholmod_factor *L = NULL
    cdef int q = Ap.shape[0] - 1
    if q <= 0:
        raise ValueError("symbolic_facts needs a non-empty matrix")
    cholmod_start(&c)
    try:
        c.print = 0
        c.final_ll = 1
        _set_ordering(&c, ordering)
        A.nrow = q
        A.ncol = q
        A.nzmax = Ai.shape[0]
        A.p = <void *> &Ap[0]
        A.i = <void *> &Ai[0] if Ai.shape[0] > 0 else NULL
        A.nz = NULL
        A.x = NULL
        A.z = NULL
        A.stype = -1
        A.itype = CHOLMOD_INT
        A.xtype = CHOLMOD_PATTERN
        A.dtype = CHOLMOD_DOUBLE
        A.sorted = 1
        A.packed = 1
        with nogil:
            L = cholmod_analyze(&A, &c)
        _check(&c, "cholmod_analyze")
        if L == NULL:
            raise CholmodError("cholmod_analyze returned no factor")
        return _factor_facts(L, &c)
    finally:
        if L != NULL:
            cholmod_free_factor(&L, &c)
        cholmod_finish(&c)


cdef class PLSKernel:
    """Owns CHOLMOD's workspace and the factor L for one model structure.

    Parameters (all validated by the caller)
    ----------
    Ap, Ai, Mx : CSC arrays (int32, int32, float64) of ZᵀZ on its block-closed lower pattern:
        every stored column of a level block has the same row pattern, and each row block
        appears whole and contiguous.
    col_bstart, col_bsize, col_toff : int32[q]; for column c, the first column of its level
        block, the block size k (the term's number of columns) and the offset of the term's
        k×k column-major T in ``Tflat``.
    Tflat : float64, all terms' T matrices, zero-initialised except where θ maps.
    theta_pos : int32[nth], position of each θ element in ``Tflat``.
    ZtXy : float64 (q, p+1) Fortran order, [ZᵀX  Zᵀy].
    XyXy : float64 (p+1, p+1) Fortran order, [XᵀX Xᵀy; yᵀX yᵀy].
    ordering : "default" (CHOLMOD's choice), "amd" or "natural".
    analysis : optional, :func:`symbolic_facts` of this pattern with this ordering: its final
        permutation is used as given (CHOLMOD_GIVEN, no postorder), so the ordering is not searched
        again and the factor is the one the analysis describes (its facts are checked; on any
        difference the kernel analyses the pattern itself).

    :meth:`set_response` swaps [ZᵀX Zᵀy] and the Gram matrix for another response on the same
    design: ZᵀZ, its symbolic analysis and the factor's pattern are kept.
    """
    def __cinit__(self):
        self.L = NULL
        self.B = NULL
        self.C = NULL
        cholmod_start(&self.c)

    def __init__(self, Ap, Ai, Mx, col_bstart, col_bsize, col_toff, Tflat, theta_pos,
                 ZtXy, XyXy, str ordering="default", dict analysis=None):
        self._keep = (Ap, Ai, Mx)
        self.Ap = Ap
        self.Ai = Ai
        self.Mx = Mx
        self.Ax = np.array(Mx, dtype=np.float64, copy=True)
        self.bstart = col_bstart
        self.bsize = col_bsize
        self.toff = col_toff
        self.Tflat = np.array(Tflat, dtype=np.float64, copy=True)
        self.theta_pos = theta_pos
        self.nth = theta_pos.shape[0]
        self.ZtXy = ZtXy
        self.XyXy = XyXy
        self.q = Ap.shape[0] - 1
        self.p = XyXy.shape[0] - 1
        self.S = np.zeros((self.p + 1, self.p + 1), dtype=np.float64, order="F")
        cdef int maxlen = 0, j
        for j in range(self.q):
            maxlen = max(maxlen, self.Ap[j + 1] - self.Ap[j])
        self.W = np.zeros(max(maxlen, 1), dtype=np.float64)
        self.has_state = False

        # Header over the numpy buffers: CHOLMOD reads the lower triangle (stype = -1);
        # the values array is overwritten in place for every θ, the pattern never changes.
        self.A.nrow = self.q
        self.A.ncol = self.q
        self.A.nzmax = self.Ai.shape[0]
        self.A.p = &self.Ap[0]
        self.A.i = &self.Ai[0] if self.Ai.shape[0] > 0 else NULL
        self.A.nz = NULL
        self.A.x = &self.Ax[0] if self.Ax.shape[0] > 0 else NULL
        self.A.z = NULL
        self.A.stype = -1
        self.A.itype = CHOLMOD_INT
        self.A.xtype = CHOLMOD_REAL
        self.A.dtype = CHOLMOD_DOUBLE
        self.A.sorted = 1
        self.A.packed = 1

        self.c.print = 0          # errors are raised as exceptions, not printed
        self.c.final_ll = 1       # keep L in LLᵀ form: log|L| is read off its diagonal
        self.analysis_reused = False
        if analysis is not None:
            self._facts = self._analyse_given(analysis)
        if self.L == NULL:
            _set_ordering(&self.c, ordering)
            with nogil:
                self.L = cholmod_analyze(&self.A, &self.c)
            _check(&self.c, "cholmod_analyze")
            if self.L == NULL:
                raise CholmodError("cholmod_analyze returned no factor")
            self._facts = _factor_facts(self.L, &self.c)    # Common's statistics change with later calls
        self.B = cholmod_allocate_dense(self.q, self.p + 1, self.q, CHOLMOD_REAL, &self.c)
        _check(&self.c, "cholmod_allocate_dense")

    cdef dict _analyse_given(self, dict analysis):
        """Analyse with ``analysis``'s final permutation as given (no ordering search, no postorder:
        the permutation is already postordered); the facts, with the analysis's ordering code, if
        they are the analysis's, else None and no factor (the caller then analyses the pattern)."""
        perm_arr = np.ascontiguousarray(analysis.get("perm"), dtype=np.int32)
        if perm_arr.ndim != 1 or perm_arr.shape[0] != self.q or self.q == 0:
            return None
        cdef int[::1] perm = perm_arr
        cdef int nmethods = self.c.nmethods, postorder = self.c.postorder, first = self.c.method[0].ordering
        self.c.nmethods = 1
        self.c.method[0].ordering = CHOLMOD_GIVEN
        self.c.postorder = 0
        with nogil:
            self.L = cholmod_analyze_p(&self.A, &perm[0], NULL, 0, &self.c)
        self.c.nmethods, self.c.postorder, self.c.method[0].ordering = nmethods, postorder, first
        _check(&self.c, "cholmod_analyze_p")
        if self.L == NULL:
            return None
        facts = _factor_facts(self.L, &self.c)
        same = all(facts[key] == analysis.get(key) for key in ("is_super", "n", "lnz", "fl", "nsuper")) \
            and np.array_equal(facts["perm"], perm_arr) and (not facts["is_super"] or (
                np.array_equal(facts["super_ncols"], analysis.get("super_ncols"))
                and np.array_equal(facts["super_nrows"], analysis.get("super_nrows"))))
        if not same:
            cholmod_free_factor(&self.L, &self.c)
            self.L = NULL
            return None
        facts["ordering"] = int(analysis["ordering"])     # the ordering that found the permutation
        self.analysis_reused = True
        return facts

    def __dealloc__(self):
        if self.C != NULL:
            cholmod_free_dense(&self.C, &self.c)
        if self.B != NULL:
            cholmod_free_dense(&self.B, &self.c)
        if self.L != NULL:
            cholmod_free_factor(&self.L, &self.c)
        cholmod_finish(&self.c)

    # ------------------------------------------------------------------ response
    def set_response(self, ZtXy, XyXy, Mx=None):
        """Use another response on the same design: ``ZtXy`` = [ZᵀX  Zᵀy] (q × (p+1)) and
        ``XyXy`` = [XᵀX Xᵀy; yᵀX yᵀy] ((p+1) × (p+1)), both float64 in Fortran order.

        Only the y column and row differ between responses, but the kernel reads both arrays
        whole, so the caller passes complete ones; the kernel keeps references to them (no copy)
        until the next call.  ``Mx``: new values of ZᵀZ on the kernel's pattern (other prior
        weights, e.g. zero for deleted rows), float64[nnz]; None keeps the current ones.  The
        symbolic analysis and the factor's storage are reused; the state of the last update() is
        dropped, so call update(θ) before state()."""
        shapes = {"ZtXy": (self.q, self.p + 1), "XyXy": (self.p + 1, self.p + 1)}
        for name, arr in (("ZtXy", ZtXy), ("XyXy", XyXy)):
            if not isinstance(arr, np.ndarray):
                raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
            if arr.dtype != np.float64:
                raise TypeError(f"{name} must have dtype float64, got {arr.dtype}")
            if arr.ndim != 2 or arr.shape != shapes[name]:
                raise ValueError(f"{name} must have shape {shapes[name]}, got {arr.shape}")
            if not arr.flags.f_contiguous:
                raise ValueError(f"{name} must be in Fortran (column-major) order")
        if Mx is not None:
            if not isinstance(Mx, np.ndarray) or Mx.dtype != np.float64 or Mx.ndim != 1 \
                    or Mx.shape[0] != self.Ai.shape[0] or not Mx.flags.c_contiguous:
                raise ValueError(f"Mx must be a contiguous float64 array of {self.Ai.shape[0]} values "
                                 "(ZᵀZ on the kernel's pattern)")
        # Memoryview assignment holds a reference to each array (released on the next swap).
        self.has_state = False
        self.ZtXy = ZtXy
        self.XyXy = XyXy
        if Mx is not None and Mx is not self._keep[2]:
            # Other values of ZᵀZ: the selected inverse cached for a θ is no longer this factor's.
            self.Mx = Mx
            self._keep = (self._keep[0], self._keep[1], Mx)
            self.selinv_cache = None

    # ------------------------------------------------------------------ per-θ steps
    cdef void _set_theta(self, const double[::1] theta) noexcept nogil:
        cdef int i
        for i in range(self.nth):
            self.Tflat[self.theta_pos[i]] = theta[i]

    cdef void _form_A(self) noexcept nogil:
        """A = Λᵀ M Λ on M's pattern: W[:, c] = M Λ[:, c], then A[:, c] = Λᵀ W[:, c] blockwise."""
        cdef int c, s, k, j, t, ln, p0, ps, pos, r, k2, rho, u, off2, toff
        cdef double lam, acc
        for c in range(self.q):
            s = self.bstart[c]
            k = self.bsize[c]
            j = c - s
            toff = self.toff[c]
            p0 = self.Ap[c]
            ln = self.Ap[c + 1] - p0
            # Columns of one level block share their row pattern, so Λ[:, c] combines whole columns.
            lam = self.Tflat[toff + j + j * k]
            for pos in range(ln):
                self.W[pos] = lam * self.Mx[p0 + pos]
            for t in range(j + 1, k):
                lam = self.Tflat[toff + t + j * k]
                if lam != 0.0:
                    ps = self.Ap[s + t]
                    for pos in range(ln):
                        self.W[pos] += lam * self.Mx[ps + pos]
            pos = 0
            while pos < ln:
                r = self.Ai[p0 + pos]          # first row of a whole row block
                k2 = self.bsize[r]
                off2 = self.toff[r]
                for rho in range(k2):
                    acc = 0.0
                    for u in range(rho, k2):
                        acc = acc + self.Tflat[off2 + u + rho * k2] * self.W[pos + u]
                    self.Ax[p0 + pos + rho] = acc
                pos += k2

    cdef void _lambdat_dense(self, const double[::1, :] src, double *dst, int ncol) noexcept nogil:
        """dst = Λᵀ src for a q×ncol column-major src."""
        cdef int m, c, s, k, j, t, toff
        cdef double acc
        for m in range(ncol):
            for c in range(self.q):
                s = self.bstart[c]
                k = self.bsize[c]
                j = c - s
                toff = self.toff[c]
                acc = 0.0
                for t in range(j, k):
                    acc = acc + self.Tflat[toff + t + j * k] * src[s + t, m]
                dst[c + m * self.q] = acc

    cdef double _logdet_L2(self) noexcept nogil:
        """log |L|² = 2 Σ log L_jj, read off the factor (simplicial or supernodal)."""
        cdef double acc = 0.0
        cdef size_t sn, j
        cdef int *Lp
        cdef int *sup
        cdef int *pi
        cdef int *px
        cdef double *Lx = <double *> self.L.x
        cdef int ncols, nrows
        if self.L.is_super:
            sup = <int *> self.L.super
            pi = <int *> self.L.pi
            px = <int *> self.L.px
            for sn in range(self.L.nsuper):
                ncols = sup[sn + 1] - sup[sn]
                nrows = pi[sn + 1] - pi[sn]
                for j in range(<size_t> ncols):
                    acc += log(Lx[px[sn] + j * nrows + j])
        else:
            Lp = <int *> self.L.p
            for j in range(self.L.n):
                acc += log(Lx[Lp[j]])
        return 2.0 * acc

    def update(self, const double[::1] theta):
        """Refactorize at θ and compute ldL2, ldRX2 and pwrss (see module docstring)."""
        if theta.shape[0] != self.nth:
            raise ValueError(f"theta has length {theta.shape[0]}, expected {self.nth}")
        cdef double beta[2]
        cdef int ok, info = 0, n1 = self.p + 1, q = self.q, i, j
        cdef char uplo = b'L'
        cdef char trans = b'T'
        cdef double alpha = -1.0, one = 1.0
        cdef cholmod_dense *PB = NULL
        beta[0] = 1.0
        beta[1] = 0.0
        self.has_state = False
        with nogil:
            self._set_theta(theta)
            self._form_A()
            ok = cholmod_factorize_p(&self.A, beta, NULL, 0, self.L, &self.c)
        _check(&self.c, "cholmod_factorize")
        if self.c.status == CHOLMOD_NOT_POSDEF:
            raise NotPositiveDefiniteError(
                f"Λᵀ ZᵀZ Λ + I is not positive definite (column {self.L.minor})", np.asarray(theta))
        with nogil:
            self.ldL2 = self._logdet_L2()
            self._lambdat_dense(self.ZtXy, <double *> self.B.x, n1)
            PB = cholmod_solve(CHOLMOD_P, self.L, self.B, &self.c)
        _check(&self.c, "cholmod_solve(P)")
        if self.C != NULL:
            cholmod_free_dense(&self.C, &self.c)
        with nogil:
            self.C = cholmod_solve(CHOLMOD_L, self.L, PB, &self.c)
            cholmod_free_dense(&PB, &self.c)
        _check(&self.c, "cholmod_solve(L)")
        with nogil:
            for j in range(n1):
                for i in range(n1):
                    self.S[i, j] = self.XyXy[i, j]
            if q > 0:
                dsyrk(&uplo, &trans, &n1, &q, &alpha, <double *> self.C.x, &q, &one,
                      &self.S[0, 0], &n1)
            dpotrf(&uplo, &n1, &self.S[0, 0], &n1, &info)
        if info > 0 and info <= self.p:
            raise NotPositiveDefiniteError(
                "the fixed-effects cross-product XᵀX - R_ZXᵀR_ZX is not positive definite "
                "(rank-deficient fixed effects?)", np.asarray(theta))
        if info > 0:
            # r²(θ) = 0: the model interpolates the response exactly.
            raise NotPositiveDefiniteError("penalised residual sum of squares is zero", np.asarray(theta))
        cdef double ld = 0.0
        for i in range(self.p):
            ld += log(self.S[i, i])
        self.ldRX2 = 2.0 * ld
        self.pwrss = self.S[self.p, self.p] ** 2
        self.has_state = True
        return self.pwrss

    @property
    def theta(self):
        """θ of the current factor (read off T, where update() wrote it), None before the first
        update() and after set_response(): whoever updates the kernel, this says which θ its
        factor belongs to."""
        if not self.has_state:
            return None
        return np.asarray(self.Tflat)[np.asarray(self.theta_pos)]

    def is_at(self, const double[::1] theta):
        """Whether the current factor is the one at ``theta`` (cheaper than comparing ``theta``)."""
        cdef int i
        if not self.has_state or theta.shape[0] != self.nth:
            return False
        for i in range(self.nth):
            if self.Tflat[self.theta_pos[i]] != theta[i]:
                return False
        return True

    # ------------------------------------------------------------------ state at θ
    def state(self):
        """β̂, spherical û, the Cholesky factor R (lower, (p+1)×(p+1)) of the Schur complement,
        from the last update():  R_Xᵀ β̂ = c_β  and  Lᵀ P û = c_u - R_ZX β̂."""
        if not self.has_state:
            raise RuntimeError("call update(theta) first")
        cdef int p = self.p, q = self.q, i, j
        R = np.tril(np.asarray(self.S).copy())
        RX_lower = R[:p, :p]
        cbeta = R[p, :p]
        if p > 0:
            beta = solve_triangular(RX_lower, cbeta, lower=True, trans="T")
        else:
            beta = np.zeros(0)
        Cnp = np.asarray(<double[:q * (p + 1)]> (<double *> self.C.x)).reshape((q, p + 1), order="F")
        rhs = np.asfortranarray((Cnp[:, p] - Cnp[:, :p] @ beta).reshape(q, 1))
        u = self._solve(CHOLMOD_Lt, rhs)
        u = self._solve(CHOLMOD_Pt, u)[:, 0]
        return {"beta": beta, "u": u, "R": R, "ldL2": self.ldL2, "ldRX2": self.ldRX2,
                "pwrss": self.pwrss}

    cdef object _solve(self, int system, cnp.ndarray rhs):
        cdef double[::1, :] r = rhs
        cdef cholmod_dense Bd
        cdef cholmod_dense *X = NULL
        Bd.nrow = r.shape[0]
        Bd.ncol = r.shape[1]
        Bd.nzmax = r.shape[0] * r.shape[1]
        Bd.d = r.shape[0]
        Bd.x = &r[0, 0]
        Bd.z = NULL
        Bd.xtype = CHOLMOD_REAL
        Bd.dtype = CHOLMOD_DOUBLE
        with nogil:
            X = cholmod_solve(system, self.L, &Bd, &self.c)
        _check(&self.c, "cholmod_solve")
        out = np.empty((r.shape[0], r.shape[1]), dtype=np.float64, order="F")
        cdef double[::1, :] o = out
        if Bd.nzmax > 0:
            memcpy(&o[0, 0], X.x, Bd.nzmax * sizeof(double))
        cholmod_free_dense(&X, &self.c)
        return out

    def H_REML(self):
        """H = Pᵀ L⁻ᵀ R_ZX R_X⁻¹ (q × p): the REML correction Ω⁻¹_uu = (A+I)⁻¹ + H Hᵀ of the
        random-effects block of the inverse (gradient of log|R_X|²), from the current factor."""
        if not self.has_state:
            raise RuntimeError("call update(theta) first")
        cdef int p = self.p, q = self.q
        if p == 0 or q == 0:
            return np.zeros((q, p))
        Cnp = np.asarray(<double[:q * (p + 1)]> (<double *> self.C.x)).reshape((q, p + 1), order="F")
        Lx = np.tril(np.asarray(self.S)[:p, :p])
        W = np.asfortranarray(solve_triangular(Lx, Cnp[:, :p].T, lower=True).T)     # R_ZX R_X⁻¹
        return self._solve(CHOLMOD_Pt, self._solve(CHOLMOD_Lt, W))

    def solve_L(self, rhs):
        """L⁻¹ P rhs for a q×m array (from the current factor)."""
        if not self.has_state:
            raise RuntimeError("call update(theta) first")
        rhs = np.asfortranarray(np.asarray(rhs, dtype=np.float64).reshape(self.q, -1))
        if rhs.shape[1] == 0 or self.q == 0:
            return np.zeros_like(rhs)
        return self._solve(CHOLMOD_L, self._solve(CHOLMOD_P, rhs))

    @property
    def factor_info(self):
        """Facts about L from the symbolic analysis: ``is_super`` (supernodal or simplicial),
        ``ordering`` (CHOLMOD's code of the ordering used), ``n``, ``lnz`` (fundamental
        nonzeros of L), ``fl`` (flops of a simplicial LLᵀ factorization, CHOLMOD's count:
        Σⱼ cⱼ², cⱼ the entries of column j of L), ``anz`` (entries of tril(A)), and for a
        supernodal L ``nsuper`` and per supernode its columns and rows (``super_ncols``,
        ``super_nrows``)."""
        return dict(self._facts)

    def set_threads(self, int n):
        """Let CHOLMOD's OpenMP parallel regions use at most ``n`` threads (``Common.nthreads_max``,
        CHOLMOD ≥ 4); returns False where the version has no such setting (CHOLMOD 3 does not
        use OpenMP in the factorization)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        return bool(fastlmm_set_nthreads_max(&self.c, n))
