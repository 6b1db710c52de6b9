"""Analytic gradient of lme4's profiled criterion with respect to θ, shared by the backends.

    f(θ) = log|Ω_θ| − Σ log w + d [1 + log(2π r²(θ)/d)],   d = n − p (REML) or n (ML),
    Ω_θ = [[ΛᵀZᵀWZΛ + I, ΛᵀZᵀWX], [XᵀWZΛ, XᵀWX]] for REML,  Ω_θ = ΛᵀZᵀWZΛ + I for ML.

* log-determinant: writing Ω⁻¹_uu for the random-effects block of Ω⁻¹ and using
  Ω⁻¹ Λ̃ᵀ(·)Λ̃ = I − Ω⁻¹ E (E selects the random effects),
      ∂ log|Ω| / ∂θ_k = 2 tr((I − Ω⁻¹_uu) Λ⁻¹ ∂Λ/∂θ_k).
  Λ = blockdiag(I_ℓ ⊗ T_t), so for θ_k = T_t[r, c] this is 2 [(ℓ_t I − G_t) T_t⁻¹]_{cr}, where
  G_t = Σ_levels of the k×k diagonal blocks of Ω⁻¹_uu on term t:  Ω⁻¹_uu = (A+I)⁻¹ + H Hᵀ,
  H = (A+I)⁻¹ΛᵀZᵀWX R_X⁻¹ (REML only).
* penalised RSS, by the envelope theorem (β̂, û optimal):
      ∂r²/∂θ_k = −2 ρᵀ (∂Λ/∂θ_k) û,   ρ = ZᵀW(y − Xβ̂ − ZΛû) = ZᵀWy − ZᵀWXβ̂ − (ZᵀWZ)Λû,
  i.e. for θ_k = T_t[r, c]:  −2 Σ_levels ρ_{a,r} û_{a,c}.
A scalar term's criterion is even in its θ, so the derivative at θ = 0 is 0; a vector term with
a singular T has no T⁻¹ and its entries are returned as NaN, which :func:`fd_fallback` replaces
by finite differences (central where both sides are feasible, one-sided inwards on a bound).
"""
from __future__ import annotations

import numpy as np

from ._design import ModelStructure
from ._params import tri_indices

__all__ = ["theta_gradient", "term_gradient", "fd_fallback"]


def theta_gradient(s: ModelStructure, theta: np.ndarray, G: list[np.ndarray], rho: np.ndarray,
                   u: np.ndarray, pwrss: float, d: float) -> np.ndarray:
    """∂f/∂θ from the per-term summed inverse blocks ``G`` (k×k each), ρ and û (see module doc)."""
    g = np.empty(theta.size)
    for t, Gt in zip(s.terms, G):
        sl = slice(t.col_offset, t.col_offset + t.q)
        U = u[sl].reshape(t.nlevels, t.k)
        P = rho[sl].reshape(t.nlevels, t.k)
        g[t.theta_offset:t.theta_offset + t.ntheta] = term_gradient(t, theta, Gt, P.T @ U, pwrss, d)
    return g


def term_gradient(t, theta: np.ndarray, Gt: np.ndarray, PU: np.ndarray, pwrss: float, d: float) -> np.ndarray:
    """∂f/∂θ for the θ of term ``t`` from its summed inverse blocks G_t and PU = Σ_levels ρ_a û_aᵀ
    (k×k each; see module doc)."""
    k, nl = t.k, t.nlevels
    drss = -2.0 * PU                                                # [r, c] = ∂r²/∂T_rc
    rows, cols = tri_indices(k)
    T = t.T(theta)
    diag = np.diag(T)
    if np.all(diag > 0):
        # [r, c] = 2[(ℓI − G)T⁻¹]_{cr}, i.e. 2 T⁻ᵀ(ℓI − G)ᵀ: a k×k solve by NumPy, not SciPy's
        # LAPACK, whose threaded OpenBLAS takes 40 ms for a 2×2 solve on a busy machine
        dld = 2.0 * np.linalg.solve(T.T, (nl * np.eye(k) - Gt).T)
        return dld[rows, cols] + d * drss[rows, cols] / pwrss
    if k == 1:
        return np.zeros(1)                                         # even in θ: flat on the bound
    return np.full(t.ntheta, np.nan)


def fd_fallback(g: np.ndarray, f, theta: np.ndarray, lower: np.ndarray, h: float = 1e-6,
                f0: float | None = None) -> np.ndarray:
    """``g`` with its NaN entries (a singular vector term) replaced by finite differences of the
    criterion ``f``: (f(θ + h e) − f(θ − h e))/2h where θ − h e is feasible, else the one-sided
    (f(θ + h e) − f(θ))/h inwards from the bound; ``f0``: f(θ) if known (not evaluated again)."""
    bad = np.flatnonzero(np.isnan(g))
    if bad.size == 0:
        return g
    g = g.copy()
    for i in bad:
        e = np.zeros_like(theta)
        e[i] = h
        if theta[i] - h < lower[i]:
            f0 = f(theta) if f0 is None else f0
            g[i] = (f(theta + e) - f0) / h
        else:
            g[i] = (f(theta + e) - f(theta - e)) / (2.0 * h)
    return g
