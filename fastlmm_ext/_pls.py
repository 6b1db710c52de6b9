"""The penalised least-squares solution at one θ and the one home of lme4's profiled criterion.

Every backend solves the same PLS problem (lme4's notation; ``_reference`` has it equation by
equation) and reports

    log|L_θ|²  (ldL2),   log|R_X|²  (ldRX2),   r²(θ)  (pwrss, the penalised weighted RSS).

From these alone, with n observations, p fixed effects and prior weights w, the criteria are
(Bates et al. 2015, eq. 34 and 41):

    ML:    −2ℓ(θ)   = log|L_θ|² − Σ log wᵢ + n [1 + log(2π r²/n)]
    REML:  −2ℓ_R(θ) = log|L_θ|² + log|R_X|² − Σ log wᵢ + (n − p) [1 + log(2π r²/(n − p))]

at σ̂² = r²/d, d = n (ML) or n − p (REML).  With σ given instead of profiled out, the deviance
(−2 log-likelihood, β at its conditional estimate β̂(θ)) is

    d(θ, σ) = log|L_θ|² − Σ log wᵢ + r²/σ² + d log(2πσ²)  [+ log|R_X|² for REML],

which equals the profiled criterion at σ = σ̂ (Satterthwaite's derivatives and the profile
likelihood use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._exceptions import NotPositiveDefiniteError

__all__ = ["PLSState", "residual_df", "profiled_criterion", "deviance_at_sigma"]


@dataclass(frozen=True)
class PLSState:
    """Solution of the penalised least-squares problem at one θ."""
    theta: np.ndarray
    beta: np.ndarray     # β̂(θ)
    u: np.ndarray        # spherical conditional modes û(θ)
    b: np.ndarray        # conditional modes on the original scale, Λ_θ û
    pwrss: float         # r²(θ)
    ldL2: float          # log |L_θ|²
    ldRX2: float         # log |R_X|²
    RX: np.ndarray       # upper-triangular p × p R_X (R_XᵀR_X = Xᵀ W X − R_ZXᵀR_ZX)


def residual_df(n: int, p: int, reml: bool) -> int:
    """d = n − p for REML, n for ML: the divisor of σ̂² = r²/d and the multiplier in the criterion."""
    return n - p if reml else n


def profiled_criterion(ldL2: float, ldRX2: float, pwrss: float, n: int, p: int, reml: bool,
                       sum_log_w: float = 0.0) -> float:
    """lme4's profiled REML criterion (``reml``) or ML deviance from the PLS pieces (module
    docstring); ``sum_log_w`` = Σ log wᵢ over rows of positive weight (0 without weights)."""
    d = n - p if reml else n
    if not pwrss > 0.0:    # the fixed effects reproduce y, or a backend failed: no finite criterion
        raise NotPositiveDefiniteError(f"penalised residual sum of squares is {pwrss!r}, not positive")
    val = ldL2 - sum_log_w + d * (1.0 + math.log(2.0 * math.pi * pwrss / d))
    return val + ldRX2 if reml else val


def deviance_at_sigma(ldL2: float, ldRX2: float, pwrss: float, sigma: float, n: int, p: int, reml: bool,
                      sum_log_w: float = 0.0) -> float:
    """−2 log-likelihood (REML's or ML's) at θ and a given σ, β at β̂(θ) (module docstring)."""
    s2 = float(sigma) ** 2
    d = n - p if reml else n
    if not s2 > 0.0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    dev = ldL2 - sum_log_w + pwrss / s2 + d * math.log(2.0 * math.pi * s2)
    return dev + ldRX2 if reml else dev
