"""LinearMixedModel: a frozen structure, a criterion backend and the optimiser glued together.

Pipeline (lme4's lFormula → mkLmerDevfun → optimizeLmer → mkMerMod):
    build_structure(formula, data)  →  backend.objective(θ)  →  minimize_theta  →  LmerResult
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from ._backends import BACKENDS, make_backend
from ._dask import is_dask_dataframe
from ._data import reject_complex
from ._design import ModelStructure, build_structure
from ._exceptions import ArgumentError, ConvergenceWarning, DataError, SingularFitWarning
from ._progress import Progress
from ._threads import bundled_blas_single_thread
from ._optimize import OptSummary, check_convergence, is_singular, minimize_theta, snap_to_bounds
from ._response import check_not_exact, response_crossproducts
from ._results import LmerResult
from ._start import moment_theta0

__all__ = ["LinearMixedModel", "lmer", "check_reml"]

AUTO_LBFGSB_MIN_Q = 200   # optimizer="auto": L-BFGS-B with the analytic gradient from this many random effects


def check_reml(REML) -> bool:
    """``REML`` as a bool: True/False (NumPy's too) or the integers 1/0, as R's ``if (REML)``
    coerces numbers; anything else (a string such as "no", None, an array) is refused rather than
    read by Python's truthiness, under which "no" would mean REML."""
    if isinstance(REML, (bool, np.bool_)):
        return bool(REML)
    if isinstance(REML, (int, np.integer)) and REML in (0, 1):
        return bool(REML)
    raise ArgumentError(f"REML must be True or False, got {REML!r} ({type(REML).__name__})")


class LinearMixedModel:
    """A linear mixed model  y = Xβ + Zb + ε  in lme4's formula syntax.

    Build once (formula parsing, design matrices, cross-products, CHOLMOD's symbolic
    analysis), then evaluate :meth:`objective` at any θ, :meth:`fit`, or :meth:`refit` a new
    response on the same design.

    Parameters
    ----------
    formula : lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``.
    data : pandas DataFrame (or a polars DataFrame, an object with ``.to_pandas()``, a dict of
        columns: see ``_data.as_frame``), or a ``dask.dataframe.DataFrame``:
        its cross-products are then computed per partition on the active Dask scheduler and
        reduced (``_dask``); the model keeps no rows (see :func:`lmer_chunked` for what that means).
    REML : fit by REML (default) or maximum likelihood.
    backend : ``"auto"`` (default: ``"blocked"`` when it applies and the later terms' Schur
        complement fills its dense block, else ``"compiled"``; see ``choose_backend``),
        ``"compiled"`` (CHOLMOD kernel), ``"blocked"`` (two-block layout: block-diagonal first term,
        dense Schur complement of the scalar later terms by LAPACK, sparse Gram products in
        Cython) or ``"reference"`` (dense NumPy path, for checking).
    weights, offset : prior weights and an offset, as column names or arrays.
    ordering : fill-reducing ordering for CHOLMOD: ``"default"``, ``"amd"`` or ``"natural"``.
    contrasts : R's contrasts of factors of the fixed part, ``{column: contrast}`` as lme4's
        ``contrasts = list(...)``: ``"contr.treatment"`` (R's and the default), ``"contr.SAS"``
        (last level as reference), ``"contr.sum"``, ``"contr.helmert"``, ``"contr.poly"`` (the
        default of ordered factors), ``fl.contr.treatment(base="b")`` (reference level by its
        label), or a matrix / DataFrame with one row per level (columns: the coefficients; names
        from a DataFrame's columns, else 1, 2, ...).  Coefficients are named as R names them
        (``Product1``, ``Incomehigh``, ``temp.L``).  Random-effects terms keep R's defaults, as in lme4.
    allow_python : by default a formula is read in R's dialect and can evaluate only data columns,
        R's functions (log, poly, ns, ...) and numpy ufuncs (``_rformula``); anything else is refused.
        ``allow_python=True`` evaluates other terms as Python: **the formula can then run any
        code**, so never set it for formulas you did not write.
    """

    def __init__(self, formula: str, data, REML: bool = True, backend: str = "auto",
                 weights=None, offset=None, ordering: str = "default",
                 structure: ModelStructure | None = None, crossprod=None, *, contrasts=None,
                 allow_python: bool = False):
        REML = check_reml(REML)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if structure is None and is_dask_dataframe(data):
            from ._dask import structure_from_dask
            structure, crossprod = structure_from_dask(formula, data, weights, offset, allow_python, contrasts)
        s = structure if structure is not None else build_structure(formula, data, weights, offset,
                                                                    allow_python, contrasts)
        if not s.has_rows and backend == "reference":
            raise ValueError(f"backend {backend!r} needs the model's rows; a model built from accumulated "
                             "cross-products (lmer_chunked, Dask) uses backend='auto', 'compiled' or 'blocked'")
        opts = {"ordering": ordering} if backend in ("compiled", "auto") else {}
        if crossprod is not None and backend != "reference":
            opts["crossprod"] = crossprod
        be = make_backend(s, backend, **opts)
        self._assemble(s, REML, ordering, be)

    @property
    def backend_name(self) -> str:
        """The backend in use ("auto" resolved to "compiled" or "blocked")."""
        return self.backend.name

    def _assemble(self, s: ModelStructure, REML: bool, ordering: str, backend) -> None:
        self.structure = s
        self.REML = bool(REML)
        self.ordering = ordering
        self.backend = backend
        w = s.weights
        cp = getattr(backend, "cp", None)
        self._sum_log_w = cp.sum_log_w if cp is not None else 0.0 if w is None else float(np.sum(np.log(w[w > 0])))

    @classmethod
    def from_chunks(cls, formula: str, chunks, REML: bool = True, *, weights: str | None = None,
                    offset: str | None = None, chunksize: int = 500_000, backend: str = "auto",
                    ordering: str = "default", progress: bool = False, contrasts=None,
                    allow_python: bool = False) -> "LinearMixedModel":
        """A model built from chunks of rows without holding them all (see :func:`lmer_chunked`
        for what ``chunks`` may be and what the model then keeps)."""
        from ._chunked import structure_from_chunks
        REML = check_reml(REML)
        s, cp = structure_from_chunks(formula, chunks, weights=weights, offset=offset, chunksize=chunksize,
                                      progress=progress, allow_python=allow_python, contrasts=contrasts)
        return cls(formula, None, REML=REML, backend=backend, ordering=ordering, structure=s, crossprod=cp)

    @classmethod
    def _from_backend(cls, s: ModelStructure, REML: bool, ordering: str, backend) -> LinearMixedModel:
        """A model around an existing backend (no formula parsing, no cross-products)."""
        m = cls.__new__(cls)
        m._assemble(s, REML, ordering, backend)
        return m

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
        # One single-thread block around the whole fit, result included: the small BLAS calls
        # that build the result would otherwise wake the bundled pool's threads (see _threads).
        with bundled_blas_single_thread():
            res, warned = self._fit(optimizer=optimizer, theta0=theta0, check_conv=check_conv, ftol_abs=ftol_abs,
                                    xtol_abs=xtol_abs, maxeval=maxeval, verbose=verbose)
        for category, message in warned:
            warnings.warn(message, category, stacklevel=3)
        return res

    def _fit(self, optimizer: str, theta0, check_conv: bool, ftol_abs: float, xtol_abs: float, maxeval: int,
             verbose: bool) -> tuple[LmerResult, list[tuple[type, str]]]:
        """:meth:`fit`, returning the warnings it would raise as (category, message) pairs
        (``fit_many`` records them per response instead of raising them)."""
        warned: list[tuple[type, str]] = []
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
        if theta0 is not None:
            th0 = np.asarray(theta0, dtype=float)
        elif optimizer == "lbfgsb" and getattr(self.backend, "cp", None) is not None:
            # Moment estimates halve L-BFGS-B's evaluations on large crossed designs (_start.py);
            # BOBYQA keeps lme4's start, where it was measured not to gain.
            th0 = moment_theta0(self.structure, self.backend.cp)
        else:
            th0 = self.theta0
        try:
            with bundled_blas_single_thread():
                summ = minimize_theta(crit, th0, self.lower, optimizer=optimizer, ftol_abs=ftol_abs,
                                      xtol_abs=xtol_abs, maxeval=maxeval, grad=grad)
        finally:
            progress.close()
        plain = lambda th: self.backend.objective(th, self.REML)  # noqa: E731 - no progress after the fit
        # An optimum on the boundary is reported exactly on it, whatever the backend's rounding.
        theta, fmin = snap_to_bounds(plain, summ.theta_final, summ.fmin, self.lower)
        summ.theta_final, summ.fmin = theta, fmin
        singular = is_singular(theta, self.lower)
        messages = list(summ.messages)
        conv_info: dict = {}
        if singular:
            messages.append("boundary (singular) fit: see help('isSingular')")
            warned.append((SingularFitWarning, "boundary (singular) fit: see help('isSingular')"))
        elif check_conv:
            msgs, conv_info = check_convergence(plain, theta, fmin, self.lower, self.structure.n)
            messages += msgs
            warned += [(ConvergenceWarning, m) for m in msgs]
        if not summ.converged:
            warned += [(ConvergenceWarning, m) for m in summ.messages]
        state = self.backend.state(theta)
        return LmerResult(self, state, summ, fmin, singular, messages, conv_info), warned

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
        """Fit the same design to a new response vector (one value per used row), as lme4's
        ``refit(fit, newresp)``; the answer equals a fresh :func:`lmer` with that response.

        Only the response's cross-products ZᵀWỹ, XᵀWỹ, ỹᵀWỹ are computed (ỹ = y − offset − X b,
        b its weighted OLS coefficients); ZᵀWZ, ZᵀWX, XᵀWX and, for the compiled backend,
        CHOLMOD's symbolic analysis are reused (the new model shares this one's kernel, so
        the two must not be used from different threads at the same time).
        ``fit_options`` go to :meth:`fit`."""
        return self._with_response(self._check_response(y)).fit(**fit_options)

    def _check_response(self, y) -> np.ndarray:
        if getattr(self.structure, "y", None) is None:   # a model fitted from accumulated cross-products
            raise DataError("refit needs the model's rows (X and Z); this model has only cross-products")
        reject_complex(y, "y", what="new response")
        y = np.asarray(y, dtype=float).ravel()
        if y.shape[0] != self.structure.n:
            raise DataError(f"new response has length {y.shape[0]}, the model has {self.structure.n} observations")
        if not np.isfinite(y).all():
            raise DataError("new response has missing or infinite values")
        return y

    def _with_response(self, y: np.ndarray, crossprod=None) -> LinearMixedModel:
        """This model with response ``y`` (checked by the caller); ``crossprod`` from
        :func:`response_crossproducts` if already computed (``fit_many`` does many at once)."""
        s = dataclasses.replace(self.structure, y=y)
        base = getattr(self.backend, "cp", None)      # the reference backend has no cross-products
        if crossprod is None:
            if base is not None:
                crossprod = response_crossproducts(self.structure, base, y)[0]
            else:
                check_not_exact(self.structure, y)
        backend = self.backend.with_response(s, crossprod)
        return LinearMixedModel._from_backend(s, self.REML, self.ordering, backend)


def lmer(formula: str, data, REML: bool = True, backend: str = "auto", *, weights=None, offset=None,
         ordering: str = "default", contrasts=None, allow_python: bool = False, **fit_options) -> LmerResult:
    """Fit a linear mixed model with lme4's formula syntax; see :class:`LinearMixedModel`
    (``contrasts``: R's contrasts of fixed-effect factors; ``allow_python=True`` lets the formula
    run arbitrary Python code).

    ``fit_options`` go to :meth:`LinearMixedModel.fit` (optimizer, theta0, check_conv, ...)."""
    model = LinearMixedModel(formula, data, REML=REML, backend=backend, weights=weights, offset=offset,
                             ordering=ordering, contrasts=contrasts, allow_python=allow_python)
    return model.fit(**fit_options)
