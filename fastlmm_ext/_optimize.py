"""Bounded minimisation of the profiled criterion over θ, and lme4's post-fit checks.

The optimiser knows nothing of mixed models: it minimises f(θ) subject to θ ≥ lower.
Default: NLopt's BOBYQA (Powell's bounded quadratic-model method, the one lme4's default
``nloptwrap`` uses), through the maintained ``nlopt`` package, with tolerances tighter than
lme4's so the optimum is at least as good as lme4's.  With an analytic gradient: ``"bfgs"``,
the projected quasi-Newton method of ``_bfgs`` (it stops at the optimum on the scaled gradient,
on the Newton steps' predicted decrease or on f's rounding, and evaluates no θ twice), or SciPy's
L-BFGS-B (``"lbfgsb"``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import nlopt
import numpy as np
from scipy.optimize import minimize

from ._bfgs import ON_BOUND, Evaluations, minimize_bfgs

__all__ = ["OptSummary", "minimize_theta", "snap_to_bounds", "check_convergence", "is_singular", "OPTIMIZERS",
           "SINGULAR_MESSAGE"]

OPTIMIZERS = ("bobyqa", "bfgs", "nelder_mead", "cobyla", "lbfgsb")
GRADIENT_OPTIMIZERS = ("bfgs", "lbfgsb")

_NLOPT_RESULT = {
    1: "NLOPT_SUCCESS", 2: "NLOPT_STOPVAL_REACHED", 3: "NLOPT_FTOL_REACHED", 4: "NLOPT_XTOL_REACHED",
    5: "NLOPT_MAXEVAL_REACHED", 6: "NLOPT_MAXTIME_REACHED",
}
_NLOPT_STOP = {1: "success", 2: "stopval", 3: "ftol_abs", 4: "xtol_abs", 5: "maxeval", 6: "maxtime"}


@dataclass
class OptSummary:
    """Record of one optimisation run (initial and final θ, criterion, evaluations, messages).

    ``feval``: criterion evaluations (distinct θ for ``"bfgs"``); ``geval``: gradient evaluations
    (0 for the derivative-free methods); ``return_code``: the optimiser's own code or message;
    ``stop_reason``: which test ended the run — for ``"bfgs"`` one of ``_bfgs.STOP_REASONS``
    ("scaled gradient", "rounding", "predicted decrease", "projected gradient zero", "maxeval",
    "no parameters"), for NLopt's methods ``"ftol_abs"``, ``"xtol_abs"``, ``"maxeval"``,
    ``"rounding"`` (RoundoffLimited)..."""
    optimizer: str
    theta_initial: np.ndarray
    lower: np.ndarray
    f_initial: float = np.nan
    theta_final: np.ndarray | None = None
    fmin: float = np.nan
    feval: int = 0
    geval: int = 0
    return_code: str = ""
    stop_reason: str = ""
    messages: list[str] = field(default_factory=list)
    ftol_abs: float = 0.0
    xtol_abs: float = 0.0
    maxeval: int = 0
    elapsed_s: float = 0.0
    converged: bool = False
    threads: int = 0          # BLAS/OpenMP threads the fit ran with (_threads.fit_threads); 0: not recorded

    def __repr__(self) -> str:
        return (f"OptSummary(optimizer={self.optimizer!r}, feval={self.feval}, geval={self.geval}, "
                f"fmin={self.fmin:.10g}, return_code={self.return_code!r}, stop_reason={self.stop_reason!r}, theta_final={np.round(self.theta_final, 6).tolist() if self.theta_final is not None else None})")


def minimize_theta(f: Callable[[np.ndarray], float], theta0: np.ndarray, lower: np.ndarray,
                   optimizer: str = "bobyqa", ftol_abs: float = 1e-12, xtol_abs: float = 1e-10,
                   maxeval: int = 100_000, initial_step: float | None = None,
                   grad: Callable[[np.ndarray], np.ndarray] | None = None,
                   curvature: np.ndarray | None = None, mirrors: dict | None = None,
                   rows: list | None = None, hess: Callable | None = None) -> OptSummary:
    """Minimise f over {θ : θ ≥ lower} from theta0; returns the filled OptSummary.

    ``optimizer="bfgs"`` (``_bfgs``) and ``"lbfgsb"`` (SciPy's L-BFGS-B) need ``grad`` (the
    analytic gradient); the others are NLopt's derivative-free methods.  ``curvature`` (``"bfgs"``
    only): relative sizes of the Hessian's diagonal, its starting matrix; ``mirrors`` (``"bfgs"``
    only): sign symmetries on the bounds, for the edge probe; ``rows`` (``"bfgs"`` only): the vector
    terms' rows of T, for the row probe (``_bfgs.minimize_bfgs``)."""
    if optimizer in GRADIENT_OPTIMIZERS and grad is None:
        raise ValueError(f"optimizer {optimizer!r} needs a backend with an analytic gradient")
    if optimizer == "bfgs":
        return _minimize_bfgs(f, grad, theta0, lower, maxeval, curvature, mirrors, rows, hess)
    if optimizer == "lbfgsb":
        return _minimize_lbfgsb(f, grad, theta0, lower, maxeval)
    algo = {"bobyqa": nlopt.LN_BOBYQA, "nelder_mead": nlopt.LN_NELDERMEAD, "cobyla": nlopt.LN_COBYLA}
    if optimizer not in algo:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    theta0 = np.asarray(theta0, dtype=float)
    lower = np.asarray(lower, dtype=float)
    summ = OptSummary(optimizer=optimizer, theta_initial=theta0.copy(), lower=lower.copy(),
                      ftol_abs=ftol_abs, xtol_abs=xtol_abs, maxeval=maxeval)
    nth = theta0.size
    t0 = time.perf_counter()
    box: dict = {"best": np.inf, "x": theta0.copy(), "n": 0, "err": None}

    def obj(x, grad):
        box["n"] += 1
        try:
            v = float(f(np.asarray(x, dtype=float)))
        except Exception as e:  # keep the error; NLopt would only see a forced stop
            box["err"] = e
            raise nlopt.ForcedStop from e
        if box["n"] == 1:
            summ.f_initial = v
        if v < box["best"]:
            box["best"], box["x"] = v, np.array(x, dtype=float)
        return v

    if nth == 0:
        summ.theta_final, summ.fmin, summ.feval = theta0, float(f(theta0)), 1
        summ.converged, summ.return_code = True, "no parameters"
        summ.stop_reason = "no parameters"
        return summ
    opt = nlopt.opt(algo[optimizer], nth)
    opt.set_min_objective(obj)
    opt.set_lower_bounds(lower)
    opt.set_ftol_abs(ftol_abs)
    opt.set_xtol_abs(xtol_abs)
    opt.set_maxeval(maxeval)
    if initial_step is not None:
        opt.set_initial_step(initial_step)
    try:
        opt.optimize(theta0)
        rc = opt.last_optimize_result()
        summ.return_code = _NLOPT_RESULT.get(rc, f"NLOPT result {rc}")
        summ.stop_reason = _NLOPT_STOP.get(rc, summ.return_code)
        summ.converged = rc in (1, 2, 3, 4)
    except nlopt.ForcedStop:
        if box["err"] is not None:
            raise box["err"]
        raise
    except (nlopt.RoundoffLimited, RuntimeError) as e:
        # Roundoff-limited stops are at the optimum to working precision.
        summ.return_code = type(e).__name__
        summ.stop_reason = "rounding" if isinstance(e, nlopt.RoundoffLimited) else "error"
        summ.converged = isinstance(e, nlopt.RoundoffLimited)
        summ.messages.append(f"optimizer stopped: {type(e).__name__} {e}")
    summ.theta_final = box["x"]
    summ.fmin = box["best"]
    summ.feval = box["n"]
    summ.elapsed_s = time.perf_counter() - t0
    if not summ.converged:
        summ.messages.append(f"optimizer did not report convergence ({summ.return_code})")
    return summ


def _minimize_bfgs(f, grad, theta0, lower, maxeval, curvature=None, mirrors=None, rows=None, hess=None) -> OptSummary:
    theta0 = np.asarray(theta0, dtype=float)
    lower = np.asarray(lower, dtype=float)
    summ = OptSummary(optimizer="bfgs", theta_initial=theta0.copy(), lower=lower.copy(), maxeval=maxeval)
    t0 = time.perf_counter()
    if theta0.size == 0:
        summ.theta_final, summ.fmin, summ.feval, summ.converged = theta0, float(f(theta0)), 1, True
        summ.f_initial = summ.fmin
        summ.return_code = summ.stop_reason = "no parameters"
        return summ
    ev = Evaluations(f, grad)
    r = minimize_bfgs(ev, theta0, lower, maxeval=maxeval, curvature=curvature, mirrors=mirrors, rows=rows, hess=hess)
    summ.theta_final, summ.fmin = r.x, r.fun
    summ.f_initial, summ.feval, summ.geval = ev.f_initial, ev.nf, ev.ng
    summ.stop_reason = summ.return_code = r.stop_reason
    summ.converged = r.converged
    if r.restarts > r.row_restarts:
        summ.messages.append("restarted from the boundary: the criterion decreases inside")
    if r.row_restarts:
        summ.messages.append("restarted from a correlation of ±1: the criterion is lower there")
    if not r.converged:
        summ.messages.append(f"bfgs: stopped by {r.stop_reason}")
    summ.elapsed_s = time.perf_counter() - t0
    return summ


def _minimize_lbfgsb(f, grad, theta0, lower, maxeval) -> OptSummary:
    theta0 = np.asarray(theta0, dtype=float)
    summ = OptSummary(optimizer="lbfgsb", theta_initial=theta0.copy(), lower=np.asarray(lower, float).copy(),
                      maxeval=maxeval)
    t0 = time.perf_counter()
    box = {"n": 0, "g": 0}

    def fg(x):
        box["n"] += 1
        v = float(f(x))
        if box["n"] == 1:
            summ.f_initial = v
        box["g"] += 1
        return v, grad(x)

    if theta0.size == 0:
        summ.theta_final, summ.fmin, summ.feval, summ.converged = theta0, float(f(theta0)), 1, True
        summ.return_code = summ.stop_reason = "no parameters"
        return summ
    bounds = [(lb if np.isfinite(lb) else None, None) for lb in lower]
    # ftol: stop once a step gains less than 1e-12 relative (~2e-7 on InstEval's 2.4e5), well
    # inside lme4's own stopping error; the gradient is accurate to ~1e-7 relative.
    opts = {"ftol": 1e-12, "gtol": 1e-8, "maxcor": 20, "maxfun": maxeval, "maxiter": maxeval}
    r = minimize(fg, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
    # Restart from the edge (lme4's restart_edge): a scalar term's criterion is even in its θ, so
    # the gradient vanishes on the bound even where moving inwards lowers the criterion.
    for _ in range(3):
        x = np.asarray(r.x, dtype=float)
        better = None
        for j in np.flatnonzero(np.isfinite(lower) & (x <= lower + 1e-12)):
            probe = x.copy()
            probe[j] = lower[j] + 1e-3
            box["n"] += 1
            if f(probe) < r.fun - 1e-10:
                better = probe if better is None else np.maximum(better, probe)
        if better is None:
            break
        summ.messages.append("restarted from the boundary: the criterion decreases inside")
        r = minimize(fg, better, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
    summ.theta_final = np.asarray(r.x, dtype=float)
    summ.fmin = float(r.fun)
    summ.feval, summ.geval = box["n"], box["g"]
    summ.return_code = str(r.message)
    msg = summ.return_code.upper()
    summ.stop_reason = ("ftol" if "REL_REDUCTION" in msg else "projected gradient" if "PGTOL" in msg
                        else "maxeval" if "LIMIT" in msg else "rounding" if "ABNORMAL" in msg else summ.return_code)
    # L-BFGS-B stops on a relative-reduction test at machine precision, or on the projected gradient.
    summ.converged = bool(r.success) or "ABNORMAL" in str(r.message)
    if not r.success:
        summ.messages.append(f"L-BFGS-B: {r.message}")
    summ.elapsed_s = time.perf_counter() - t0
    return summ


BOUNDARY_XTOL = 1e-5   # lme4's boundary.tol: how close to its bound a component is tried on the bound


def snap_to_bounds(f: Callable[[np.ndarray], float], theta: np.ndarray, fmin: float, lower: np.ndarray,
                   xtol: float = BOUNDARY_XTOL) -> tuple[np.ndarray, float]:
    """Put the components of θ within ``xtol`` of their lower bound exactly on it, as
    MixedModels.jl does with ``xtol_zero_abs``: an optimiser stops near a bound, not on it, and
    where it stops depends on the rounding of f (the backends differ in the last bits).

    The snap is kept if f does not rise beyond rounding (a few ulps of f); all near components are
    tried together first, then one at a time.  Returns (θ, f(θ))."""
    theta = np.asarray(theta, dtype=float).copy()
    lower = np.asarray(lower, dtype=float)
    near = np.flatnonzero(np.isfinite(lower) & (theta != lower) & (theta - lower < xtol))
    if near.size == 0:
        return theta, float(fmin)
    slack = lambda fv: 1e-10 + 16 * np.finfo(float).eps * abs(fv)  # noqa: E731 - rounding of f

    def attempt(idx) -> bool:
        nonlocal theta, fmin
        trial = theta.copy()
        trial[idx] = lower[idx]
        ft = float(f(trial))
        if ft <= fmin + slack(fmin):
            theta, fmin = trial, ft
            return True
        return False

    if not attempt(near) and near.size > 1:
        for j in near:
            attempt(np.array([j]))
    return theta, float(fmin)


#: lme4's message for a singular fit, pointing to this package's explanation instead of R's help page.
SINGULAR_MESSAGE = "boundary (singular) fit: see help(fastlmm_ext.SingularFitWarning)"


def is_singular(theta: np.ndarray, lower: np.ndarray, tol: float = ON_BOUND) -> bool:
    """lme4's isSingular: some bounded element of θ within ``tol`` (lme4's 1e-4) of its bound."""
    theta, lower = np.asarray(theta), np.asarray(lower)
    fin = np.isfinite(lower)
    return bool(np.any(np.abs(theta[fin] - lower[fin]) < tol))


def _deriv12(f: Callable, x: np.ndarray, fx: float, delta: float = 1e-4):
    """Central-difference gradient and Hessian (the scheme of lme4's deriv12)."""
    n = x.size
    g = np.zeros(n)
    H = np.zeros((n, n))
    for i in range(n):
        e = np.zeros(n)
        e[i] = delta
        fp, fm = f(x + e), f(x - e)
        g[i] = (fp - fm) / (2 * delta)
        H[i, i] = (fp - 2 * fx + fm) / delta ** 2
        for j in range(i):
            e2 = np.zeros(n)
            e2[j] = delta
            H[i, j] = H[j, i] = (f(x + e + e2) - f(x + e - e2) - f(x - e + e2) + f(x - e - e2)) / (4 * delta ** 2)
    return g, H


def check_convergence(f: Callable, theta: np.ndarray, fmin: float, lower: np.ndarray, nobs: int,
                      grad_tol: float = 2e-3, hess_tol: float = 1e-6, nobs_max: int = 10_000,
                      npar_max: int = 10) -> tuple[list[str], dict]:
    """lme4's checkConv: max(min(|H^{-1/2} g|, |g|)) ≤ 2e-3 and a positive-definite Hessian.

    Skipped (as in lme4) for singular fits, and for nobs > 1e4 or more than 10 parameters,
    where the 2n² finite-difference evaluations cost more than the fit."""
    msgs: list[str] = []
    info: dict = {"checked": False}
    if is_singular(theta, lower) or nobs > nobs_max or theta.size > npar_max or theta.size == 0:
        return msgs, info
    g, H = _deriv12(f, theta, fmin)
    info.update(checked=True, gradient=g, hessian=H)
    try:
        scgrad = np.linalg.solve(np.linalg.cholesky(H).T, g)
        mingrad = np.minimum(np.abs(scgrad), np.abs(g))
        info["max_scaled_gradient"] = float(np.max(mingrad))
        if np.max(mingrad) > grad_tol:
            msgs.append(f"Model failed to converge with max|grad| = {np.max(mingrad):.6g} (tol = {grad_tol:g})")
    except np.linalg.LinAlgError:
        msgs.append("unable to evaluate scaled gradient")
    ev = np.linalg.eigvalsh(H)
    info["hessian_eigenvalues"] = ev
    if np.any(ev < -hess_tol):
        msgs.append(f"Model failed to converge: degenerate Hessian with {int(np.sum(ev < -hess_tol))} negative eigenvalues")
    elif ev.max() > 0 and ev.min() / ev.max() < hess_tol:
        msgs.append("Model is nearly unidentifiable: very large eigenvalue ratio")
    return msgs, info
