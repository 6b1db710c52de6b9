"""Blocked evaluation of the profiled criterion *and its gradient* (MixedModels.jl's layout).

Applies when every random-effects term after the first is scalar, so that

    A + I = [ T₁ᵀ M₁₁ T₁ + I     ·   ]      M = ZᵀWZ,  T₁ = I_ℓ ⊗ T (first term, block diagonal),
            [ Λ₂ M₂₁ T₁       Λ₂ M₂₂ Λ₂ + I ]     Λ₂ = diag(λ) (later scalar terms)

The first block stays block diagonal in the factor (L₁₁ = per-level k×k Cholesky factors);
the fill goes to the dense Schur complement  S₂₂ = Λ₂M₂₂Λ₂ + I − L₂₁L₂₁ᵀ  (q₂ × q₂,
factored by ``_dense.cholesky_lower``).  [X y] is appended as a last block, so r² and R_X are read off the
(p+1)×(p+1) Schur complement, as in lme4's PLS equations.

Gradient of the profiled criterion f(θ) (REML: d = n − p, ML: d = n):
    f = log|Ω_θ| + d log r²(θ) + const,  Ω_θ = [[A+I, ΛᵀZᵀWX], [·, XᵀWX]] (REML) or A+I (ML).
  * log-determinant: with Ω⁻¹ᵢᵢ the diagonal blocks of the random-effects part of Ω⁻¹,
        ∂ log|Ω| / ∂θ_k = 2 tr((I − Ω⁻¹_{uu}) Λ⁻¹ ∂Λ/∂θ_k),
    which needs only the per-level diagonal blocks of Ω⁻¹_{uu}; for a scalar term with
    λ_j > 0 it is (2/λ_j)(ℓ_j − Σ diag), and 0 at λ_j = 0 (f is even in λ_j).
        Ω⁻¹_{uu} = (A+I)⁻¹ + H Hᵀ,  H = L⁻ᵀ R_ZX R_X⁻¹  (the second term for REML only).
    The diagonal blocks of (A+I)⁻¹ are, with W = L₂₂⁻¹ L₂₁ (q₂ × q₁) and its column block W_a,
        first term, level a:  L₁₁ₐ⁻ᵀ (I + W_aᵀW_a) L₁₁ₐ⁻¹;   later terms:  diag(S₂₂⁻¹),
    both read off L₂₂⁻¹ (``_dense.invert_lower``, q₂³/3 flops) by ``_gram.inverse_gram``: S₂₂⁻¹
    itself (LAPACK's dpotri, twice the flops) is never formed (at one thread dpotri alone took as
    long as dtrtri and inverse_gram together, on crossed200k 140 ms against 141, InstEval 30 against 28).
    W's cost is Σ (q₂ − r) over the entries (r, ·) of L₂₁ (L₂₂⁻¹ is lower triangular), so the
    later levels are held in ascending order of their entries in L₂₁ (the busiest last; S₂₂'s
    order is free, its factor is dense): on InstEval's and Zipf-like designs that halves W's work.
  * penalised RSS (envelope theorem, β̂ and û optimal):
        ∂r²/∂θ_k = −2 ρᵀ (∂Λ/∂θ_k) û,   ρ = ZᵀW(y − Xβ̂) − M Λ û.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from ._crossprod import CrossProducts, level_blocks
from ._dense import cholesky_lower, invert_lower
from ._design import ModelStructure
from ._exceptions import NotPositiveDefiniteError
from ._gradient import fd_fallback, theta_gradient
from ._gram import inverse_gram, schur_lower
from ._params import T_from_theta
from ._pls import PLSState, profiled_criterion, residual_df
from ._threads import bundled_blas_all_threads

__all__ = ["BlockedBackend", "blocked_applicable"]


def level_solve(L11: np.ndarray, B: np.ndarray, trans: bool = False) -> np.ndarray:
    """L₁₁ₐ⁻¹ Bₐ (or L₁₁ₐ⁻ᵀ Bₐ) for every first-term level a: L11 is ℓ₁ × k × k, B is ℓ₁ × k × m.
    1 × 1 blocks by division: NumPy's batched solve costs about 100× as much there."""
    if L11.shape[1] == 1:
        return B / L11
    return np.linalg.solve(np.transpose(L11, (0, 2, 1)) if trans else L11, B)


def blocked_applicable(s: ModelStructure, max_q2: int = 6000) -> bool:
    """The blocked path needs scalar terms after the first and a dense block that fits."""
    return all(t.k == 1 for t in s.terms[1:]) and (s.q - (s.terms[0].q if s.terms else 0)) <= max_q2


class BlockedBackend:
    """Criterion and analytic gradient on the two-block layout (see module docstring); the
    members of ``_backends.Backend``.  It keeps q₂ × q₂ work arrays across θ's, so, like the
    compiled kernel, one instance is not shared between threads (``_parallel`` gives each its copy)."""
    name = "blocked"
    has_gradient = True
    ordering = None

    def __init__(self, s: ModelStructure, crossprod: CrossProducts | None = None):
        if not s.terms or not blocked_applicable(s):
            # a ValueError, as it always was (benchmarks/tests/test_eval_counts.py reads the type's name)
            raise ValueError("backend 'blocked' needs scalar terms after the first and a small second block")
        self.s = s
        cp = crossprod if crossprod is not None else CrossProducts.from_structure(s)
        self.crossprod = cp
        t1 = s.terms[0]
        self.k, self.l1, self.q1 = t1.k, t1.nlevels, t1.q
        self.q2 = s.q - self.q1
        self.p = s.p
        Mlow = sp.csc_matrix((cp.Mx, cp.Ai, cp.Ap), shape=(s.q, s.q))
        k, q1 = self.k, self.q1
        self.M11 = level_blocks(cp, t1)                                        # [a, i, j]
        M21 = Mlow[q1:, :q1].tocsr()
        # the later levels in ascending order of their entries in M₂₁ (module docstring): every
        # q₂-indexed array below is in this order; level2[i] is the model's index of row i
        self.level2 = np.argsort(np.diff(M21.indptr), kind="stable")
        self.M21 = M21[self.level2]                                           # q₂ × q₁
        self.M21.sort_indices()
        # M₂₂ stays sparse: its lower triangle (CSC) for the Schur kernel, the whole for products
        # (scalar later terms: each level block is 1 × 1, so the lower storage is the triangle).
        M22 = sp.tril(Mlow[q1:, q1:])
        M22 = (M22 + sp.tril(M22, -1).T).tocsr()[self.level2][:, self.level2]
        M22l = sp.tril(M22).tocsc()
        M22l.sort_indices()
        self._m22 = (M22l.indptr.astype(np.int32), M22l.indices.astype(np.int32), M22l.data)
        self.M22 = M22.tocsr()
        # L₂₁ keeps M₂₁'s pattern for every θ: its CSC twin (for the Gram kernel) is a fixed
        # permutation of the CSR values.
        M = self.M21
        order = sp.csr_matrix((np.arange(M.nnz, dtype=np.float64) + 1.0, M.indices, M.indptr), shape=M.shape).tocsc()
        order.sort_indices()
        self._rp, self._ri = M.indptr.astype(np.int32), M.indices.astype(np.int32)
        self._cp, self._ci = order.indptr.astype(np.int32), order.indices.astype(np.int32)
        self._perm = (order.data - 1.0).astype(np.intp)
        self.W1 = cp.ZtXy[:q1]                                                # q₁ × (p+1)
        self.W2 = cp.ZtXy[q1:][self.level2]
        self.WtW = cp.XyXy
        # θ layout: first term's lower triangle, then one λ per later term.
        self.nth1 = t1.ntheta
        self.lam_index = np.concatenate([np.full(t.q, i, dtype=np.intp) for i, t in enumerate(s.terms[1:])])[
            self.level2] if self.q2 else np.zeros(0, dtype=np.intp)
        self._cache_theta = None
        # q₂ × q₂ work arrays, reused by every θ (a fresh 32 MB array costs its page faults):
        # the Schur complement, factored in place (it is the cached L₂₂), and L₂₂⁻¹.
        self._S22 = None
        self._Linv = None

    def __getstate__(self) -> dict:
        # The blocks above, the q₂ × q₂ work arrays and the factor cache are rebuilt on load.
        return {"s": self.s, "crossprod": self.crossprod}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["s"], crossprod=state["crossprod"])

    @property
    def sum_log_w(self) -> float:
        return self.crossprod.sum_log_w

    def with_response(self, s: ModelStructure, crossprod: CrossProducts | None) -> BlockedBackend:
        """A backend for another response on the same design, rebuilt from its cross-products
        (ZᵀWZ is not recomputed; the blocks above are O(nnz) rearrangements)."""
        return BlockedBackend(s, crossprod=crossprod)

    # ------------------------------------------------------------------ factorization
    def _factor(self, theta: np.ndarray) -> dict:
        theta = np.asarray(theta, dtype=float)
        if self._cache_theta is not None and np.array_equal(theta, self._cache_theta):
            return self._cache
        k, p = self.k, self.p
        T = T_from_theta(theta[:self.nth1], k)
        lam = theta[self.nth1:][self.lam_index] if self.q2 else np.zeros(0)
        # L₁₁: per level, chol(Tᵀ M₁₁ₐ T + I)
        A11 = np.einsum("ji,ajk,kl->ail", T, self.M11, T) + np.eye(k)
        try:
            L11 = np.linalg.cholesky(A11)
        except np.linalg.LinAlgError as e:
            raise NotPositiveDefiniteError("blocked: first-term block not positive definite", theta) from e
        # G_a = T L₁₁ₐ⁻ᵀ so that L₂₁ = Λ₂ M₂₁ (I ⊗ G)
        G = level_solve(L11, np.broadcast_to(T.T, (self.l1, k, k))).transpose(0, 2, 1)
        T1W1 = T[0, 0] * self.W1 if k == 1 else np.einsum("ji,ajm->aim", T, self.W1.reshape(self.l1, k, p + 1))
        c1 = level_solve(L11, T1W1.reshape(self.l1, k, p + 1)).reshape(self.q1, p + 1)  # L₁₁⁻¹ T₁ᵀ W₁
        ldL2 = 2.0 * np.sum(np.log(np.einsum("aii->ai", L11)))
        out = {"theta": theta.copy(), "T": T, "lam": lam, "L11": L11, "G": G, "c1": c1}
        if self.q2:
            L21 = self._L21(lam, G)
            L21c = L21.data[self._perm]                                       # its CSC values
            if self._S22 is None:
                self._S22 = np.empty((self.q2, self.q2), order="F")
            # the work array holds the cached L₂₂: drop the cache before overwriting it
            self._cache_theta, self._cache = None, None
            S22 = self._S22
            # lower triangle of S₂₂ = Λ₂M₂₂Λ₂ + I − L₂₁L₂₁ᵀ (the only one the factor reads), one pass
            schur_lower(S22, lam, *self._m22, self._rp, self._ri, self._cp, self._ci, L21c)
            with bundled_blas_all_threads():
                info = cholesky_lower(S22)
            L22 = S22
            if info != 0:
                raise NotPositiveDefiniteError("blocked: Schur complement not positive definite", theta)
            c2 = la.solve_triangular(L22, lam[:, None] * self.W2 - L21 @ c1, lower=True, check_finite=False)
            ldL2 += 2.0 * np.sum(np.log(np.diag(L22)))
            out.update(L21=L21, L21c=L21c, L22=L22, c2=c2)
            S33 = self.WtW - c1.T @ c1 - c2.T @ c2
        else:
            S33 = self.WtW - c1.T @ c1
        try:
            R = np.linalg.cholesky(S33)
        except np.linalg.LinAlgError as e:
            raise NotPositiveDefiniteError("blocked: fixed-effects block not positive definite", theta) from e
        out.update(R=R, ldL2=ldL2, ldRX2=2.0 * np.sum(np.log(np.diag(R)[:p])), pwrss=R[p, p] ** 2)
        self._cache_theta, self._cache = theta.copy(), out
        return out

    def _L21(self, lam, G):
        """L₂₁ = Λ₂ M₂₁ (I ⊗ G) on M₂₁'s block-closed pattern (sparse q₂ × q₁)."""
        M = self.M21
        k = self.k
        if k == 1:
            return sp.csr_matrix((M.data * lam[np.repeat(np.arange(M.shape[0]), np.diff(M.indptr))]
                                  * G[M.indices, 0, 0], M.indices, M.indptr), shape=M.shape)
        # each stored row segment of a level block holds k consecutive columns
        vals = M.data.reshape(-1, k)
        lev = M.indices[::k] // k
        rows = np.repeat(np.arange(M.shape[0]), np.diff(M.indptr) // k)
        new = np.einsum("ei,eij->ej", vals, G[lev]) * lam[rows][:, None]
        return sp.csr_matrix((new.ravel(), M.indices, M.indptr), shape=M.shape)

    # ------------------------------------------------------------------ criterion, gradient
    def objective(self, theta: np.ndarray, reml: bool) -> float:
        f = self._factor(theta)
        return profiled_criterion(f["ldL2"], f["ldRX2"], f["pwrss"], self.s.n, self.p, reml, self.crossprod.sum_log_w)

    def pls_terms(self, theta: np.ndarray) -> tuple[float, float]:
        f = self._factor(theta)
        return f["ldL2"], f["pwrss"]

    def _modes(self, f):
        """β̂ and the spherical modes û₁, û₂ at the factor ``f``."""
        beta = self._beta(f)
        u1, u2 = self._Linv_t(f, *self._mode_rhs(f, beta))
        return beta, u1[:, 0], self._model_order(u2[:, 0])

    def _model_order(self, x2: np.ndarray) -> np.ndarray:
        """A q₂-vector from the later levels' order here (``level2``) to the model's."""
        out = np.empty_like(x2)
        out[self.level2] = x2
        return out

    def _beta(self, f):
        p = self.p
        R = f["R"]
        return la.solve_triangular(R[:p, :p], R[p, :p], lower=True, trans="T") if p else np.zeros(0)

    def _mode_rhs(self, f, beta):
        """[c_u − R_ZX β̂] split by block (q₁ × 1, q₂ × 1): û = L⁻ᵀ of it."""
        p = self.p
        r1 = (f["c1"][:, p] - f["c1"][:, :p] @ beta)[:, None]
        r2 = (f["c2"][:, p] - f["c2"][:, :p] @ beta)[:, None] if self.q2 else np.zeros((0, 1))
        return r1, r2

    def _Linv_t(self, f, B1, B2):
        """L⁻ᵀ [B1; B2] for the blocked lower-triangular factor."""
        if self.q2:
            x2 = la.solve_triangular(f["L22"], B2, lower=True, trans="T", check_finite=False)
            B1 = B1 - f["L21"].T @ x2
        else:
            x2 = B2
        m = B1.shape[1]
        return level_solve(f["L11"], B1.reshape(self.l1, self.k, m), trans=True).reshape(self.q1, m), x2

    def solve_L(self, theta: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """L⁻¹ P rhs for the blocked factor L = [[L₁₁, 0], [L₂₁, L₂₂]] of P(ΛᵀZᵀWZΛ + I)Pᵀ, P the
        permutation that puts the later levels in this backend's order (``level2``): per
        first-term level x₁ = L₁₁ₐ⁻¹ B₁ₐ, then x₂ = L₂₂⁻¹ ((P B)₂ − L₂₁ x₁)."""
        f = self._factor(np.asarray(theta, dtype=float))
        B = np.asarray(rhs, dtype=float).reshape(self.s.q, -1)
        m = B.shape[1]
        x1 = level_solve(f["L11"], B[:self.q1].reshape(self.l1, self.k, m)).reshape(self.q1, m)
        if not self.q2:
            return x1
        x2 = la.solve_triangular(f["L22"], B[self.q1:][self.level2] - f["L21"] @ x1, lower=True, check_finite=False)
        return np.vstack([x1, x2])

    def _inverse_pieces(self, f):
        """(Y, d2) at the factor ``f`` (see the module docstring): Y[a] = W_aᵀW_a (ℓ₁ × k × k),
        W = L₂₂⁻¹L₂₁, and d2 = diag(S₂₂⁻¹); from L₂₂⁻¹ (``invert_lower`` on a copy of L₂₂, which the
        solves still need; its rows split over the fit's threads), computed once per factor."""
        if "Y" not in f:
            if self.q2:
                if self._Linv is None:
                    self._Linv = np.empty((self.q2, self.q2), order="F")
                np.copyto(self._Linv, f["L22"])
                with bundled_blas_all_threads():
                    info = invert_lower(self._Linv)
                Li = self._Linv
                if info != 0:
                    raise NotPositiveDefiniteError("blocked: L22 is singular", f["theta"])
                # the levels' W_aᵀW_a at one thread: the inverse's (and factor's) OpenBLAS workers keep
                # spinning for ~0.1 s after the call, so OpenMP threads here would share their core
                # (InstEval in a 2-thread fit: 9.3 ms at one thread; 9.4 or 18.5 ms at two, by run)
                f["Y"], f["d2"] = inverse_gram(Li, self._cp, self._ci, f["L21c"], self.k, 1)
            else:
                f["Y"], f["d2"] = np.zeros((self.l1, self.k, self.k)), np.zeros(0)
        return f["Y"], f["d2"]

    def _L11_inverse(self, f):
        """L₁₁ₐ⁻¹ for every level (ℓ₁ × k × k; tiny triangular blocks)."""
        return np.linalg.inv(f["L11"]) if self.k > 1 else 1.0 / f["L11"]

    def inverse_diag_blocks(self, f):
        """Diagonal blocks of (A+I)⁻¹ (lme4's condVar uses these): (ℓ₁,k,k) for the first term,
        L₁₁ₐ⁻ᵀ(I + W_aᵀW_a)L₁₁ₐ⁻¹, and the diagonal of S₂₂⁻¹ (q₂, in the model's order) for the rest."""
        Y, d2 = self._inverse_pieces(f)
        L11inv = self._L11_inverse(f)
        IY = Y + np.eye(self.k)
        return np.einsum("aji,ajl,alm->aim", L11inv, IY, L11inv), self._model_order(d2)

    def _summed_inverse_blocks(self, f, reml: bool, H=None):
        """Σₐ of the first term's diagonal blocks of Ω⁻¹_{uu} (k×k) and the diagonal for the
        later terms (q₂), from the sum of ``inverse_diag_blocks`` plus, for REML, H Hᵀ's
        (``H`` = (H₁, H₂), the two blocks of H = L⁻ᵀ R_ZX R_X⁻¹)."""
        D1, d2 = self.inverse_diag_blocks(f)
        S1 = D1.sum(axis=0)
        if reml and self.p:
            H1, H2 = H
            H1 = H1.reshape(self.l1, self.k, self.p)
            S1 = S1 + np.einsum("aim,ajm->ij", H1, H1)
            d2 = d2 + self._model_order(np.einsum("im,im->i", H2, H2))
        return S1, d2

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        """∂f/∂θ (see module docstring)."""
        theta = np.asarray(theta, dtype=float)
        f = self._factor(theta)
        p, k = self.p, self.k
        d = residual_df(self.s.n, p, reml)
        beta = self._beta(f)
        r1, r2 = self._mode_rhs(f, beta)
        if reml and p:
            # one pass of solves with L for û and for H = L⁻ᵀ R_ZX R_X⁻¹ together
            Lx = f["R"][:p, :p]
            RZX1 = la.solve_triangular(Lx, f["c1"][:, :p].T, lower=True).T
            RZX2 = la.solve_triangular(Lx, f["c2"][:, :p].T, lower=True).T if self.q2 else np.zeros((0, p))
            x1, x2 = self._Linv_t(f, np.hstack([r1, RZX1]), np.hstack([r2, RZX2]))
            u1, u2, H = x1[:, 0], x2[:, 0], (x1[:, 1:], x2[:, 1:])
        else:
            x1, x2 = self._Linv_t(f, r1, r2)
            u1, u2, H = x1[:, 0], x2[:, 0], None
        T, lam = f["T"], f["lam"]
        # ρ = Zᵀ W (ỹ − Xβ̂) − M Λ û  (cross-products only)
        b1 = np.einsum("ij,aj->ai", T, u1.reshape(self.l1, k)).ravel()
        b2 = lam * u2
        rho1 = self.W1[:, p] - self.W1[:, :p] @ beta - np.einsum("aij,aj->ai", self.M11, b1.reshape(self.l1, k)).ravel()
        if self.q2:
            rho1 = rho1 - self.M21.T @ b2
            rho2 = self.W2[:, p] - self.W2[:, :p] @ beta - self.M21 @ b1 - self.M22 @ b2
            rho2, u2 = self._model_order(rho2), self._model_order(u2)
        else:
            rho2 = np.zeros(0)
        S1, d2 = self._summed_inverse_blocks(f, reml, H)
        G = [S1] + [np.array([[d2[t.col_offset - self.q1:t.col_offset - self.q1 + t.q].sum()]])
                    for t in self.s.terms[1:]]
        g = theta_gradient(self.s, theta, G, np.concatenate([rho1, rho2]), np.concatenate([u1, u2]),
                           f["pwrss"], d)
        f0 = profiled_criterion(f["ldL2"], f["ldRX2"], f["pwrss"], self.s.n, p, reml, self.crossprod.sum_log_w)
        return fd_fallback(g, lambda th: self.objective(th, reml), theta, self.s.lower, f0=f0)

    # ------------------------------------------------------------------ state for results
    def state(self, theta: np.ndarray) -> PLSState:
        f = self._factor(np.asarray(theta, dtype=float))
        beta, u1, u2 = self._modes(f)
        u = np.concatenate([u1, u2])
        p = self.p
        return PLSState(theta=np.array(theta, dtype=float), beta=beta + self.crossprod.beta_shift, u=u,
                        b=self.s.Lambda_dot(np.asarray(theta, dtype=float), u), pwrss=f["pwrss"],
                        ldL2=f["ldL2"], ldRX2=f["ldRX2"], RX=f["R"][:p, :p].T.copy())

    def inverse_blocks(self, theta: np.ndarray, term_index: int) -> np.ndarray:
        f = self._factor(np.asarray(theta, dtype=float))
        D1, d2 = self.inverse_diag_blocks(f)
        if term_index == 0:
            return D1
        t = self.s.terms[term_index]
        return d2[t.col_offset - self.q1:t.col_offset - self.q1 + t.q].reshape(-1, 1, 1)
