"""Starting values of θ from moment estimates on the cross-products.

lme4 starts every fit at θ = 1 (each random-effect standard deviation equal to σ).  On large
crossed designs the first line search from there costs 4-5 of about 14 evaluations, and an
evaluation can cost a second.  For each scalar term j, the one-way analysis-of-variance
estimator on the residual ỹ of the fixed effects (read off the cross-products: level sums
Z_jᵀỹ, level counts diag Z_jᵀZ_j and ỹᵀỹ, so O(q) work)

    MSB = Σ_l S_l²/n_l / (ℓ−1),   MSW = (ỹᵀỹ − Σ_l S_l²/n_l)/(n−ℓ),
    n₀ = (n − Σ_l n_l²/n)/(ℓ−1),   σ_j² ≈ (MSB − MSW)/n₀,

with σ² ≈ ỹᵀỹ/n − Σ_j σ_j², gives θ_j ≈ σ_j/σ.  For crossed factors each one-way estimate is
close (the other factors average out within a level); for nested ones it overstates the inner
term.  It is only a start: the optimiser still finds the optimum, and an estimate at or below
zero starts the term at a small positive θ so that the optimiser can move either way.

A vector-valued term (k columns) gets its moment estimate from the level sums, again from the
cross-products alone: with M_l = Z_lᵀZ_l (the level's k×k diagonal block of ZᵀZ) and
r_l = Z_lᵀỹ, treating the other terms as noise,

    E[Σ_l r_l r_lᵀ] = Σ_l M_l Σ_b M_l + σ² Σ_l M_l,     E[ỹᵀỹ] = Σ_l tr(M_l Σ_b) + n σ²,

k² + 1 linear equations in vec Σ_b and σ² (no per-level inverse, so levels with few or collinear
rows do no harm).  T is the Cholesky factor of Σ_b/σ² after its eigenvalues are floored, so
that it is a proper start; otherwise the term keeps lme4's start (identity T).
"""
from __future__ import annotations

import numpy as np

from ._crossprod import CrossProducts, level_blocks
from ._design import ModelStructure
from ._params import theta_from_T

__all__ = ["moment_theta0"]

MIN_START = 0.05
MAX_START = 20.0


def moment_theta0(s: ModelStructure, cp: CrossProducts) -> np.ndarray:
    """θ₀ from one-way moment estimates for scalar terms, lme4's start elsewhere (module doc)."""
    theta = s.theta0.copy()
    n, p = cp.n, s.p
    tss = float(cp.XyXy[p, p])
    if n <= p + 1 or tss <= 0:
        return theta
    yz = cp.ZtXy[:, p]
    sig2, scalar = {}, []
    for i, t in enumerate(s.terms):
        if t.k != 1:
            T = _vector_start(t, cp, yz, tss, n)
            if T is not None:
                theta[t.theta_offset:t.theta_offset + t.ntheta] = theta_from_T(T)
            continue
        sl = slice(t.col_offset, t.col_offset + t.q)
        nl, S = level_blocks(cp, t)[:, 0, 0], yz[sl]
        ok = nl > 0
        ell = int(ok.sum())
        if ell < 2 or n <= ell:
            continue
        bss = float(np.sum(S[ok] ** 2 / nl[ok]))
        msb = bss / (ell - 1)
        msw = max(tss - bss, 0.0) / (n - ell)
        n0 = (n - float(np.sum(nl[ok] ** 2)) / n) / (ell - 1)
        sig2[i] = max((msb - msw) / n0, 0.0) if n0 > 0 else 0.0
        scalar.append(i)
    if not scalar:
        return theta
    s2 = max(tss / n - sum(sig2.values()), 0.05 * tss / n)
    for i in scalar:
        theta[s.terms[i].theta_offset] = float(np.clip(np.sqrt(sig2[i] / s2), MIN_START, MAX_START))
    return theta


def _vector_start(t, cp: CrossProducts, yz: np.ndarray, tss: float, n: int) -> np.ndarray | None:
    """T from the moment equations of the level sums (module docstring), or None."""
    k, ell = t.k, t.nlevels
    if ell < 2 * k:
        return None
    M = level_blocks(cp, t)
    r = yz[t.col_offset:t.col_offset + t.q].reshape(ell, k)
    kk = k * k
    A = np.zeros((kk + 1, kk + 1))
    A[:kk, :kk] = np.einsum("lij,lkm->ikjm", M, M).reshape(kk, kk)     # Σ_l M_l ⊗ M_l
    sumM = M.sum(axis=0).ravel()
    A[:kk, kk] = sumM
    A[kk, :kk] = sumM
    A[kk, kk] = n
    rhs = np.append(np.einsum("li,lj->ij", r, r).ravel(), tss)
    try:
        sol = np.linalg.lstsq(A, rhs, rcond=None)[0]
    except np.linalg.LinAlgError:  # pragma: no cover - lstsq of a finite system does not fail
        return None
    Sb, s2 = sol[:kk].reshape(k, k), float(sol[kk])
    if not np.isfinite(sol).all() or s2 <= 0:
        return None
    w, V = np.linalg.eigh((Sb + Sb.T) / 2.0 / s2)
    w = np.clip(w, (MIN_START ** 2) * max(float(w.max()), 1e-12), MAX_START ** 2)
    return np.linalg.cholesky((V * w) @ V.T)
