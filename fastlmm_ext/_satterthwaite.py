"""Satterthwaite's degrees of freedom for tests of the fixed effects (as in lmerTest 3.1).

The variance parameters are  φ = (θ, σ), θ as in lme4 (Var(b) = σ² Λ_θ Λ_θᵀ).  With β at its
conditional estimate β̂(θ), the deviance (−2 log-likelihood, *not* profiled over σ) is

    ML:    d(θ, σ) = log|L_θ|² − Σ log wᵢ + r²(θ)/σ² + n log(2πσ²)
    REML:  d(θ, σ) = log|L_θ|² − Σ log wᵢ + log|R_X|² + r²(θ)/σ² + (n − p) log(2πσ²)

(r² = penalised weighted residual sum of squares).  At σ² = r²/n (ML) or r²/(n − p) (REML) these
are lme4's profiled criteria.  The asymptotic covariance of φ̂ is A = 2 H⁻¹, H the Hessian of d
at the optimum (a Moore–Penrose inverse over the eigenvalues > 1e-8).  The covariance of β̂ is
V(φ) = σ² (R_XᵀR_X)⁻¹ and J_k = ∂V/∂φ_k.  For a contrast l (a row vector),

    var = l V lᵀ,   g_k = l J_k lᵀ,   ν = 2 var² / (gᵀ A g),

and t = l β̂ / √var is referred to a t distribution with ν degrees of freedom.  For a q-row
contrast matrix L the F statistic is F = (Lβ̂)ᵀ (L V Lᵀ)⁻¹ (Lβ̂) / q.  With L V Lᵀ = P D Pᵀ, the
rows of PᵀL give q independent t statistics with ν_m = 2 d_m² / (g_mᵀ A g_m); the F statistic's
denominator df is ν = 2E/(E − q), E = Σ ν_m/(ν_m − 2) (2 if any ν_m ≤ 2; the common value if all
ν_m agree to 1e-8).  H and J_k are computed by central differences with Richardson
extrapolation (the scheme of R's numDeriv, which lmerTest uses).  Like lmerTest, a parameter on
its boundary (a zero diagonal θ of a singular fit) is differenced two-sided: the criterion is
defined, and even in that θ, on both sides.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg as la

from ._derivatives import HESSIAN_STEPS, JACOBIAN_STEPS, DerivOptions, hessian_richardson, jacobian_richardson
from ._pls import deviance_at_sigma

__all__ = ["SatterthwaiteInfo", "fstat_ddf"]


class SatterthwaiteInfo:
    """Covariance of the variance parameters φ = (θ, σ) and the derivatives of Var(β̂) w.r.t. φ
    at a given (θ, σ) of a :class:`LinearMixedModel` (see the module docstring for the formulas).

    ``hessian``: H = ∂²d/∂φ²;  ``vcov_varpar``: A = 2H⁺ (eigenvalues ≤ ``tol`` dropped, with a
    warning for negative or zero ones);  ``jacobian``: [∂Var(β̂)/∂φ_k];  ``vcov_beta``: Var(β̂)."""

    def __init__(self, model, theta, sigma: float, tol: float = 1e-8,
                 hessian_steps: DerivOptions = HESSIAN_STEPS, jacobian_steps: DerivOptions = JACOBIAN_STEPS):
        s = model.structure
        self.n, self.p = s.n, s.p
        self.REML = bool(model.REML)
        self._backend = model.backend
        self._sum_log_w = model.backend.sum_log_w
        self._states: dict[bytes, object] = {}
        self.varpar = np.concatenate([np.asarray(theta, dtype=float).ravel(), [float(sigma)]])
        self.vcov_beta = self.vcov_beta_at(self.varpar)
        self.hessian = hessian_richardson(self.deviance, self.varpar, hessian_steps)
        evals, evecs = np.linalg.eigh((self.hessian + self.hessian.T) / 2.0)
        self.hessian_eigenvalues = evals
        neg = evals < -tol
        zero = np.abs(evals) <= tol
        if neg.any():
            warnings.warn(f"Model failed to converge with {int(neg.sum())} negative eigenvalue(s) of the Hessian "
                          f"of the deviance in (theta, sigma): {', '.join(f'{v:.1e}' for v in evals[neg])}",
                          RuntimeWarning, stacklevel=3)
        if zero.any():
            warnings.warn(f"Model may not have converged with {int(zero.sum())} eigenvalue(s) of the Hessian "
                          f"close to zero: {', '.join(f'{v:.1e}' for v in evals[zero])}",
                          RuntimeWarning, stacklevel=3)
        pos = evals > tol
        Vp = evecs[:, pos]
        self.vcov_varpar = 2.0 * (Vp / evals[pos]) @ Vp.T
        self.jacobian = jacobian_richardson(self.vcov_beta_at, self.varpar, jacobian_steps)
        self._states.clear()   # the PLS solutions are only needed while differentiating

    @classmethod
    def from_result(cls, res, **kwargs) -> SatterthwaiteInfo:
        """At the fitted (θ̂, σ̂) of an :class:`LmerResult`."""
        return cls(res.model, res.theta, res.sigma, **kwargs)

    # -- the two functions of φ that are differentiated
    def _state(self, theta: np.ndarray):
        key = np.asarray(theta, dtype=float).tobytes()
        st = self._states.get(key)
        if st is None:
            st = self._backend.state(np.asarray(theta, dtype=float))
            self._states[key] = st
        return st

    def deviance(self, varpar: np.ndarray) -> float:
        """−2 log-likelihood (REML or ML, as the fit) at φ = (θ, σ), β at β̂(θ)."""
        theta, sigma = varpar[:-1], float(varpar[-1])
        st = self._state(theta)
        return deviance_at_sigma(st.ldL2, st.ldRX2, st.pwrss, sigma, self.n, self.p, self.REML, self._sum_log_w)

    def vcov_beta_at(self, varpar: np.ndarray) -> np.ndarray:
        """Var(β̂) = σ² (R_XᵀR_X)⁻¹ at φ = (θ, σ)."""
        theta, sigma = varpar[:-1], float(varpar[-1])
        st = self._state(theta)
        if self.p == 0:
            return np.zeros((0, 0))
        Ri = la.solve_triangular(st.RX, np.eye(self.p), lower=False)
        return sigma * sigma * (Ri @ Ri.T)

    # -- tests
    def df_contrast(self, l: np.ndarray) -> float:
        """Satterthwaite df of the single contrast l β."""
        l = np.asarray(l, dtype=float).ravel()
        var = float(l @ self.vcov_beta @ l)
        g = np.array([l @ J @ l for J in self.jacobian])
        denom = float(g @ self.vcov_varpar @ g)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(2.0 * var * var / denom) if denom > 0 else np.inf


def fstat_ddf(nu: np.ndarray, tol: float = 1e-8) -> float:
    """Denominator df of an F statistic that averages q independent squared t statistics with
    ν_m df:  ν = 2E/(E − q), E = Σ ν_m/(ν_m − 2); 2 if any ν_m ≤ 2; mean(ν) if all ν_m agree."""
    nu = np.asarray(nu, dtype=float)
    if nu.size == 1:
        return float(nu[0])
    if np.all(np.abs(np.diff(nu)) < tol):
        return float(nu.mean())
    if np.any(nu <= 2):
        return 2.0
    E = float(np.sum(nu / (nu - 2.0)))
    return 2.0 * E / (E - nu.size)
