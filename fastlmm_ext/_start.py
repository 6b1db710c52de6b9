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
Vector-valued terms keep lme4's start (identity T).
"""
from __future__ import annotations

import numpy as np

from ._crossprod import CrossProducts
from ._design import ModelStructure

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
    diag = cp.Mx[cp.Ap[:-1]]                                      # first stored entry = diagonal
    yz = cp.ZtXy[:, p]
    sig2, scalar = {}, []
    for i, t in enumerate(s.terms):
        if t.k != 1:
            continue
        sl = slice(t.col_offset, t.col_offset + t.q)
        nl, S = diag[sl], yz[sl]
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
