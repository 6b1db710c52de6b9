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
Cython trusts"); CHOLMOD status codes become Python exceptions.
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport log, sqrt
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport dsyrk
from scipy.linalg.cython_lapack cimport dpotrf

from cholmod cimport *

from fastlmm_ext._exceptions import CholmodError, NotPositiveDefiniteError

cnp.import_array()

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

    :meth:`set_response` swaps [ZᵀX Zᵀy] and the Gram matrix for another response on the same
    design: ZᵀZ, its symbolic analysis and the factor's pattern are kept.
    """
    cdef cholmod_common c
    cdef cholmod_factor *L
    cdef cholmod_sparse A
    cdef cholmod_dense *B
    cdef cholmod_dense *C
    cdef int q, p, nth
    cdef int[::1] Ap, Ai, bstart, bsize, toff, theta_pos
    cdef double[::1] Mx, Ax, Tflat, W
    cdef const double[::1, :] ZtXy, XyXy   # read only: the caller's arrays, replaced by set_response
    cdef double[::1, :] S
    cdef readonly double ldL2, ldRX2, pwrss
    cdef readonly bint has_state
    cdef object _keep
    cdef object _theta      # θ of the current factor (read-only copy)

    def __cinit__(self):
        self.L = NULL
        self.B = NULL
        self.C = NULL
        cholmod_start(&self.c)

    def __init__(self, Ap, Ai, Mx, col_bstart, col_bsize, col_toff, Tflat, theta_pos,
                 ZtXy, XyXy, str ordering="default"):
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
        if ordering == "natural":
            self.c.nmethods = 1
            self.c.method[0].ordering = CHOLMOD_NATURAL
            self.c.postorder = 0
        elif ordering == "amd":
            self.c.nmethods = 1
            self.c.method[0].ordering = CHOLMOD_AMD
        elif ordering != "default":
            raise ValueError(f"unknown ordering {ordering!r}; use 'default', 'amd' or 'natural'")
        with nogil:
            self.L = cholmod_analyze(&self.A, &self.c)
        _check(&self.c, "cholmod_analyze")
        if self.L == NULL:
            raise CholmodError("cholmod_analyze returned no factor")
        self.B = cholmod_allocate_dense(self.q, self.p + 1, self.q, CHOLMOD_REAL, &self.c)
        _check(&self.c, "cholmod_allocate_dense")

    def __dealloc__(self):
        if self.C != NULL:
            cholmod_free_dense(&self.C, &self.c)
        if self.B != NULL:
            cholmod_free_dense(&self.B, &self.c)
        if self.L != NULL:
            cholmod_free_factor(&self.L, &self.c)
        cholmod_finish(&self.c)

    # ------------------------------------------------------------------ response
    def set_response(self, ZtXy, XyXy):
        """Use another response on the same design: ``ZtXy`` = [ZᵀX  Zᵀy] (q × (p+1)) and
        ``XyXy`` = [XᵀX Xᵀy; yᵀX yᵀy] ((p+1) × (p+1)), both float64 in Fortran order.

        Only the y column and row differ between responses, but the kernel reads both arrays
        whole, so the caller passes complete ones; the kernel keeps references to them (no copy)
        until the next call.  The symbolic analysis and the factor's storage are reused; the
        state of the last update() is dropped, so call update(θ) before state()."""
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
        # Memoryview assignment holds a reference to each array (released on the next swap).
        self.has_state = False
        self.ZtXy = ZtXy
        self.XyXy = XyXy

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
        th = np.array(theta, dtype=np.float64, copy=True)
        th.flags.writeable = False
        self._theta = th
        self.has_state = True
        return self.pwrss

    @property
    def theta(self):
        """θ of the current factor (read-only), None before the first update() and after
        set_response(): whoever updates the kernel, this says which θ its factor belongs to."""
        return self._theta if self.has_state else None

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
            from scipy.linalg import solve_triangular
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
        from scipy.linalg import solve_triangular
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
        """Facts about L: supernodal or not, stored entries, ordering method used."""
        return {"is_super": bool(self.L.is_super), "ordering": int(self.L.ordering),
                "lnz": float(self.c.lnz), "n": int(self.L.n)}

    # ------------------------------------------------------------------ selected inverse
    # Z = (L Lᵀ)⁻¹ = P (A + I)⁻¹ Pᵀ on the nonzero pattern of L (Takahashi / Erisman–Tinney
    # recurrences, supernode by supernode in reverse order; see _selinv_sweep below).  The
    # result is cached for the factor of the last update(): the factor is a function of Tflat
    # alone (M and the symbolic analysis are fixed), so a copy of Tflat is the cache key.
    cdef object _si_key
    cdef object _si_Z
    cdef object _si_layout

    cdef object _si_ensure(self):
        """Compute (or reuse) Z for the current factor; returns (Z, layout arrays)."""
        if not self.has_state:
            raise RuntimeError("call update(theta) first")
        if not self.L.is_ll:
            raise CholmodError("selected inverse needs an LLᵀ factor (got LDLᵀ)")
        key = (np.asarray(self.Tflat).tobytes(), bool(self.L.is_super), <size_t> self.L.x,
               _si_nb, <size_t> _si_dgemm)
        if self._si_Z is not None and self._si_key == key:
            return self._si_Z, self._si_layout
        self._si_Z = None
        self._si_key = None
        self._si_layout = None
        cdef int n = self.q, nsn, s, j, maxm = 1, maxnr = 1, nc, m, st = 0
        cdef int *sup_L
        cdef int *pi_L
        cdef int *px_L
        cdef int *Lp
        cdef int *Lnz
        cdef int *perm = <int *> self.L.Perm
        cdef Py_ssize_t xsize
        nsn = <int> self.L.nsuper if self.L.is_super else n
        sup_a = np.empty(nsn + 1, dtype=np.int32)
        rptr_a = np.empty(max(nsn, 1), dtype=np.int32)
        nrow_a = np.empty(max(nsn, 1), dtype=np.int32)
        vptr_a = np.empty(max(nsn, 1), dtype=np.int32)
        col2sn_a = np.empty(max(n, 1), dtype=np.int32)
        iperm_a = np.empty(max(n, 1), dtype=np.int32)
        cdef int[::1] sup = sup_a, rptr = rptr_a, nrow = nrow_a, vptr = vptr_a
        cdef int[::1] col2sn = col2sn_a, iperm = iperm_a
        with nogil:
            if self.L.is_super:
                sup_L = <int *> self.L.super
                pi_L = <int *> self.L.pi
                px_L = <int *> self.L.px
                for s in range(nsn):
                    sup[s] = sup_L[s]
                    rptr[s] = pi_L[s]
                    nrow[s] = pi_L[s + 1] - pi_L[s]
                    vptr[s] = px_L[s]
                sup[nsn] = sup_L[nsn]
                xsize = px_L[nsn]
            else:
                Lp = <int *> self.L.p
                Lnz = <int *> self.L.nz
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
        cdef const int *rows = <int *> (self.L.s if self.L.is_super else self.L.i)
        if n > 0:
            with nogil:
                st = _selinv_sweep(nsn, &sup[0], &rptr[0], &nrow[0], &vptr[0], &col2sn[0], rows,
                                   <double *> self.L.x, &Z[0], &Zrr[0], &Y[0], &Linv[0], &loc[0], nb)
        if st == -1:
            raise CholmodError("selected inverse: factor pattern is not closed (row missing in an "
                               "ancestor supernode)")
        if st != 0:
            raise CholmodError(f"selected inverse: zero pivot in the factor (supernode column {st - 1})")
        layout = (sup_a, rptr_a, nrow_a, vptr_a, col2sn_a, iperm_a)
        self._si_Z = Z_a
        self._si_layout = layout
        self._si_key = key
        return Z_a, layout

    def inverse_diag(self):
        """diag((A + I)⁻¹), A = ΛᵀZᵀZΛ, in the original (unpermuted) column order, from the
        selected inverse of the current factor (call update(theta) first)."""
        Z_a, layout = self._si_ensure()
        sup_a, rptr_a, nrow_a, vptr_a, col2sn_a, iperm_a = layout
        cdef double[::1] Z = Z_a
        cdef int[::1] sup = sup_a, nrow = nrow_a, vptr = vptr_a, iperm = iperm_a
        cdef int n = self.q, nsn = sup_a.shape[0] - 1, s, j, m
        cdef const int *perm = <int *> self.L.Perm
        out_a = np.empty(n, dtype=np.float64)
        cdef double[::1] out = out_a
        with nogil:
            for s in range(nsn):
                m = nrow[s]
                for j in range(sup[s + 1] - sup[s]):
                    out[perm[sup[s] + j] if perm != NULL else sup[s] + j] = \
                        Z[<Py_ssize_t> vptr[s] + <Py_ssize_t> j * m + j]
        return out_a

    def inverse_blocks(self, int col_offset, int k, int nlevels):
        """Diagonal k×k blocks of (A + I)⁻¹ (original order) of a term occupying columns
        col_offset + a·k + i (level a < nlevels, i < k): float64[nlevels, k, k].  Every entry of
        such a block lies in the pattern of A, hence in that of the (permuted) factor."""
        if k < 1 or nlevels < 0 or col_offset < 0 or col_offset + <long> k * nlevels > self.q:
            raise ValueError(f"columns {col_offset} + {k}×{nlevels} outside 0..{self.q}")
        Z_a, layout = self._si_ensure()
        sup_a, rptr_a, nrow_a, vptr_a, col2sn_a, iperm_a = layout
        cdef double[::1] Z = Z_a
        cdef int[::1] sup = sup_a, rptr = rptr_a, nrow = nrow_a, vptr = vptr_a
        cdef int[::1] col2sn = col2sn_a, iperm = iperm_a
        cdef const int *rows = <int *> (self.L.s if self.L.is_super else self.L.i)
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


# ---------------------------------------------------------------------- selected inverse (C level)
from scipy.linalg.cython_blas cimport dgemm


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
