"""Blocked evaluation of the profiled criterion *and its gradient* (MixedModels.jl's layout).

Applies when every random-effects term after the first is scalar, so that

    A + I = [ T₁ᵀ M₁₁ T₁ + I     ·   ]      M = ZᵀWZ,  T₁ = I_ℓ ⊗ T (first term, block diagonal),
            [ Λ₂ M₂₁ T₁       Λ₂ M₂₂ Λ₂ + I ]     Λ₂ = diag(λ) (later scalar terms)

The first block stays block diagonal in the factor (L₁₁ = per-level k×k Cholesky factors);
the fill goes to the dense Schur complement  S₂₂ = Λ₂M₂₂Λ₂ + I − L₂₁L₂₁ᵀ  (q₂ × q₂,
factored by LAPACK).  [X y] is appended as a last block, so r² and R_X are read off the
(p+1)×(p+1) Schur complement, as in lme4's PLS equations.

Gradient of the profiled criterion f(θ) (REML: d = n − p, ML: d = n):
    f = log|Ω_θ| + d log r²(θ) + const,  Ω_θ = [[A+I, ΛᵀZᵀWX], [·, XᵀWX]] (REML) or A+I (ML).
  * log-determinant: with Ω⁻¹ᵢᵢ the diagonal blocks of the random-effects part of Ω⁻¹,
        ∂ log|Ω| / ∂θ_k = 2 tr((I − Ω⁻¹_{uu}) Λ⁻¹ ∂Λ/∂θ_k),
    which needs only the per-level diagonal blocks of Ω⁻¹_{uu}; for a scalar term with
    λ_j > 0 it is (2/λ_j)(ℓ_j − Σ diag), and 0 at λ_j = 0 (f is even in λ_j).
        Ω⁻¹_{uu} = (A+I)⁻¹ + H Hᵀ,  H = L⁻ᵀ R_ZX R_X⁻¹  (the second term for REML only).
  * penalised RSS (envelope theorem, β̂ and û optimal):
        ∂r²/∂θ_k = −2 ρᵀ (∂Λ/∂θ_k) û,   ρ = ZᵀW(y − Xβ̂) − M Λ û.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from ._crossprod import CrossProducts, level_blocks
from ._design import ModelStructure
from ._exceptions import NotPositiveDefiniteError
from ._gradient import fd_fallback, theta_gradient
from ._gram import gram_inner, gram_inner_sym, gram_lower_update
from ._params import T_from_theta
from ._pls import PLSState, profiled_criterion, residual_df
from ._threads import bundled_blas_all_threads

__all__ = ["BlockedBackend", "blocked_applicable"]


def blocked_applicable(s: ModelStructure, max_q2: int = 6000) -> bool:
    """The blocked path needs scalar terms after the first and a dense block that fits."""
    return all(t.k == 1 for t in s.terms[1:]) and (s.q - (s.terms[0].q if s.terms else 0)) <= max_q2


class BlockedBackend:
    """Criterion and analytic gradient on the two-block layout (see module docstring); the
    members of ``_backends.Backend``."""
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
        self.M21 = Mlow[q1:, :q1].tocsr()                                     # q₂ × q₁
        self.M21.sort_indices()
        D = Mlow[q1:, q1:].toarray()
        self.M22 = np.asfortranarray(np.tril(D) + np.tril(D, -1).T)
        # L₂₁ keeps M₂₁'s pattern for every θ: its CSC twin (for the Gram kernel) is a fixed
        # permutation of the CSR values.
        M = self.M21
        order = sp.csr_matrix((np.arange(M.nnz, dtype=np.float64) + 1.0, M.indices, M.indptr), shape=M.shape).tocsc()
        order.sort_indices()
        self._rp, self._ri = M.indptr.astype(np.int32), M.indices.astype(np.int32)
        self._cp, self._ci = order.indptr.astype(np.int32), order.indices.astype(np.int32)
        self._perm = (order.data - 1.0).astype(np.intp)
        self.W1 = cp.ZtXy[:q1]                                                # q₁ × (p+1)
        self.W2 = cp.ZtXy[q1:]
        self.WtW = cp.XyXy
        # θ layout: first term's lower triangle, then one λ per later term.
        self.nth1 = t1.ntheta
        self.lam_index = np.concatenate([np.full(t.q, i, dtype=np.intp) for i, t in enumerate(s.terms[1:])]) \
            if self.q2 else np.zeros(0, dtype=np.intp)
        self._cache_theta = None

    def __getstate__(self) -> dict:
        # The blocks above (M₂₂ is dense q₂ × q₂) and the factor cache are rebuilt on load.
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
        G = np.linalg.solve(L11, np.broadcast_to(T.T, (self.l1, k, k))).transpose(0, 2, 1)
        c1 = np.linalg.solve(L11, np.einsum("ji,ajm->aim", T, self.W1.reshape(self.l1, k, p + 1)))
        c1 = c1.reshape(self.q1, p + 1)                                       # L₁₁⁻¹ T₁ᵀ W₁
        ldL2 = 2.0 * np.sum(np.log(np.einsum("aii->ai", L11)))
        out = {"theta": theta.copy(), "T": T, "lam": lam, "L11": L11, "G": G, "c1": c1}
        if self.q2:
            L21 = self._L21(lam, G)
            S22 = np.multiply(self.M22, np.multiply.outer(lam, lam), order="F")
            S22[np.diag_indices_from(S22)] += 1.0
            # S₂₂ −= L₂₁L₂₁ᵀ on the lower triangle (the only one LAPACK reads), column by column
            gram_lower_update(S22, self._rp, self._ri, L21.data, self._cp, self._ci, L21.data[self._perm],
                              np.ones(L21.shape[1]), -1.0)
            try:
                with bundled_blas_all_threads():
                    L22 = la.cholesky(S22, lower=True, overwrite_a=True, check_finite=False)
            except la.LinAlgError as e:
                raise NotPositiveDefiniteError("blocked: Schur complement not positive definite", theta) from e
            c2 = la.solve_triangular(L22, lam[:, None] * self.W2 - L21 @ c1, lower=True, check_finite=False)
            ldL2 += 2.0 * np.sum(np.log(np.diag(L22)))
            out.update(L21=L21, L22=L22, c2=c2)
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
        p, k = self.p, self.k
        R = f["R"]
        beta = la.solve_triangular(R[:p, :p], R[p, :p], lower=True, trans="T") if p else np.zeros(0)
        if self.q2:
            u2 = la.solve_triangular(f["L22"], f["c2"][:, p] - f["c2"][:, :p] @ beta, lower=True, trans="T")
            r1 = f["c1"][:, p] - f["c1"][:, :p] @ beta - f["L21"].T @ u2
        else:
            u2 = np.zeros(0)
            r1 = f["c1"][:, p] - f["c1"][:, :p] @ beta
        u1 = np.linalg.solve(np.transpose(f["L11"], (0, 2, 1)), r1.reshape(self.l1, k, 1))[..., 0].ravel()
        return beta, u1, u2

    def _Linv_t(self, f, B1, B2):
        """L⁻ᵀ [B1; B2] for the blocked lower-triangular factor."""
        if self.q2:
            x2 = la.solve_triangular(f["L22"], B2, lower=True, trans="T")
            B1 = B1 - f["L21"].T @ x2
        else:
            x2 = B2
        m = B1.shape[1]
        x1 = np.linalg.solve(np.transpose(f["L11"], (0, 2, 1)), B1.reshape(self.l1, self.k, m)).reshape(self.q1, m)
        return x1, x2

    def inverse_diag_blocks(self, f):
        """Diagonal blocks of (A+I)⁻¹ (lme4's condVar uses these): (ℓ₁,k,k) for the first term
        and the diagonal (q₂) for the rest."""
        k = self.k
        L11inv = np.linalg.inv(f["L11"]) if k > 1 else 1.0 / f["L11"]         # tiny k×k blocks
        D1 = np.einsum("aji,ajk->aik", L11inv, L11inv)                          # (L₁₁⁻ᵀL₁₁⁻¹)ₐ
        if self.q2:
            L22inv = la.solve_triangular(f["L22"], np.eye(self.q2), lower=True, check_finite=False)
            d2 = np.einsum("ij,ij->j", L22inv, L22inv)
            # V = L₂₂⁻¹ L₂₁ L₁₁⁻¹ (q₂ × q₁); its column blocks add VₐᵀVₐ to block a
            W = np.asarray(f["L21"].T @ L22inv.T).T.reshape(self.q2, self.l1, k)  # L₂₂⁻¹L₂₁

            V = np.einsum("qaj,aji->qai", W, L11inv)
            D1 = D1 + np.einsum("qai,qaj->aij", V, V)
        else:
            d2 = np.zeros(0)
        return D1, d2

    def _summed_inverse_blocks(self, f, reml: bool):
        """Σₐ of the first term's diagonal blocks of Ω⁻¹_{uu} (k×k) and the diagonal for the
        later terms (q₂), without forming the per-level blocks:
            Σₐ (VᵀV)ₐ[i, j] = ⟨S₂₂⁻¹, B_j B_iᵀ⟩,  B_i = columns i of L₂₁ L₁₁⁻¹ (q₂ × ℓ₁, sparse),
        with S₂₂⁻¹ from LAPACK's dpotri on L₂₂."""
        k = self.k
        L11inv = np.linalg.inv(f["L11"]) if k > 1 else 1.0 / f["L11"]
        S1 = np.einsum("aji,ajk->ik", L11inv, L11inv)                           # Σₐ L₁₁ₐ⁻ᵀL₁₁ₐ⁻¹
        if self.q2:
            # dpotri leaves (L₂₂L₂₂ᵀ)⁻¹ in the lower triangle; the Gram kernel wants it whole.
            with bundled_blas_all_threads():
                Sinv, info = la.lapack.dpotri(f["L22"], lower=1)
            if info != 0:
                raise NotPositiveDefiniteError("blocked: dpotri failed", f["theta"])
            d2 = np.diag(Sinv).copy()
            L21 = f["L21"]
            if k == 1:
                # Σₐ L₁₁ₐ⁻² (L₂₁ᵀ S⁻¹ L₂₁)ₐₐ = ⟨S⁻¹, L₂₁ diag(L₁₁⁻²) L₂₁ᵀ⟩, S⁻¹ from its lower triangle
                S1[0, 0] += gram_inner_sym(np.asfortranarray(Sinv), self._rp, self._ri, L21.data, self._cp,
                                           self._ci, L21.data[self._perm], L11inv[:, 0, 0] ** 2)
            else:
                Sinv = np.tril(Sinv)
                Sinv += np.tril(Sinv, -1).T
                Sinv = np.asfortranarray(Sinv)
                # B = L₂₁ (I ⊗ L₁₁⁻¹): column block a times L₁₁ₐ⁻¹ (same pattern, block-closed)
                B = self._split_columns(L21.tocsc(), L11inv)
                ones = np.ones(self.l1)
                for i in range(k):
                    Bi = B[i].tocsr()
                    for j in range(i, k):
                        Bj = B[j].tocsc()
                        Bj.sort_indices()
                        # ⟨S⁻¹, B_j B_iᵀ⟩ = ⟨S⁻¹, B_i B_jᵀ⟩ (S⁻¹ symmetric)
                        v = gram_inner(Sinv, Bj.indptr.astype(np.int32), Bj.indices.astype(np.int32), Bj.data,
                                       Bi.indptr.astype(np.int32), Bi.indices.astype(np.int32), Bi.data, ones)
                        S1[i, j] += v
                        if i != j:
                            S1[j, i] += v
        else:
            d2 = np.zeros(0)
        if reml and self.p:
            p = self.p
            Lx = f["R"][:p, :p]
            RZX1 = la.solve_triangular(Lx, f["c1"][:, :p].T, lower=True).T
            RZX2 = la.solve_triangular(Lx, f["c2"][:, :p].T, lower=True).T if self.q2 else np.zeros((0, p))
            H1, H2 = self._Linv_t(f, RZX1, RZX2)
            H1 = H1.reshape(self.l1, k, p)
            S1 = S1 + np.einsum("aim,ajm->ij", H1, H1)
            d2 = d2 + np.einsum("im,im->i", H2, H2)
        return S1, d2

    def _split_columns(self, L21: sp.csc_matrix, L11inv: np.ndarray) -> list:
        """Column i of each level block of L₂₁(I ⊗ L₁₁⁻¹) as a q₂ × ℓ₁ sparse matrix, i < k."""
        k = self.k
        out = []
        for i in range(k):
            # column (a, i) of the product = Σ_j L₂₁[:, (a, j)] L₁₁ₐ⁻¹[j, i]; all share a's pattern
            acc = None
            for j in range(k):
                Cj = L21[:, j::k]
                term = Cj @ sp.diags(L11inv[:, j, i])
                acc = term if acc is None else acc + term
            out.append(acc.tocsc())
        return out

    def gradient(self, theta: np.ndarray, reml: bool) -> np.ndarray:
        """∂f/∂θ (see module docstring)."""
        theta = np.asarray(theta, dtype=float)
        f = self._factor(theta)
        p, k = self.p, self.k
        d = residual_df(self.s.n, p, reml)
        beta, u1, u2 = self._modes(f)
        T, lam = f["T"], f["lam"]
        # ρ = Zᵀ W (ỹ − Xβ̂) − M Λ û  (cross-products only)
        b1 = np.einsum("ij,aj->ai", T, u1.reshape(self.l1, k)).ravel()
        b2 = lam * u2
        rho1 = self.W1[:, p] - self.W1[:, :p] @ beta - np.einsum("aij,aj->ai", self.M11, b1.reshape(self.l1, k)).ravel()
        if self.q2:
            rho1 = rho1 - self.M21.T @ b2
            rho2 = self.W2[:, p] - self.W2[:, :p] @ beta - self.M21 @ b1 - self.M22 @ b2
        else:
            rho2 = np.zeros(0)
        S1, d2 = self._summed_inverse_blocks(f, reml)
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
                        b=self.s.Lambda(np.asarray(theta, dtype=float)) @ u, pwrss=f["pwrss"],
                        ldL2=f["ldL2"], ldRX2=f["ldRX2"], RX=f["R"][:p, :p].T.copy())

    def inverse_blocks(self, theta: np.ndarray, term_index: int) -> np.ndarray:
        f = self._factor(np.asarray(theta, dtype=float))
        D1, d2 = self.inverse_diag_blocks(f)
        if term_index == 0:
            return D1
        t = self.s.terms[term_index]
        return d2[t.col_offset - self.q1:t.col_offset - self.q1 + t.q].reshape(-1, 1, 1)
