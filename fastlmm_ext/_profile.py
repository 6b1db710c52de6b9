"""Profile likelihood of a fitted model and the profile confidence intervals (lme4's
``profile()`` / ``confint(method="profile")``).

Parameters on lme4's scale ψ = (.sig01, .sig02, ..., .sigma, β): for each random-effects term
the standard deviations on the diagonal and the correlations below it (the same positions as
θ), then the residual SD, then the fixed effects.  As lme4 does, a REML fit is profiled on the
ML deviance of its ML refit.

The ML deviance with every parameter given is
    D(θ, σ, β) = log|L_θ|² + n log(2πσ²) + [r²(θ) + ‖R_X(β − β̂_θ)‖²] / σ²,
so for fixed θ the optimum over β is β̂_θ, over σ is σ² = r²/n, and with β_j fixed at b the
optimum over the other β gives  ‖R_X(β − β̂_θ)‖² = (b − β̂_θ,j)² / [(R_XᵀR_X)⁻¹]_jj.

The profile of ψ_m is  ζ(c) = sign(c − ψ̂_m) √(D_m(c) − D̂),  D_m(c) = min D subject to ψ_m = c,
and the interval is {c : |ζ(c)| ≤ z_{(1+level)/2}}, found here by root finding on ζ
(lme4 interpolates a spline through a grid of profile points; the roots agree to its accuracy).
"""
from __future__ import annotations

import warnings

import nlopt
import numpy as np
import pandas as pd
import scipy.linalg as la
from scipy import optimize, stats

from ._parallel import n_workers, run_tasks
from ._params import Cv_to_Sv, Sv_to_Cv, theta_kinds
from ._pls import deviance_at_sigma, profiled_criterion
from ._progress import Progress
from ._summary import confint_row_names, format_pct
from ._threads import fit_threads

__all__ = ["Profiler", "profile_confint", "profile_table"]


class Profiler:
    """ML profile of every parameter of a fitted model (see module docstring)."""

    def __init__(self, res):
        m = res.model.ml_twin()
        if res.REML:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = m.fit(check_conv=False)
        self.res, self.model, self.s = res, m, m.structure
        self.n = self.s.n
        self.backend = m.backend
        self.sum_log_w = m.backend.sum_log_w
        self.theta_hat = np.asarray(res.theta, dtype=float)
        self.sigma_hat = float(res.sigma)
        self.dev_hat = float(res.criterion)
        # A correlation whose SD is 0 is undefined (NaN, see _params); its profile starts at 0.
        self.psi_hat = np.nan_to_num(Cv_to_Sv(self.s.terms, self.theta_hat, self.sigma_hat), nan=0.0)
        self.nsig = self.s.ntheta
        self.names = confint_row_names(self.s)
        self.kinds = theta_kinds(self.s.terms)   # "sd" | "cor" for each .sig

    # ------------------------------------------------------------------ deviances
    def _pieces(self, theta):
        st = self.backend.state(np.maximum(theta, self.s.lower))
        return st

    def _ld_pwrss(self, theta):
        """log|L_θ|² and r²(θ), without the modes (``Backend.pls_terms``)."""
        return self.backend.pls_terms(np.maximum(np.asarray(theta, dtype=float), self.s.lower))

    def dev_sigma_theta(self, theta, sigma) -> float:
        """D(θ, σ, β̂_θ)."""
        ldL2, pwrss = self._ld_pwrss(theta)
        return deviance_at_sigma(ldL2, 0.0, pwrss, sigma, self.n, self.s.p, False, self.sum_log_w)

    def dev_beta(self, theta, j, b) -> float:
        """min over σ and β_{−j} of D(θ, σ, β) with β_j = b."""
        st = self._pieces(theta)
        Rinv = la.solve_triangular(st.RX, np.eye(self.s.p), lower=False)
        vjj = float(Rinv[j] @ Rinv[j])
        r2 = st.pwrss + (b - st.beta[j]) ** 2 / vjj
        return profiled_criterion(st.ldL2, 0.0, r2, self.n, self.s.p, False, self.sum_log_w)

    def _minimize(self, f, x0, lower, upper):
        x0 = np.clip(np.asarray(x0, float), lower, upper)
        if x0.size == 0:
            return f(x0)
        opt = nlopt.opt(nlopt.LN_BOBYQA, x0.size)
        opt.set_min_objective(lambda x, g: f(np.asarray(x)))
        opt.set_lower_bounds(lower)
        opt.set_upper_bounds(upper)
        opt.set_ftol_abs(1e-9)
        opt.set_xtol_abs(1e-8)
        opt.set_maxeval(20_000)
        try:
            x = opt.optimize(x0)
            return float(opt.last_optimum_value()) if x is not None else f(x0)
        except nlopt.RoundoffLimited:
            return float(opt.last_optimum_value())

    def profiled_dev(self, m: int, c: float) -> float:
        """D_m(c): the ML deviance minimised with parameter m fixed at c."""
        nsig = self.nsig
        if m < nsig:  # a variance parameter: free σ and the other SDs/correlations
            free = [i for i in range(nsig) if i != m]
            lo = np.array([0.0] + [0.0 if self.kinds[i] == "sd" else -1.0 for i in free])
            hi = np.array([np.inf] + [np.inf if self.kinds[i] == "sd" else 1.0 for i in free])
            x0 = np.concatenate([[self.sigma_hat], self.psi_hat[free]])

            def f(x):
                psi = np.empty(nsig)
                psi[m] = c
                psi[free] = x[1:]
                sigma = max(x[0], 1e-12)
                return self.dev_sigma_theta(Sv_to_Cv(self.s.terms, psi, sigma), sigma)
            return self._minimize(f, x0, lo, hi)
        if m == nsig:  # σ fixed: θ free on its own scale
            return self._minimize(lambda th: self.dev_sigma_theta(th, c), self.theta_hat,
                                  self.s.lower, np.full(nsig, np.inf))
        j = m - nsig - 1
        return self._minimize(lambda th: self.dev_beta(th, j, c), self.theta_hat,
                              self.s.lower, np.full(nsig, np.inf))

    def zeta(self, m: int, c: float) -> float:
        d = self.profiled_dev(m, c) - self.dev_hat
        est = self.estimate(m)
        return float(np.sign(c - est) * np.sqrt(max(d, 0.0)))

    def estimate(self, m: int) -> float:
        if m < self.nsig:
            return float(self.psi_hat[m])
        if m == self.nsig:
            return self.sigma_hat
        return float(self.res.fixef.iloc[m - self.nsig - 1])

    def _scale(self, m: int) -> float:
        if m < self.nsig:
            return max(abs(self.psi_hat[m]), 0.1 * self.sigma_hat) if self.kinds[m] == "sd" else 0.3
        if m == self.nsig:
            return self.sigma_hat / np.sqrt(2.0 * self.n)
        return float(self.res.se.iloc[m - self.nsig - 1])

    # ------------------------------------------------------------------ intervals
    def bound(self, m: int, z: float, side: int) -> float:
        """The c on ``side`` (−1 lower, +1 upper) of ψ̂_m with ζ(c) = side·z (NaN if none)."""
        est = self.estimate(m)
        kind = self.kinds[m] if m < self.nsig else ("sigma" if m == self.nsig else "beta")
        lo_lim = {"sd": 0.0, "cor": -1.0, "sigma": 0.0, "beta": -np.inf}[kind]
        hi_lim = {"sd": np.inf, "cor": 1.0, "sigma": np.inf, "beta": np.inf}[kind]
        g = lambda c: side * self.zeta(m, c) - z  # noqa: E731
        step = self._scale(m)
        prev = est
        for it in range(60):
            c = est + side * step * (0.5 * 2 ** it if kind in ("beta", "sigma") else 0.25 * 2 ** it)
            if kind in ("sd", "sigma") and side < 0:
                c = est * (1 - min(0.999999, 0.25 * 2 ** it)) if c <= 0 else c
            if kind == "cor":
                c = est + side * (1 - side * est) * (1 - 0.5 ** (it + 1))
            c = min(max(c, lo_lim), hi_lim)
            if g(c) >= 0:
                if kind == "sd" and side < 0 and c == 0.0:
                    return 0.0
                return optimize.brentq(g, min(prev, c), max(prev, c), xtol=1e-8 * max(1.0, abs(c)), rtol=1e-8)
            if (side < 0 and c <= lo_lim + 1e-12) or (side > 0 and c >= hi_lim - 1e-12):
                return lo_lim if side < 0 and kind in ("sd", "sigma") else np.nan
            if kind in ("sd", "sigma") and side < 0 and it >= 20:
                return 0.0 if g(0.0) < 0 else optimize.brentq(g, 0.0, c)
            if kind == "cor" and it >= 30:
                return np.nan
            prev = c
        return np.nan


def profile_confint(res, level: float = 0.95, parm=None, n_jobs: int = 1, progress=None) -> pd.DataFrame:
    """lme4's ``confint(fit, method="profile")``: rows .sig01.., .sigma, fixed effects.

    Each row needs two root searches (lower and upper bound), each many constrained ML fits;
    they are independent, so ``n_jobs > 1`` (``-1``: all cores) runs them with ``_parallel``:
    in a process pool whose workers get the (ML) fit pickled once and profile it with their own
    kernel, or in threads (one unpickled copy of the fit each) where processes cannot be used.
    The bounds are the same as the serial ones (the same arithmetic on the same inputs).
    ``progress``: True → shown on stderr; None → only on a terminal once the run has taken more
    than 2 s; False → never (``_progress``)."""
    a = (1.0 - level) / 2.0
    z = float(stats.norm.ppf(1.0 - a))
    # The pools as in the fit (_threads): the wheels' spinning threads and CHOLMOD's would take
    # turns on every small call (sleepstudy on 2 cores: 13 s → 1.1 s).
    with fit_threads(res.model.threads):
        prof = Profiler(res)
        names = prof.names
        idx = range(len(names)) if parm is None else \
            [names.index(q) for q in ([parm] if isinstance(parm, str) else parm)]
        tasks = [(m, z, side) for m in idx for side in (-1, +1)]
        bar = Progress(progress, "profile", "bounds", total=len(tasks))
        try:
            # The ML fit (for a REML fit, its refit) goes to the workers, so that they need not refit.
            found, _ = run_tasks(Profiler, _bound, tasks, prof.res, n_workers(n_jobs, len(tasks)), bar, local=prof)
        finally:
            bar.close()
    bounds = {(m, side): b for (m, _, side), b in zip(tasks, found)}
    cols = format_pct([a, 1.0 - a])
    return pd.DataFrame({cols[0]: [bounds[m, -1] for m in idx], cols[1]: [bounds[m, +1] for m in idx]},
                        index=[names[m] for m in idx])


def _bound(prof: Profiler, task: tuple[int, float, int]) -> float:
    """One root search (a ``_parallel`` task): parameter m's bound on ``side`` at ζ = ±z."""
    m, z, side = task
    return prof.bound(m, z, side)


def profile_table(res, npoints: int = 13, level: float = 0.99) -> pd.DataFrame:
    """Profile traces for plotting: for each parameter, ζ on a grid spanning its ``level``
    interval.  Columns: parameter, value, zeta."""
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    rows = []
    with fit_threads(res.model.threads):     # as in profile_confint
        prof = Profiler(res)
        for m, name in enumerate(prof.names):
            lo, hi = prof.bound(m, z, -1), prof.bound(m, z, +1)
            est = prof.estimate(m)
            lo = est - 3 * prof._scale(m) if not np.isfinite(lo) else lo
            hi = est + 3 * prof._scale(m) if not np.isfinite(hi) else hi
            grid = np.linspace(lo, hi, npoints)
            near = np.abs(grid - est) <= 1e-8 * (hi - lo)
            grid = np.sort(np.concatenate([grid[~near], [est]]))   # ψ̂ itself (ζ = 0) exactly once
            for c in grid:
                rows.append((name, float(c), prof.zeta(m, float(c)) if c != est else 0.0))
    return pd.DataFrame(rows, columns=["parameter", "value", "zeta"])
