"""Simulated responses of a fitted model (lme4's ``simulate.merMod``).

    y* = Xβ̂ + offset + Z Λ_θ̂ u* σ̂ + ε* σ̂/√w,   u* ~ N(0, I_q),  ε* ~ N(0, I_n),

with zero-weight rows given no noise; ``re_form`` holds some terms at their conditional modes b̂
instead of drawing them (lme4's ``re.form``; ``"~0"``, the default, draws them all).  The
parametric bootstrap (``_bootstrap``) draws its responses with the same :class:`Simulator`, so a
replicate depends only on its seed.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._newdata import selected_terms
from ._predict import random_part

__all__ = ["Simulator", "make_simulator", "simulate"]


class Simulator:
    """Draws y* = μ₀ + ZΛ_θ̂ u* σ̂ + ε* σ̂/√w for one rng; shared by simulate() and bootstrap()
    so that a replicate depends only on its seed.  Per replicate the rng draws u* (q values)
    first, then ε* (n values)."""

    def __init__(self, mu0: np.ndarray, ZL, sigma: float, weights: np.ndarray | None,
                 cond: np.ndarray | None = None, cond_cols: np.ndarray | None = None):
        self.mu0 = np.asarray(mu0, dtype=float)
        self.ZL = ZL.tocsr()
        self.sigma = float(sigma)
        if weights is None:
            self.esd = None
        else:
            w = np.asarray(weights, dtype=float)
            with np.errstate(divide="ignore"):
                # zero-weight rows do not enter the fit: give them no noise rather than infinite noise
                self.esd = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), 0.0)
        self.cond = cond                # Z b̂ of the terms held at their modes (or None)
        self.cond_cols = cond_cols      # boolean mask of the u columns replaced by those modes

    @property
    def n(self) -> int:
        return self.mu0.shape[0]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        u = rng.standard_normal(self.ZL.shape[1])
        e = rng.standard_normal(self.n)
        if self.cond_cols is not None:
            u[self.cond_cols] = 0.0
        y = self.mu0 + self.sigma * (self.ZL @ u)
        if self.cond is not None:
            y = y + self.cond
        y = y + self.sigma * (e if self.esd is None else e * self.esd)
        return y


def make_simulator(res, re_form="~0") -> Simulator:
    """The simulator of a fitted model: new random effects for every term but those ``re_form``
    keeps (``_newdata.selected_terms``), which stay at their conditional modes."""
    s = res.structure
    s.require_rows("simulating responses (simulate, bootstrap)")
    keep = selected_terms(s, re_form)
    mu0 = s.X @ res._state.beta + (s.offset if s.offset is not None else 0.0)
    ZL = (s.Z @ s.Lambda(res.theta)).tocsc()
    cond = cond_cols = None
    if keep:
        cond_cols = np.zeros(s.q, dtype=bool)
        for i in keep:
            t = s.terms[i]
            cond_cols[t.col_offset:t.col_offset + t.q] = True
        cond = random_part(s, res._state.b, [(i, s.terms[i].Xi, s.terms[i].codes) for i in keep], np.zeros(s.n))
    return Simulator(mu0, ZL, res.sigma, s.weights, cond, cond_cols)


def simulate(res, nsim: int = 1, seed=None, re_form="~0") -> pd.DataFrame:
    """``nsim`` responses drawn from the fitted model ``res`` (``LmerResult.simulate`` says how)."""
    nsim = int(nsim)
    if nsim < 1:
        raise ValueError(f"nsim must be a positive integer, got {nsim}")
    sim = make_simulator(res, re_form)
    rng = np.random.default_rng(seed)
    Y = np.empty((sim.n, nsim))
    for j in range(nsim):
        Y[:, j] = sim.draw(rng)
    return pd.DataFrame(Y, index=res.structure.row_index, columns=[f"sim_{j + 1}" for j in range(nsim)])
