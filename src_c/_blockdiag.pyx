# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Closed-form PLS for a model with one random-effects term: no sparse matrices, no CHOLMOD.

With one term (k columns, ℓ levels) Λ = I_ℓ ⊗ T and ZᵀWZ is block diagonal with the level
blocks M_l (k×k), so

    A + I = ΛᵀZᵀWZΛ + I = blockdiag_l (A_l),   A_l = Tᵀ M_l T + I,

and every solve of lme4's PLS equations splits into ℓ independent k×k ones.  Each A_l ≥ I is
factored as A_l = L_l D_l L_lᵀ (L_l unit lower triangular, D_l diagonal with entries ≥ 1:
no square roots), and with G_l = Tᵀ W_l, W_l the level's k×(p+1) block of ZᵀW[X ỹ]:

    log|L_θ|² = Σ_l log|A_l| = Σ_l Σ_i log d_{l,i},
    S = [X ỹ]ᵀW[X ỹ] − Σ_l G_lᵀ A_l⁻¹ G_l = Σ-reduced (p+1)×(p+1) Schur complement,  S = R Rᵀ,

R lower: R_X = R[:p, :p]ᵀ, r²(θ) = R[p, p]², log|R_X|² = 2 Σ_{i<p} log R_ii (lme4's
equations, ``_pls``).  The log-determinant is accumulated as a product of the d's renormalised
by frexp (one libm log per evaluation instead of one per level).  The same per-level factors
give the modes and the gradient's pieces in a second pass (``solve``):

    β̂ = R_X⁻¹ (R[p, :p])ᵀ,   û_l = A_l⁻¹ (G_l,ỹ − G_l,X β̂),   ρ_l = W_l,ỹ − W_l,X β̂ − M_l T û_l,
    Σ_l ρ_l û_lᵀ,   Σ_l A_l⁻¹   and (REML)  Σ_l H_l H_lᵀ,  H_l = A_l⁻¹ G_l,X R_X⁻¹,

from which ``_gradient.term_gradient`` forms ∂f/∂θ.  ``level_crossproducts`` forms M_l and
ZᵀW[X ỹ] in one pass over the rows, summing each entry in row order with the products
bincount and CSR mat-vecs form, so the values equal those of ``_crossprod``'s general path.

Python validates shapes and dtypes ("Python validates, Cython trusts").
"""
import numpy as np
cimport numpy as cnp
from libc.math cimport frexp, log, sqrt

from fastlmm_ext._exceptions import NotPositiveDefiniteError

cnp.import_array()

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FL_PREFETCH(p) __builtin_prefetch(p)
    #else
    #define FL_PREFETCH(p) ((void)0)
    #endif
    """
    void FL_PREFETCH(const void *p) noexcept nogil

# Rows ahead whose level block is prefetched: the blocks are scattered over ℓ·(k² + k·m) doubles
# (10 MB at 125,000 levels), so without it each row waits for memory (5x slower on a busy machine).
cdef Py_ssize_t AHEAD = 16

# A product of d's is renormalised when it passes BIG; a single d above BIG goes to log directly.
cdef double BIG = 1e150


def level_crossproducts(const cnp.int64_t[::1] codes, const double[:, ::1] Xi, const double[::1, :] Xy,
                        w, Py_ssize_t nlevels):
    """(M, ZtXy) of one term from its rows: M[l] = Σ_{r: codes[r]=l} w_r x_r x_rᵀ (ℓ, k, k) and
    ZtXy[l·k + u, j] = Σ_r x_r[u] w_r Xy[r, j] ((ℓ·k, m), Fortran order), x_r = Xi[r, :].

    ``w`` is None or float64[n].  Each entry is summed over its rows in row order, with the
    products formed as ``_crossprod`` forms them ((x_u w) x_v and x_u (Xy_j w))."""
    cdef Py_ssize_t n = Xi.shape[0], k = Xi.shape[1], m = Xy.shape[1]
    cdef Py_ssize_t kk = k * k, blk = k * k + k * m
    cdef Py_ssize_t r, u, v, j
    cdef double xu, wr
    cdef const double *wp = NULL
    cdef const double *xr
    cdef const double *xy = &Xy[0, 0]
    cdef const cnp.int64_t *cd = &codes[0]
    cdef double *a
    cdef const double[::1] wv
    if w is not None:
        wv = w
        wp = &wv[0]
    # one contiguous block per level ([M_l | W_l]): one random access per row
    acc_arr = np.zeros((nlevels, blk))
    cdef double[:, ::1] acc = acc_arr
    cdef double *base = &acc[0, 0]
    with nogil:
        if wp == NULL:
            for r in range(n):
                if r + AHEAD < n:
                    a = base + cd[r + AHEAD] * blk
                    FL_PREFETCH(a)
                    FL_PREFETCH(a + blk - 1)
                a = base + cd[r] * blk
                xr = &Xi[r, 0]
                for u in range(k):
                    xu = xr[u]
                    for v in range(k):
                        a[u * k + v] += xu * xr[v]
                    for j in range(m):
                        a[kk + u * m + j] += xu * xy[j * n + r]
        else:
            for r in range(n):
                if r + AHEAD < n:
                    a = base + cd[r + AHEAD] * blk
                    FL_PREFETCH(a)
                    FL_PREFETCH(a + blk - 1)
                a = base + cd[r] * blk
                xr = &Xi[r, 0]
                wr = wp[r]
                for u in range(k):
                    xu = xr[u]
                    for v in range(k):
                        a[u * k + v] += (xu * wr) * xr[v]
                    for j in range(m):
                        a[kk + u * m + j] += xu * (xy[j * n + r] * wr)
    M = np.ascontiguousarray(acc_arr[:, :kk]).reshape(nlevels, k, k)
    ZtXy = np.asfortranarray(acc_arr[:, kk:].reshape(nlevels * k, m))
    return M, ZtXy


cdef inline bint _ldl(double *A, Py_ssize_t k) noexcept nogil:
    """In place A = L D Lᵀ (row-major k×k, lower triangle read): L's strict lower part and D on
    the diagonal.  False if a pivot is not positive."""
    cdef Py_ssize_t i, j, s
    cdef double acc
    for j in range(k):
        acc = A[j * k + j]
        for s in range(j):
            acc -= A[j * k + s] * A[j * k + s] * A[s * k + s]
        if not acc > 0.0:
            return False
        A[j * k + j] = acc
        for i in range(j + 1, k):
            acc = A[i * k + j]
            for s in range(j):
                acc -= A[i * k + s] * A[j * k + s] * A[s * k + s]
            A[i * k + j] = acc / A[j * k + j]
    return True


cdef inline void _form_A(const double *T, const double *Ml, double *TM, double *A, Py_ssize_t k) noexcept nogil:
    """A = Tᵀ M_l T + I (row-major k×k; T lower triangular, row-major)."""
    cdef Py_ssize_t i, j, a
    cdef double acc
    for i in range(k):                  # TM = Tᵀ M_l: TM[i, j] = Σ_{a ≥ i} T[a, i] M[a, j]
        for j in range(k):
            acc = 0.0
            for a in range(i, k):
                acc += T[a * k + i] * Ml[a * k + j]
            TM[i * k + j] = acc
    for i in range(k):                  # A[i, j] = Σ_{a ≥ j} TM[i, a] T[a, j], lower triangle
        for j in range(i + 1):
            acc = 0.0
            for a in range(j, k):
                acc += TM[i * k + a] * T[a * k + j]
            A[i * k + j] = acc
        A[i * k + i] += 1.0


cdef inline void _form_G(const double *T, const double *Wl, double *G, Py_ssize_t k, Py_ssize_t m) noexcept nogil:
    """G = Tᵀ W_l (k×m row-major)."""
    cdef Py_ssize_t i, j, a
    cdef double acc
    for i in range(k):
        for j in range(m):
            acc = 0.0
            for a in range(i, k):
                acc += T[a * k + i] * Wl[a * m + j]
            G[i * m + j] = acc


cdef inline void _solve_ldl(const double *F, double *x, Py_ssize_t k, Py_ssize_t ncol) noexcept nogil:
    """x ← A⁻¹ x for the k×ncol row-major x, with F the LDLᵀ factor of A (``_ldl``)."""
    cdef Py_ssize_t i, s, c
    for c in range(ncol):
        for i in range(k):              # L z = x
            for s in range(i):
                x[i * ncol + c] -= F[i * k + s] * x[s * ncol + c]
        for i in range(k):              # D
            x[i * ncol + c] /= F[i * k + i]
        for i in range(k - 1, -1, -1):  # Lᵀ u = z
            for s in range(i + 1, k):
                x[i * ncol + c] -= F[s * k + i] * x[s * ncol + c]


cdef class BlockDiagPLS:
    """The PLS problem of a one-term model on its level blocks (module docstring).

    Parameters (validated by the caller)
    ----------
    M : float64 (ℓ, k, k) C-contiguous, the level blocks of ZᵀWZ.
    W : float64 (ℓ, k, m) C-contiguous, the level blocks of ZᵀW[X ỹ], m = p + 1.
    XyXy : float64 (m, m) C-contiguous, [X ỹ]ᵀW[X ỹ].

    :meth:`update` evaluates the PLS pieces at θ (``ldL2``, ``ldRX2``, ``pwrss``, and R);
    :meth:`solve` and :meth:`inverse_blocks` use the θ of the last update."""
    cdef double[:, :, ::1] M
    cdef double[:, :, ::1] W
    cdef double[:, ::1] XyXy
    cdef readonly Py_ssize_t nlevels, k, m
    cdef double[:, ::1] T        # k×k lower triangular, row-major, at theta_at
    cdef double[:, ::1] R        # m×m lower Cholesky factor of the Schur complement
    cdef double[::1] theta_at
    cdef readonly double ldL2, ldRX2, pwrss
    cdef readonly bint updated
    cdef double[::1] scratch
    cdef object _keep

    def __init__(self, M, W, XyXy):
        self._keep = (M, W, XyXy)
        self.M = M
        self.W = W
        self.XyXy = XyXy
        self.nlevels = M.shape[0]
        self.k = M.shape[1]
        self.m = XyXy.shape[0]
        self.T = np.zeros((self.k, self.k))
        self.R = np.zeros((self.m, self.m))
        self.theta_at = np.full(self.k * (self.k + 1) // 2, np.nan)
        self.updated = False
        k, m = self.k, self.m
        self.scratch = np.zeros(3 * k * k + 2 * k * m + 2 * m * m + k + m)

    def is_at(self, const double[::1] theta) -> bool:
        """Whether the last update was at ``theta``."""
        cdef Py_ssize_t i
        if not self.updated:
            return False
        for i in range(theta.shape[0]):
            if theta[i] != self.theta_at[i]:
                return False
        return True

    def update(self, const double[::1] theta):
        """The PLS pieces at θ (T's lower triangle column by column, lme4's layout)."""
        cdef Py_ssize_t k = self.k, m = self.m, ell = self.nlevels
        cdef Py_ssize_t i, j, c, idx, l, e
        cdef double *T = &self.T[0, 0]
        cdef double *sc = &self.scratch[0]
        cdef double *TM = sc
        cdef double *A = sc + k * k
        cdef double *G = sc + 2 * k * k
        cdef double *S = sc + 2 * k * k + k * m          # m×m accumulator of Σ Gᵀ A⁻¹ G
        cdef double *Ml
        cdef double *Wl
        cdef double prod = 1.0, ld = 0.0, det, acc, g0, g1, t0, t1, t2, a00, a01, a11, d0, d1, l10
        cdef double m00, m01, m11
        cdef int ex
        cdef long long esum = 0
        cdef bint ok = True
        cdef double *Rp = &self.R[0, 0]
        idx = 0
        for c in range(k):                                # θ → T (row-major), column by column
            for i in range(c, k):
                T[i * k + c] = theta[idx]
                idx += 1
        for i in range(m * m):
            S[i] = 0.0
        self.updated = False
        with nogil:
            if k == 1:
                t0 = T[0]
                for l in range(ell):
                    d0 = t0 * t0 * self.M[l, 0, 0] + 1.0
                    Wl = &self.W[l, 0, 0]
                    for i in range(m):
                        g0 = t0 * Wl[i] / d0
                        for j in range(i + 1):
                            S[i * m + j] += g0 * (t0 * Wl[j])
                    if d0 > BIG:
                        ld += log(d0)
                    else:
                        prod *= d0
                        if prod > BIG:
                            prod = frexp(prod, &ex)
                            esum += ex
            elif k == 2:
                t0, t1, t2 = T[0], T[2], T[3]
                for l in range(ell):
                    m00, m01, m11 = self.M[l, 0, 0], self.M[l, 0, 1], self.M[l, 1, 1]
                    # A = Tᵀ M T + I and its LDLᵀ: d0, l10, d1
                    a00 = t0 * t0 * m00 + 2.0 * t0 * t1 * m01 + t1 * t1 * m11 + 1.0
                    a01 = t2 * (t0 * m01 + t1 * m11)
                    a11 = t2 * t2 * m11 + 1.0
                    d0 = a00
                    l10 = a01 / a00
                    d1 = a11 - l10 * a01
                    if not d1 > 0.0:
                        ok = False
                        break
                    Wl = &self.W[l, 0, 0]
                    # V = L⁻¹ Tᵀ W_l (rows v0, v1); S += v0ᵀv0 / d0 + v1ᵀv1 / d1
                    for i in range(m):
                        G[i] = t0 * Wl[i] + t1 * Wl[m + i]
                        G[m + i] = t2 * Wl[m + i] - l10 * G[i]
                    for i in range(m):
                        g0 = G[i] / d0
                        g1 = G[m + i] / d1
                        for j in range(i + 1):
                            S[i * m + j] += g0 * G[j] + g1 * G[m + j]
                    det = d0 * d1
                    if det > BIG:
                        ld += log(det)
                    else:
                        prod *= det
                        if prod > BIG:
                            prod = frexp(prod, &ex)
                            esum += ex
            else:
                for l in range(ell):
                    _form_A(T, &self.M[l, 0, 0], TM, A, k)
                    if not _ldl(A, k):
                        ok = False
                        break
                    _form_G(T, &self.W[l, 0, 0], G, k, m)
                    for c in range(m):                    # V = L⁻¹ G, in place
                        for i in range(k):
                            for e in range(i):
                                G[i * m + c] -= A[i * k + e] * G[e * m + c]
                    det = 1.0
                    for i in range(k):
                        det *= A[i * k + i]
                        for c in range(m):
                            g0 = G[i * m + c] / A[i * k + i]
                            for j in range(c + 1):
                                S[c * m + j] += g0 * G[i * m + j]
                    if det > BIG:
                        ld += log(det)
                    else:
                        prod *= det
                        if prod > BIG:
                            prod = frexp(prod, &ex)
                            esum += ex
        if not ok:
            raise NotPositiveDefiniteError("single-term: a level block Tᵀ M_l T + I is not positive definite",
                                           np.asarray(theta).copy())
        # Schur complement XyXy − S and its Cholesky factor R (lower)
        for i in range(m):
            for j in range(i + 1):
                Rp[i * m + j] = self.XyXy[i, j] - S[i * m + j]
            for j in range(i + 1, m):
                Rp[i * m + j] = 0.0
        for j in range(m):
            acc = Rp[j * m + j]
            for e in range(j):
                acc -= Rp[j * m + e] * Rp[j * m + e]
            if not acc > 0.0:
                if j == m - 1:
                    self.ldRX2 = 0.0
                    self.pwrss = acc if acc == acc else 0.0
                    self.ldL2 = ld + log(prod) + esum * log(2.0)
                    # r² ≤ 0: the fixed effects reproduce y; the criterion reports it (_pls)
                    Rp[j * m + j] = 0.0
                    self._set_theta(theta)
                    return
                raise NotPositiveDefiniteError("single-term: the fixed-effects block is not positive definite",
                                               np.asarray(theta).copy())
            Rp[j * m + j] = sqrt(acc)
            for i in range(j + 1, m):
                acc = Rp[i * m + j]
                for e in range(j):
                    acc -= Rp[i * m + e] * Rp[j * m + e]
                Rp[i * m + j] = acc / Rp[j * m + j]
        acc = 0.0
        for i in range(m - 1):
            acc += log(Rp[i * m + i])
        self.ldRX2 = 2.0 * acc
        self.pwrss = Rp[(m - 1) * m + (m - 1)] ** 2
        self.ldL2 = ld + log(prod) + esum * log(2.0)
        self._set_theta(theta)

    cdef void _set_theta(self, const double[::1] theta):
        cdef Py_ssize_t i
        for i in range(theta.shape[0]):
            self.theta_at[i] = theta[i]
        self.updated = True

    def R_factor(self):
        """The (p+1)×(p+1) lower Cholesky factor R of the Schur complement at the last update."""
        return np.asarray(self.R).copy()

    def solve(self, bint want_gradient, bint reml):
        """At the θ of the last update: β̂ (of the shifted response), û (ℓ·k), and, if
        ``want_gradient``, Σ_l ρ_l û_lᵀ and Σ_l A_l⁻¹ (+ Σ_l H_l H_lᵀ for REML), both k×k
        (module docstring); else None for those two."""
        if not self.updated:
            raise RuntimeError("BlockDiagPLS.solve before update")
        cdef Py_ssize_t k = self.k, m = self.m, p = self.m - 1, ell = self.nlevels
        cdef Py_ssize_t i, j, a, c, l
        cdef double acc
        beta_arr = np.zeros(p)
        cdef double[::1] beta = beta_arr
        cdef const double *R = &self.R[0, 0]
        # R_X β̂ = R[p, :p]ᵀ with R_X = R[:p, :p]ᵀ (back substitution on the transposed factor)
        for i in range(p - 1, -1, -1):
            acc = R[p * m + i]
            for j in range(i + 1, p):
                acc -= R[j * m + i] * beta[j]
            beta[i] = acc / R[i * m + i]
        u_arr = np.empty(ell * k)
        PU_arr = np.zeros((k, k))
        Gsum_arr = np.zeros((k, k))
        cdef double *u = <double *> cnp.PyArray_DATA(u_arr)
        cdef double *PU = <double *> cnp.PyArray_DATA(PU_arr)
        cdef double *Gs = <double *> cnp.PyArray_DATA(Gsum_arr)
        cdef const double *bp = &beta[0] if p > 0 else NULL
        cdef double *T = &self.T[0, 0]
        cdef double *sc = &self.scratch[0]
        cdef double *TM = sc
        cdef double *A = sc + k * k
        cdef double *Ainv = sc + 2 * k * k
        cdef double *r = sc + 3 * k * k                   # W_l,ỹ − W_l,X β̂ (k)
        cdef double *H = sc + 3 * k * k + k               # k×p: G_l,X R_X⁻¹, then A_l⁻¹ of it
        cdef const double *Ml
        cdef const double *Wl
        cdef double *ul
        cdef const double *Mbase = &self.M[0, 0, 0]
        cdef const double *Wbase = &self.W[0, 0, 0]
        cdef bint do_h = want_gradient and reml and p > 0
        cdef double t0, t1, t2, d0, d1, l10, a00, a01, a11, g0, g1, z1, u0, u1, b0, b1, h0, h1, rho0, rho1
        cdef double s00 = 0.0, s01 = 0.0, s11 = 0.0, p00 = 0.0, p01 = 0.0, p10 = 0.0, p11 = 0.0
        with nogil:
            if k == 1:
                t0 = T[0]
                for l in range(ell):
                    d0 = t0 * t0 * Mbase[l] + 1.0
                    Wl = Wbase + l * m
                    acc = Wl[p]
                    for j in range(p):
                        acc -= Wl[j] * bp[j]
                    u[l] = t0 * acc / d0
                    if not want_gradient:
                        continue
                    p00 += (acc - Mbase[l] * (t0 * u[l])) * u[l]
                    s00 += 1.0 / d0
                    if do_h:
                        for c in range(p):                # h R_X = t0 W_l,X, then h / d0
                            g0 = t0 * Wl[c]
                            for j in range(c):
                                g0 -= H[j] * R[c * m + j]
                            H[c] = g0 / R[c * m + c]
                        acc = 0.0
                        for c in range(p):
                            acc += H[c] * H[c]
                        s00 += acc / (d0 * d0)
                Gs[0] = s00
                PU[0] = p00
            elif k == 2:
                t0, t1, t2 = T[0], T[2], T[3]
                for l in range(ell):
                    Ml = Mbase + 4 * l
                    Wl = Wbase + 2 * m * l
                    a00 = t0 * t0 * Ml[0] + 2.0 * t0 * t1 * Ml[1] + t1 * t1 * Ml[3] + 1.0
                    a01 = t2 * (t0 * Ml[1] + t1 * Ml[3])
                    a11 = t2 * t2 * Ml[3] + 1.0
                    d0 = a00
                    l10 = a01 / a00
                    d1 = a11 - l10 * a01
                    g0 = Wl[p]
                    g1 = Wl[m + p]
                    for j in range(p):
                        g0 -= Wl[j] * bp[j]
                        g1 -= Wl[m + j] * bp[j]
                    r[0] = g0
                    r[1] = g1
                    # û = A⁻¹ Tᵀ r through A = L D Lᵀ
                    g0, g1 = t0 * r[0] + t1 * r[1], t2 * r[1]
                    z1 = g1 - l10 * g0
                    u1 = z1 / d1
                    u0 = g0 / d0 - l10 * u1
                    ul = u + 2 * l
                    ul[0] = u0
                    ul[1] = u1
                    if not want_gradient:
                        continue
                    b0 = t0 * u0
                    b1 = t1 * u0 + t2 * u1
                    rho0 = r[0] - (Ml[0] * b0 + Ml[1] * b1)
                    rho1 = r[1] - (Ml[2] * b0 + Ml[3] * b1)
                    p00 += rho0 * u0
                    p01 += rho0 * u1
                    p10 += rho1 * u0
                    p11 += rho1 * u1
                    # A⁻¹ = [[1/d0 + l10²/d1, −l10/d1], [−l10/d1, 1/d1]]
                    s00 += 1.0 / d0 + l10 * l10 / d1
                    s01 -= l10 / d1
                    s11 += 1.0 / d1
                    if do_h:
                        for c in range(p):                # rows of (Tᵀ W_l,X) R_X⁻¹
                            h0 = t0 * Wl[c] + t1 * Wl[m + c]
                            h1 = t2 * Wl[m + c]
                            for j in range(c):
                                h0 -= H[j] * R[c * m + j]
                                h1 -= H[p + j] * R[c * m + j]
                            H[c] = h0 / R[c * m + c]
                            H[p + c] = h1 / R[c * m + c]
                        for c in range(p):                # A⁻¹ of each column, then Σ H Hᵀ
                            h1 = (H[p + c] - l10 * H[c]) / d1
                            h0 = H[c] / d0 - l10 * h1
                            s00 += h0 * h0
                            s01 += h0 * h1
                            s11 += h1 * h1
                Gs[0] = s00
                Gs[1] = s01
                Gs[2] = s01
                Gs[3] = s11
                PU[0] = p00
                PU[1] = p01
                PU[2] = p10
                PU[3] = p11
            else:
                for l in range(ell):
                    Ml = Mbase + k * k * l
                    Wl = Wbase + k * m * l
                    ul = u + l * k
                    _form_A(T, Ml, TM, A, k)
                    _ldl(A, k)                            # positive pivots: update() checked them
                    for i in range(k):
                        acc = Wl[i * m + p]
                        for j in range(p):
                            acc -= Wl[i * m + j] * bp[j]
                        r[i] = acc
                    for i in range(k):                    # û_l = A_l⁻¹ Tᵀ r
                        acc = 0.0
                        for a in range(i, k):
                            acc += T[a * k + i] * r[a]
                        ul[i] = acc
                    _solve_ldl(A, ul, k, 1)
                    if not want_gradient:
                        continue
                    for i in range(k):                    # ρ_l = r − M_l T û_l; Σ ρ_l û_lᵀ
                        acc = 0.0
                        for a in range(k):
                            for c in range(a + 1):        # (T û)_a = Σ_{c ≤ a} T[a, c] û_c
                                acc += Ml[i * k + a] * T[a * k + c] * ul[c]
                        acc = r[i] - acc
                        for c in range(k):
                            PU[i * k + c] += acc * ul[c]
                    for i in range(k * k):                # Σ A_l⁻¹: the identity's columns solved
                        Ainv[i] = 0.0
                    for i in range(k):
                        Ainv[i * k + i] = 1.0
                    _solve_ldl(A, Ainv, k, k)
                    for i in range(k * k):
                        Gs[i] += Ainv[i]
                    if do_h:
                        for i in range(k):                # rows h of (Tᵀ W_l,X): h R_X = g
                            for c in range(p):
                                acc = 0.0
                                for a in range(i, k):
                                    acc += T[a * k + i] * Wl[a * m + c]
                                for j in range(c):
                                    acc -= H[i * p + j] * R[c * m + j]
                                H[i * p + c] = acc / R[c * m + c]
                        _solve_ldl(A, H, k, p)
                        for i in range(k):
                            for j in range(k):
                                acc = 0.0
                                for c in range(p):
                                    acc += H[i * p + c] * H[j * p + c]
                                Gs[i * k + j] += acc
        return beta_arr, u_arr, (PU_arr if want_gradient else None), (Gsum_arr if want_gradient else None)

    def solve_L(self, const double[:, ::1] rhs):
        """L_θ⁻¹ rhs for a (ℓ·k) × c ``rhs`` at the last update, L_θ = blockdiag_l(L_l D_l^½) the
        Cholesky factor of A + I (P = I): per level a unit forward solve, then a division by √d."""
        if not self.updated:
            raise RuntimeError("BlockDiagPLS.solve_L before update")
        cdef Py_ssize_t k = self.k, ell = self.nlevels, c = rhs.shape[1], i, s, j, l
        out_arr = np.array(rhs, dtype=np.float64, order="C", copy=True)
        cdef double[:, ::1] out = out_arr
        cdef double *T = &self.T[0, 0]
        cdef double *sc = &self.scratch[0]
        cdef double *TM = sc
        cdef double *A = sc + k * k
        cdef double *x
        cdef double sq
        with nogil:
            for l in range(ell):
                _form_A(T, &self.M[l, 0, 0], TM, A, k)
                _ldl(A, k)
                x = &out[l * k, 0] if c > 0 else NULL
                for j in range(c):
                    for i in range(k):
                        for s in range(i):
                            x[i * c + j] -= A[i * k + s] * x[s * c + j]
                for i in range(k):
                    sq = sqrt(A[i * k + i])
                    for j in range(c):
                        x[i * c + j] /= sq
        return out_arr

    def inverse_blocks(self):
        """The diagonal blocks A_l⁻¹ of (ΛᵀZᵀWZΛ + I)⁻¹ at the last update, (ℓ, k, k)."""
        if not self.updated:
            raise RuntimeError("BlockDiagPLS.inverse_blocks before update")
        cdef Py_ssize_t k = self.k, ell = self.nlevels, i, l
        out_arr = np.zeros((ell, k, k))
        cdef double[:, :, ::1] out = out_arr
        cdef double *T = &self.T[0, 0]
        cdef double *sc = &self.scratch[0]
        cdef double *TM = sc
        cdef double *A = sc + k * k
        with nogil:
            for l in range(ell):
                _form_A(T, &self.M[l, 0, 0], TM, A, k)
                _ldl(A, k)
                for i in range(k):
                    out[l, i, i] = 1.0
                _solve_ldl(A, &out[l, 0, 0], k, k)
        return out_arr
