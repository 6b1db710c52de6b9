"""Reference path: lme4's profiled criterion written equation by equation in NumPy/SciPy.

This module is documentation as much as code.  It uses no compiled code of this project and
no cross-products: it works on y, X and Z directly, with a dense Cholesky factor and no
fill-reducing permutation (P = I), so it agrees with the compiled path only if both are right.

Notation of Bates, Mächler, Bolker & Walker (2015), "Fitting linear mixed-effects models
using lme4", J. Stat. Softw. 67(1), section 3 (equation numbers refer to that paper):

    b = Λ_θ u,   u ~ N(0, σ² I_q),   y | u ~ N(Xβ + ZΛ_θ u + o, σ² W⁻¹)

Penalised least squares (PLS), eq. (14)-(18):
    L_θ L_θᵀ = Λ_θᵀ Zᵀ W Z Λ_θ + I_q                       (Cholesky of the random-effects block)
    L_θ c_u  = Λ_θᵀ Zᵀ W y                                   (cu)
    L_θ R_ZX = Λ_θᵀ Zᵀ W X                                   (RZX)
    R_Xᵀ R_X = Xᵀ W X − R_ZXᵀ R_ZX                           (RX)
    R_Xᵀ R_X β̂ = Xᵀ W y − R_ZXᵀ c_u                          (β̂)
    L_θᵀ û   = c_u − R_ZX β̂                                  (û)
    r²(θ)    = ‖W^½ (y − o − Xβ̂ − ZΛ_θ û)‖² + ‖û‖²            (penalised RSS)

Profiled criteria, eq. (34) and (41):
    −2 ℓ(θ)   = log|L_θ|² − log|W| + n [1 + log(2π r²(θ)/n)]
    −2 ℓ_R(θ) = log|L_θ|² + log|R_X|² − log|W| + (n − p) [1 + log(2π r²(θ)/(n − p))]
"""
from __future__ import annotations

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from ._crossprod import log_weight_sum
from ._design import ModelStructure
from ._exceptions import NotPositiveDefiniteError
from ._ols import remove_level
from ._pls import profiled_criterion

__all__ = ["ReferencePLS"]


class ReferencePLS:
    """Dense evaluation of the PLS solution and the profiled criterion (small problems)."""

    def __init__(self, structure: ModelStructure):
        s = structure
        self.s = s
        self.w = np.ones(s.n) if s.weights is None else s.weights
        r = s.y - (0.0 if s.offset is None else s.offset)
        # With an intercept column, a value c of y − o is moved into β̂'s intercept: y − o − c is
        # exact for a large common level (10¹² + ...), which X β̂ would otherwise round (_ols).
        self.y, self.icpt, self.level = remove_level(s.X, r, s.weights)
        self.sum_log_w = log_weight_sum(s.weights)

    def solve(self, theta: np.ndarray) -> dict:
        s, w, y, X = self.s, self.w, self.y, self.s.X
        theta = np.asarray(theta, dtype=float)
        Lam = s.Lambda(theta)                              # Λ_θ, sparse q × q
        ZLam = (s.Z @ Lam).tocsc()                         # Z Λ_θ, sparse n × q
        WZLam = sp.diags(w) @ ZLam
        # L_θ L_θᵀ = Λᵀ Zᵀ W Z Λ + I   (dense q × q: small problems only)
        try:
            L = la.cholesky((ZLam.T @ WZLam).toarray() + np.eye(s.q), lower=True)
        except la.LinAlgError as e:
            raise NotPositiveDefiniteError("reference Cholesky of ΛᵀZᵀWZΛ + I failed", theta) from e
        cu = la.solve_triangular(L, WZLam.T @ y, lower=True)           # L c_u = ΛᵀZᵀWy
        RZX = la.solve_triangular(L, np.asarray(WZLam.T @ X).reshape(s.q, s.p), lower=True)  # L R_ZX = ΛᵀZᵀWX
        RXtRX = X.T @ (X * w[:, None]) - RZX.T @ RZX                   # R_XᵀR_X
        try:
            RX = la.cholesky(RXtRX, lower=False) if s.p else np.zeros((0, 0))
        except la.LinAlgError as e:
            raise NotPositiveDefiniteError("reference Cholesky of R_XᵀR_X failed", theta) from e
        rhs = X.T @ (w * y) - RZX.T @ cu
        beta = la.cho_solve((RX, False), rhs) if s.p else np.zeros(0)  # R_XᵀR_X β̂ = XᵀWy − R_ZXᵀc_u
        u = la.solve_triangular(L, cu - RZX @ beta, lower=True, trans="T")  # L_θᵀ û = c_u − R_ZX β̂
        resid = y - X @ beta - ZLam @ u
        pwrss = float(np.sum(w * resid ** 2) + u @ u)                  # r²(θ)
        ldL2 = 2.0 * float(np.sum(np.log(np.diag(L))))                 # log|L_θ|²
        ldRX2 = 2.0 * float(np.sum(np.log(np.diag(RX)))) if s.p else 0.0
        if self.icpt is not None:
            beta = beta.copy()
            beta[self.icpt] += self.level
        return {"beta": beta, "u": u, "b": Lam @ u, "pwrss": pwrss, "ldL2": ldL2, "ldRX2": ldRX2,
                "RX": RX, "L": L}

    def objective(self, theta: np.ndarray, reml: bool) -> float:
        """Profiled criterion, eq. (34) / (41), from the PLS solution (``_pls``)."""
        st = self.solve(theta)
        return profiled_criterion(st["ldL2"], st["ldRX2"], st["pwrss"], self.s.n, self.s.p, reml, self.sum_log_w)
