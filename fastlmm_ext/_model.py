"""LinearMixedModel: a frozen structure, a criterion backend and the optimiser glued together.

Pipeline (lme4's lFormula → mkLmerDevfun → optimizeLmer → mkMerMod):
    build_structure(formula, data)  →  backend.objective(θ)  →  minimize_theta  →  LmerResult
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from ._backends import BACKENDS, make_backend
from ._design import ModelStructure, build_structure
from ._exceptions import DataError, SingularFitWarning
from ._progress import Progress
from ._threads import bundled_blas_single_thread
from ._optimize import OptSummary, check_convergence, is_singular, minimize_theta, warn_convergence
from ._results import LmerResult

__all__ = ["LinearMixedModel", "lmer"]

AUTO_LBFGSB_MIN_Q = 200   # optimizer="auto": L-BFGS-B with the analytic gradient from this many random effects


class LinearMixedModel:
    """A linear mixed model  y = Xβ + Zb + ε  in lme4's formula syntax.

    Build once (formula parsing, design matrices, cross-products, CHOLMOD's symbolic
    analysis), then evaluate :meth:`objective` at any θ, :meth:`fit`, or :meth:`refit` a new
    response on the same design.

    Parameters
    ----------
    formula : lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas DataFrame (or anything ``pd.DataFrame`` accepts).
    REML : fit by REML (default) or maximum likelihood.
    backend : ``"compiled"`` (CHOLMOD kernel, default), ``"reference"`` (dense NumPy path) or
        ``"blocked"`` (two-block dense-Schur layout with an analytic gradient; needs scalar terms
        after the first).
    weights, offset : prior weights and an offset, as column names or arrays.
    ordering : fill-reducing ordering for CHOLMOD: ``"default"``, ``"amd"`` or ``"natural"``.
    """

    def __init__(self, formula: str, data, REML: bool = True, backend: str = "compiled",
                 weights=None, offset=None, ordering: str = "default",
                 structure: ModelStructure | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.structure = structure if structure is not None else build_structure(formula, data, weights, offset)
        self.REML = bool(REML)
        self.ordering = ordering
        self.backend_name = backend
        opts = {"ordering": ordering} if backend == "compiled" else {}
        self.backend = make_backend(self.structure, backend, **opts)
        w = self.structure.weights
        self._sum_log_w = 0.0 if w is None else float(np.sum(np.log(w[w > 0])))

    # ------------------------------------------------------------------ criterion
    @property
    def theta0(self) -> np.ndarray:
        return self.structure.theta0

    @property
    def lower(self) -> np.ndarray:
        return self.structure.lower

    def objective(self, theta) -> float:
        """Profiled REML criterion (REML=True) or ML deviance at θ, as lme4's devfun(θ)."""
        theta = np.atleast_1d(np.asarray(theta, dtype=float))
        if theta.shape != (self.structure.ntheta,):
            raise ValueError(f"theta must have length {self.structure.ntheta}, got shape {theta.shape}")
        if not np.isfinite(theta).all():
            raise ValueError(f"theta must be finite, got {theta.tolist()}")
        if np.any(theta < self.lower):
            raise ValueError(f"theta violates its lower bounds (0 on diagonal elements): {theta.tolist()}")
        return float(self.backend.objective(theta, self.REML))

    # ------------------------------------------------------------------ fitting
    def fit(self, optimizer: str = "auto", theta0=None, check_conv: bool = True,
            ftol_abs: float = 1e-12, xtol_abs: float = 1e-10, maxeval: int = 100_000,
            verbose: bool = False) -> LmerResult:
        """Minimise the profiled criterion over θ ≥ lower and build the result.

        ``verbose=True`` shows progress (evaluations, best criterion, elapsed) on stderr."""
        th0 = self.theta0 if theta0 is None else np.asarray(theta0, dtype=float)
        progress = Progress(verbose, "REML criterion" if self.REML else "deviance")

        def crit(th):
            v = self.backend.objective(th, self.REML)
            progress.update(v)
            return v
        grad_fn = getattr(self.backend, "gradient", None)
        grad = (lambda th: grad_fn(th, self.REML)) if grad_fn is not None else None
        if optimizer == "auto":
            # The gradient costs about two criterion evaluations and saves 3-6x of them; for small
            # q a criterion evaluation is cheaper than the gradient's Python overhead.
            optimizer = "lbfgsb" if grad is not None and self.structure.q >= AUTO_LBFGSB_MIN_Q else "bobyqa"
        try:
            with bundled_blas_single_thread():
                summ = minimize_theta(crit, th0, self.lower, optimizer=optimizer, ftol_abs=ftol_abs,
                                      xtol_abs=xtol_abs, maxeval=maxeval, grad=grad)
        finally:
            progress.close()
        theta = np.array(summ.theta_final, dtype=float)
        # Values within rounding of a bound are put on it, as lme4 does for θ ≈ 0.
        on_bound = np.isfinite(self.lower) & (np.abs(theta - self.lower) < 1e-12)
        theta[on_bound] = self.lower[on_bound]
        plain = lambda th: self.backend.objective(th, self.REML)  # noqa: E731 - no progress after the fit
        fmin = float(plain(theta)) if on_bound.any() else summ.fmin
        summ.theta_final, summ.fmin = theta, fmin
        singular = is_singular(theta, self.lower)
        messages = list(summ.messages)
        conv_info: dict = {}
        if singular:
            messages.append("boundary (singular) fit: see help('isSingular')")
            warnings.warn("boundary (singular) fit: see help('isSingular')", SingularFitWarning, stacklevel=3)
        elif check_conv:
            msgs, conv_info = check_convergence(plain, theta, fmin, self.lower, self.structure.n)
            messages += msgs
            warn_convergence(msgs)
        if not summ.converged:
            warn_convergence([m for m in summ.messages])
        state = self.backend.state(theta)
        return LmerResult(self, state, summ, fmin, singular, messages, conv_info)

    def result_at(self, theta) -> LmerResult:
        """The result object at a given θ, without optimising (e.g. at lme4's estimate, to compare
        conditional modes and variances to the last digit)."""
        theta = np.atleast_1d(np.asarray(theta, dtype=float))
        crit = self.objective(theta)
        summ = OptSummary(optimizer="none", theta_initial=theta.copy(), lower=self.lower.copy(),
                          f_initial=crit, theta_final=theta.copy(), fmin=crit, feval=1,
                          return_code="evaluated at a given theta", converged=True)
        singular = is_singular(theta, self.lower)
        return LmerResult(self, self.backend.state(theta), summ, crit, singular, [])

    def refit(self, y, **fit_options) -> LmerResult:
        """Fit the same design to a new response vector (one value per used row)."""
        y = np.asarray(y, dtype=float).ravel()
        if y.shape[0] != self.structure.n:
            raise DataError(f"new response has length {y.shape[0]}, the model has {self.structure.n} observations")
        if not np.isfinite(y).all():
            raise DataError("new response has missing or infinite values")
        s = dataclasses.replace(self.structure, y=y)
        m = LinearMixedModel(s.formula, None, REML=self.REML, backend=self.backend_name,
                             ordering=self.ordering, structure=s)
        return m.fit(**fit_options)


def lmer(formula: str, data, REML: bool = True, backend: str = "compiled", *, weights=None, offset=None,
         ordering: str = "default", **fit_options) -> LmerResult:
    """Fit a linear mixed model with lme4's formula syntax; see :class:`LinearMixedModel`.

    ``fit_options`` go to :meth:`LinearMixedModel.fit` (optimizer, theta0, check_conv, ...)."""
    model = LinearMixedModel(formula, data, REML=REML, backend=backend, weights=weights, offset=offset,
                             ordering=ordering)
    return model.fit(**fit_options)
