"""A cheap Hessian of the profiled criterion: the average-information (AI) matrix in θ.

With V₀ = W⁻¹ + ZΛΛᵀZᵀ, P₀ = V₀⁻¹ − V₀⁻¹X(XᵀV₀⁻¹X)⁻¹XᵀV₀⁻¹ (β̂ is profiled in either fit),
r² = yᵀP₀y and d = n − p (REML) or n (ML), the profiled criterion is
f(θ) = log|V₀| [+ log|XᵀV₀⁻¹X| for REML] + d log r² + const.  With D_i = ∂V₀/∂θ_i =
Z (∂ΛΛᵀ/∂θ_i) Zᵀ, and Q = P₀ for REML, V₀⁻¹ for ML (the log-determinants' derivatives),

    ∂²f/∂θ_i∂θ_j = −tr(QD_iQD_j) + 2d·yᵀP₀D_iP₀D_jP₀y / r² − d·q_i q_j / r⁴ + c_ij,
    q_i = yᵀP₀D_iP₀y,   c_ij = tr(QD_ij) − d·yᵀP₀D_ijP₀y / r²  (D_ij = ∂²V₀/∂θ_i∂θ_j).

The trace has (for Q = P₀) the quadratic form's expectation (E yᵀP₀D_iP₀D_jP₀y = σ² tr(P₀D_iP₀D_j), r² ≈ dσ²);
replacing one by the other (Gilmour, Thompson & Cullis 1995) leaves

    H_AI = (d / r²) Wᵀ (P₀ − P₀yyᵀP₀ / yᵀP₀y) W,   W = [D_1P₀y … D_mP₀y],

positive semi-definite and free of traces.  P₀y is the residual e = y − Xβ̂ − Zb̂, so
D_iP₀y = Z v_i with v_i = (∂ΛΛᵀ/∂θ_i) ρ, ρ = ZᵀWe (the gradient's ρ), and every product comes
from the cross-products and the factor: (Z v)ᵀ(Z v') = vᵀMv', and WᵀP₀W is the penalised RSS form
of the "responses" Z v_i: (Z v)ᵀP₀(Z v') = vᵀMv' − z_vᵀz_v' − x_vᵀx_v', with
z_v = L⁻¹ΛᵀM v and x_v = R_X⁻ᵀ(XᵀZ v − R_ZXᵀ z_v).  Cost: one solve with L per θ component and
per fixed effect, small beside one factorization.  For ML (Q = V₀⁻¹) the same P₀ form is used:
it differs from tr(V₀⁻¹D_iV₀⁻¹D_j) by O(p/n) relative, and the residual's covariance is σ²P₀ in
either fit.

c_ij is the criterion's first derivative in the direction ∂²ΛΛᵀ/∂θ_i∂θ_j, which vanishes at an
interior optimum; it is added exactly (:func:`gradient_term`) from g: per term, with G the
symmetric k × k derivative of f in Σ = TTᵀ (g(T_rc) = 2(GT)_rc),
c(T_rc, T_r'c') = 2 G_rr' when c = c' (else 0); a scalar term's is g/θ.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from ._crossprod import full_ZtWZ
from ._exceptions import FastLMMError
from ._params import tri_indices

__all__ = ["ai_hessian", "gradient_term", "model_hessian"]


def _directions(s, theta: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """V[:, i] = (∂ΛΛᵀ/∂θ_i) ρ (q × m): for θ_i = T_rc of a term, per level a,
    (E_rc Tᵀ + T E_cr) ρ_a = e_r (T[:, c]·ρ_a) + T[:, c] ρ_a[r]."""
    V = np.zeros((s.q, theta.size))
    for t in s.terms:
        T = t.T(theta)
        R = rho[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k)
        for j, (r, c) in enumerate(zip(*tri_indices(t.k))):
            va = np.outer(R[:, r], T[:, c])
            va[:, r] += R @ T[:, c]
            V[t.col_offset:t.col_offset + t.q, t.theta_offset + j] = va.ravel()
    return V


def ai_hessian(s, backend, theta: np.ndarray, reml: bool, M: sp.csr_matrix | None = None) -> np.ndarray:
    """H_AI at θ (module docstring), from ``backend``'s factor at θ (``state`` and ``solve_L``)
    and its cross-products; ``M``: their ZᵀWZ with both triangles, if already formed."""
    theta = np.asarray(theta, dtype=float)
    cp = backend.crossprod
    p = s.p
    M = full_ZtWZ(cp, s) if M is None else M
    st = backend.state(theta)
    b = st.b
    beta = st.beta - cp.beta_shift                      # on the cross-products' shifted response
    rho = cp.ZtXy[:, p] - cp.ZtXy[:, :p] @ beta - M @ b
    V = _directions(s, theta, rho)
    q = rho @ V
    MV = M @ V
    m = theta.size
    # one solve for both: L⁻¹Λᵀ[M V, ZᵀWX] = [z_v, R_ZX]
    zr = backend.solve_L(theta, s.Lambda_dot(theta, np.hstack([MV, cp.ZtXy[:, :p]]), transpose=True))
    z = zr[:, :m]
    PW = V.T @ MV - z.T @ z
    if p:
        x = la.solve_triangular(st.RX, cp.ZtXy[:, :p].T @ V - zr[:, m:].T @ z, trans="T", lower=False)
        PW -= x.T @ x
    r2 = st.pwrss
    d = s.n - p if reml else s.n
    H = (d / r2) * (PW - np.outer(q, q) / r2)
    return 0.5 * (H + H.T)


def gradient_term(s, theta: np.ndarray, g: np.ndarray) -> np.ndarray:
    """c_ij of the module docstring from the gradient g at θ (0 for a term with a singular T,
    whose G is not determined by g)."""
    theta = np.asarray(theta, dtype=float)
    C = np.zeros((theta.size, theta.size))
    for t in s.terms:
        k, o = t.k, t.theta_offset
        gt = g[o:o + t.ntheta]
        T = t.T(theta)
        if not np.all(np.diag(T) > 0) or not np.all(np.isfinite(gt)):
            continue
        rows, cols = tri_indices(k)
        # the linear map from G's lower triangle to the lower triangle of 2 G T
        A = np.empty((t.ntheta, t.ntheta))
        for j, (a, b) in enumerate(zip(rows, cols)):
            E = np.zeros((k, k))
            E[a, b] = E[b, a] = 1.0
            A[:, j] = (2.0 * E @ T)[rows, cols]
        Gl = np.linalg.solve(A, gt)
        G = np.zeros((k, k))
        G[rows, cols] = Gl
        G[cols, rows] = Gl
        for i, (r, c) in enumerate(zip(rows, cols)):
            for j, (r2, c2) in enumerate(zip(rows, cols)):
                if c == c2:
                    C[o + i, o + j] = 2.0 * G[r, r2]
    return C


def model_hessian(s, backend, reml: bool):
    """(θ, g) → a positive-definite Hessian model for ``_bfgs.minimize_bfgs``: H_AI + c (H_AI
    alone where the sum is not positive definite), a direction of no curvature (a variance on
    its bound, whose column of W is 0) given the largest curvature; None where neither is
    positive definite or the solves fail (the optimiser then updates its last matrix by BFGS).
    None for a backend without cross-products (the dense reference path) or one that declares
    ``hessian_model = False`` (the single-term path, whose own evaluations cost less)."""
    if (getattr(backend, "crossprod", None) is None or not hasattr(backend, "solve_L")
            or not getattr(backend, "hessian_model", True)):
        return None
    # the compiled backend keeps one for its gradient; the others' pieces are not this matrix
    own = getattr(backend, "full_ZtWZ", None)
    M = own() if own is not None else full_ZtWZ(backend.crossprod, s)

    def hess(theta: np.ndarray, g: np.ndarray) -> np.ndarray | None:
        try:
            H = ai_hessian(s, backend, theta, reml, M)
        except (FastLMMError, np.linalg.LinAlgError, ArithmeticError):   # e.g. a singular R_X
            return None
        if not np.all(np.isfinite(H)):
            return None
        top = float(np.max(np.diag(H), initial=0.0))
        if top <= 0:
            return None
        flat = np.diag(H) <= 1e-10 * top
        H[flat, :] = 0.0
        H[:, flat] = 0.0
        H[flat, flat] = top
        # the exact c where H_AI + c is positive definite, else H_AI (the sum is indefinite in a
        # saddle region, where the step along H_AI alone descends); else no model here
        for C in (H + gradient_term(s, theta, g), H):
            try:
                np.linalg.cholesky(C)
                return C
            except np.linalg.LinAlgError:
                continue
        return None
    return hess
