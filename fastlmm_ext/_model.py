"""LinearMixedModel: a frozen structure, a criterion backend and the optimiser glued together.

Pipeline (lme4's lFormula → mkLmerDevfun → optimizeLmer → mkMerMod):
    build_structure(formula, data)  →  backend.objective(θ)  →  minimize_theta  →  LmerResult
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from ._backends import Backend, BackendChoice, check_backend, choose_backend, make_backend
from ._chunked import structure_from_chunks
from ._crossprod import CrossProducts
from ._dask import is_dask_dataframe, structure_from_dask
from ._data import check_reml, reject_complex
from ._design import ModelStructure, build_structure
from ._exceptions import ArgumentError, ConvergenceWarning, DataError, SingularFitWarning
from ._optimize import (GRADIENT_OPTIMIZERS, SINGULAR_MESSAGE, OptSummary, check_convergence, is_singular,
                        minimize_theta, snap_to_bounds)
from ._hessian import model_hessian
from ._progress import Progress
from ._response import check_not_exact, response_crossproducts
from ._results import LmerResult
from ._start import column_mirrors, curvature_guess, moment_theta0, row_directions
from ._threads import check_threads, fit_threads

__all__ = ["LinearMixedModel"]

AUTO_GRADIENT_MIN_Q = 200   # optimizer="auto": the gradient optimiser ("bfgs") from this many random effects


class LinearMixedModel:
    """A linear mixed model  y = Xβ + Zb + ε  in lme4's formula syntax, built once.

    Model (lme4's parameterisation)::

        y | b ~ N(Xβ + Zb + offset, σ² W⁻¹),   b = Λ_θ u,   u ~ N(0, σ² I_q)

    with W the prior weights and Λ_θ block diagonal, one lower-triangular k×k factor T_i per
    random-effects term (Var(b_i) = σ² T_i T_iᵀ); θ stacks each T_i's lower triangle column by
    column, diagonal elements bounded below by 0.  Building the model parses the formula,
    checks the data, forms the design matrices and the cross-products of [Z X y], and (backend
    ``"compiled"``) runs CHOLMOD's symbolic analysis, once.  Then :meth:`objective` evaluates the
    profiled criterion at any θ, :meth:`fit` minimises it, and :meth:`refit` fits a new
    response on the same design.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``: fixed effects as in R
        (R's dialect, see README), random-effects terms ``(expr | factor)``, ``(expr || factor)``
        (uncorrelated), ``(1 | a/b)`` (nested), ``offset(x)``.
    data : pandas.DataFrame, polars.DataFrame, dict of columns or dask.dataframe.DataFrame
        The data (also an object with ``.to_pandas()``; see ``_data.as_frame``).  Rows with a missing value in a used
        column are dropped with a ``MissingValuesWarning``.  A Dask DataFrame is reduced to
        cross-products per partition on the active Dask scheduler (``_dask``); the model then
        keeps no rows (see :func:`lmer_chunked` for what that means).
    REML : bool, default True
        Fit by restricted maximum likelihood (lme4's default) or, if False, maximum likelihood.
    backend : {"auto", "compiled", "blocked", "single", "reference"}, default "auto"
        How the criterion is evaluated.  ``"compiled"``: the Cython kernel over CHOLMOD
        (numeric refactorization of P(ΛᵀZᵀWZΛ + I)Pᵀ per θ).  ``"blocked"``: MixedModels.jl's
        two-block layout (block-diagonal first term, dense Schur complement of the scalar later
        terms by LAPACK), with the analytic gradient.  ``"single"``: one random-effects term
        only; ΛᵀZᵀWZΛ + I is block diagonal, solved level by level in closed form (compiled, no
        CHOLMOD), with the analytic gradient.  ``"reference"``: the dense NumPy path,
        equation by equation, for checking.  ``"auto"``: of ``"compiled"`` and ``"blocked"``, the
        one with the lower estimated time per evaluation (``_cost``: CHOLMOD's flop count from
        its symbolic analysis against the dense block's q₂³/3 and Gram products); the estimates
        and the reason are in :attr:`backend_choice`.
    weights : str or array-like, optional
        Prior weights wᵢ ≥ 0 (lme4's ``weights``): a column name or one value per row of ``data``.
    offset : str or array-like, optional
        A known term added to the linear predictor: a column name or one value per row (adds to
        any ``offset(x)`` in the formula).
    ordering : {"default", "amd", "natural"}, default "default"
        CHOLMOD's fill-reducing ordering P: backend ``"compiled"`` only (``"auto"`` with another
        ordering than ``"default"`` chooses ``"compiled"``; ``"blocked"``, ``"single"`` and
        ``"reference"`` refuse one with an ``ArgumentError``).
    contrasts : dict, optional
        R's contrasts of factors of the fixed part, ``{column: contrast}`` as lme4's
        ``contrasts = list(...)``: ``"contr.treatment"`` (R's and the default), ``"contr.SAS"``
        (last level as reference), ``"contr.sum"``, ``"contr.helmert"``, ``"contr.poly"`` (the
        default of ordered factors), ``fl.contr.treatment(base="b")`` (reference level by its
        label), or a matrix / DataFrame with one row per level (columns: the coefficients; names
        from a DataFrame's columns, else 1, 2, ...).  Coefficients are named as R names them
        (``Product1``, ``Incomehigh``, ``temp.L``).  Random-effects terms keep R's defaults, as in lme4.
    allow_python : bool, default False
        By default a formula is read in R's dialect and can evaluate only data columns, R's
        functions (log, poly, ns, ...) and numpy ufuncs (``_rformula``); anything else is refused.
        ``allow_python=True`` evaluates other terms as Python: **the formula can then run any
        code**, so never set it for formulas you did not write.
    threads : int, optional
        Threads for the fit's BLAS and OpenMP work (CHOLMOD's factorization, the blocked path's
        dense factorization).  Default None: at each fit, the cores free at that moment (the
        CPUs this process may use, by affinity and cgroup quota, less those other processes keep
        busy; one when only one is free), see ``_threads``.  The count used is in
        ``res.optsummary.threads``.
    structure, crossprod : optional
        Internal: an already built :class:`ModelStructure` and its :class:`CrossProducts`
        (used by :meth:`from_chunks`, Dask and the bootstrap); ``data`` is then ignored.

    Attributes
    ----------
    structure : ModelStructure
        y, X, Z, the sorted random-effects terms, names and levels (θ-independent).
    REML : bool
    backend : the criterion backend (``backend_name`` says which).
    theta0, lower : numpy.ndarray
        lme4's starting θ (1 on the diagonals, 0 elsewhere) and the lower bounds of θ.

    Examples
    --------
    >>> m = LinearMixedModel("Reaction ~ Days + (Days | Subject)", sleepstudy)   # doctest: +SKIP
    >>> m.objective([1.0, 0.0, 1.0])   # lme4's devfun(θ)                        # doctest: +SKIP
    >>> res = m.fit()                                                             # doctest: +SKIP
    """

    def __init__(self, formula: str, data, REML: bool = True, backend: str = "auto",
                 weights=None, offset=None, ordering: str = "default",
                 structure: ModelStructure | None = None, crossprod=None, *, contrasts=None,
                 allow_python: bool = False, threads: int | None = None):
        REML = check_reml(REML)
        check_backend(backend, ordering)
        threads = check_threads(threads)
        if structure is None and is_dask_dataframe(data):
            structure, crossprod = structure_from_dask(formula, data, weights, offset, allow_python, contrasts)
        # The fit's thread block around the build too: its BLAS-1/2 calls (the OLS shift, the
        # exact-fit check) would otherwise wake the bundled OpenBLAS's threads, which on a busy
        # machine costs more than the calls (InstEval's exact-fit check: 20 ms instead of 0.1 ms).
        with fit_threads(threads) as n:
            s = structure if structure is not None else build_structure(formula, data, weights, offset,
                                                                        allow_python, contrasts)
            if crossprod is None and backend != "reference":
                crossprod = CrossProducts.from_structure(s)
            choice = choose_backend(s, backend, ordering=ordering, crossprod=crossprod, threads=n)
            be = make_backend(s, choice, ordering=ordering, crossprod=crossprod)
        self._assemble(s, REML, be, threads, dataclasses.replace(choice, analysis=None))   # handed over

    @property
    def backend_name(self) -> str:
        """The backend in use ("auto" resolved to "compiled" or "blocked")."""
        return self.backend.name

    @property
    def ordering(self) -> str | None:
        """CHOLMOD's fill-reducing ordering in use (None for the blocked and reference backends)."""
        return self.backend.ordering

    def _assemble(self, s: ModelStructure, REML: bool, backend: Backend, threads: int | None = None,
                  choice: BackendChoice | None = None) -> None:
        self.structure = s
        self.REML = bool(REML)
        self.backend = backend
        self.threads = threads                  # None: the free cores at each fit (_threads)
        #: how the backend was chosen: "auto"'s estimates of each path's time per evaluation
        self.backend_choice = choice if choice is not None else BackendChoice(backend.name, backend.name,
                                                                              "built on another model's backend")

    @classmethod
    def from_chunks(cls, formula: str, chunks, REML: bool = True, *, weights: str | None = None,
                    offset: str | None = None, chunksize: int = 500_000, backend: str = "auto",
                    ordering: str = "default", progress: bool = False, contrasts=None,
                    allow_python: bool = False, threads: int | None = None) -> "LinearMixedModel":
        """A model built from chunks of rows without holding them all (see :func:`lmer_chunked`
        for what ``chunks`` may be and what the model then keeps; ``threads`` as for the class)."""
        REML = check_reml(REML)
        threads = check_threads(threads)
        with fit_threads(threads):        # small BLAS calls per chunk (see __init__)
            s, cp = structure_from_chunks(formula, chunks, weights=weights, offset=offset, chunksize=chunksize,
                                          progress=progress, allow_python=allow_python, contrasts=contrasts)
        return cls(formula, None, REML=REML, backend=backend, ordering=ordering, structure=s, crossprod=cp,
                   threads=threads)

    @classmethod
    def _from_backend(cls, s: ModelStructure, REML: bool, backend: Backend, threads: int | None = None,
                      choice: BackendChoice | None = None) -> LinearMixedModel:
        """A model around an existing backend (no formula parsing, no cross-products)."""
        m = cls.__new__(cls)
        m._assemble(s, REML, backend, threads, choice)
        return m

    def ml_twin(self) -> LinearMixedModel:
        """This model fitted by maximum likelihood (itself if it is one), on the same backend: the
        criterion's inputs do not depend on REML (lme4's refitML; used by ``anova`` and the profile)."""
        return self if not self.REML else LinearMixedModel._from_backend(self.structure, False, self.backend,
                                                                         self.threads, self.backend_choice)

    # ------------------------------------------------------------------ criterion
    @property
    def theta0(self) -> np.ndarray:
        return self.structure.theta0

    @property
    def lower(self) -> np.ndarray:
        return self.structure.lower

    def objective(self, theta) -> float:
        """Profiled REML criterion (REML=True) or ML deviance at θ, as lme4's ``devfun(θ)``.

        With L_θ L_θᵀ = Λᵀ ZᵀWZ Λ + I, R_X the fixed-effects factor and r²(θ) the penalised
        weighted residual sum of squares at the conditional estimates β̂(θ), û(θ)::

            ML:    −2ℓ(θ)   = log|L_θ|² − log|W| + n [1 + log(2π r²/n)]
            REML:  −2ℓ_R(θ) = log|L_θ|² + log|R_X|² − log|W| + (n−p) [1 + log(2π r²/(n−p))]

        ``theta``: array-like of length ``len(lower)``, finite, ≥ :attr:`lower`."""
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
            verbose: bool | Progress = False) -> LmerResult:
        """Minimise the profiled criterion over θ ≥ :attr:`lower` and build the result.

        Parameters
        ----------
        optimizer : {"auto", "bobyqa", "bfgs", "lbfgsb", "nelder_mead", "cobyla"}, default "auto"
            ``"bobyqa"``: NLopt's BOBYQA, derivative-free, lme4's default (``nloptwrap``);
            ``"bfgs"``: projected BFGS with the analytic gradient of the profiled criterion
            (backends ``"compiled"``, ``"blocked"`` and ``"single"``; ``_bfgs.py``): stops when the scaled
            gradient's predicted decrease ½ gᵀB⁻¹g is below 1e-7 or f's rounding, and evaluates
            no θ twice; ``"lbfgsb"``: SciPy's L-BFGS-B with the same gradient;
            ``"nelder_mead"``, ``"cobyla"``: NLopt's.  ``"auto"``: ``"bfgs"`` when the backend
            has the gradient and there are at least 200 random effects, else BOBYQA (for small
            q a criterion evaluation costs little).  The
            gradient optimisers start from moment estimates (``_start.py``).
        theta0 : array-like, optional
            Starting θ (default: lme4's, 1 on the diagonals and 0 elsewhere).
        check_conv : bool, default True
            lme4's post-fit checks (skipped for singular fits, n > 10⁴ or dim θ > 10): the
            scaled gradient max|H^{-1/2} g| ≤ 2e-3 and a positive-definite Hessian, by finite
            differences; failures are ``ConvergenceWarning``s and ``messages``.
        ftol_abs, xtol_abs : float, default 1e-12, 1e-10
            NLopt's stopping tolerances on the criterion and on θ (tighter than lme4's 1e-8,
            so the optimum is at least as good as lme4's).
        maxeval : int, default 100000
            Most criterion evaluations.
        verbose : bool or Progress, default False
            Show progress (evaluations, best criterion, elapsed time) on stderr; a
            ``_progress.Progress`` is reported to instead (and left open: the caller closes it).

        Returns
        -------
        LmerResult
            Estimates, variance components, conditional modes, criteria and diagnostics (see
            :class:`LmerResult`).  A singular fit (some diagonal θ within 1e-4 of 0) raises a
            ``SingularFitWarning``; a failed convergence check a ``ConvergenceWarning``."""
        # One block around the whole fit, result included: the thread count is chosen once, and the
        # small BLAS calls that build the result would otherwise wake the bundled pool's threads.
        with fit_threads(self.threads):
            res, warned = self._fit(optimizer=optimizer, theta0=theta0, check_conv=check_conv, ftol_abs=ftol_abs,
                                    xtol_abs=xtol_abs, maxeval=maxeval, verbose=verbose)
        for category, message in warned:
            warnings.warn(message, category, stacklevel=3)
        return res

    def _fit(self, optimizer: str, theta0, check_conv: bool, ftol_abs: float, xtol_abs: float, maxeval: int,
             verbose: bool | Progress) -> tuple[LmerResult, list[tuple[type, str]]]:
        """:meth:`fit`, returning the warnings it would raise as (category, message) pairs
        (``fit_many`` records them per response instead of raising them)."""
        warned: list[tuple[type, str]] = []
        be = self.backend
        grad = (lambda th: be.gradient(th, self.REML)) if be.has_gradient else None
        if optimizer in GRADIENT_OPTIMIZERS and grad is None:
            raise ArgumentError(f"optimizer {optimizer!r} needs the analytic gradient, which backend {be.name!r} does "
                                "not have; use backend='compiled' or 'blocked', or a derivative-free optimizer")
        own = not isinstance(verbose, Progress)
        progress = Progress(bool(verbose), "fit", "evaluations", label="REML criterion" if self.REML else "deviance") \
            if own else verbose

        def crit(th):
            v = be.objective(th, self.REML)
            progress.update(1, v)
            return v
        if optimizer == "auto":
            # The gradient costs about two criterion evaluations and saves 5-20x of them.  For small
            # q a criterion evaluation costs little (sleepstudy, compiled: BOBYQA 2.1 ms CPU, bfgs
            # 3.1 ms; blocked Pastes/Penicillin: bfgs 30% less CPU, but BOBYQA keeps the printed
            # digits of small fits where they were, e.g. Penicillin's Var(plate) 0.7169 as lme4).
            optimizer = "bfgs" if grad is not None and self.structure.q >= AUTO_GRADIENT_MIN_Q else "bobyqa"
        if theta0 is not None:
            th0 = np.asarray(theta0, dtype=float)
        elif optimizer in GRADIENT_OPTIMIZERS:
            # Moment estimates halve a gradient optimiser's evaluations on large crossed designs (_start.py);
            # BOBYQA keeps lme4's start, where it was measured not to gain.
            th0 = moment_theta0(self.structure, be.crossprod)
        else:
            th0 = self.theta0
        try:
            with fit_threads(self.threads) as threads:      # the outer block's count, inside fit()
                summ = minimize_theta(crit, th0, self.lower, optimizer=optimizer, ftol_abs=ftol_abs,
                                      xtol_abs=xtol_abs, maxeval=maxeval, grad=grad,
                                      **self._bfgs_hints(th0, optimizer))
            summ.threads = threads
        finally:
            if own:
                progress.close()
        plain = lambda th: self.backend.objective(th, self.REML)  # noqa: E731 - no progress after the fit
        # An optimum on the boundary is reported exactly on it, whatever the backend's rounding.
        theta, fmin = snap_to_bounds(plain, summ.theta_final, summ.fmin, self.lower)
        summ.theta_final, summ.fmin = theta, fmin
        singular = is_singular(theta, self.lower)
        messages = list(summ.messages)
        conv_info: dict = {}
        if singular:
            messages.append(SINGULAR_MESSAGE)
            warned.append((SingularFitWarning, SINGULAR_MESSAGE))
        elif check_conv:
            msgs, conv_info = check_convergence(plain, theta, fmin, self.lower, self.structure.n)
            messages += msgs
            warned += [(ConvergenceWarning, m) for m in msgs]
        if not summ.converged:
            warned += [(ConvergenceWarning, m) for m in summ.messages]
        state = self.backend.state(theta)
        return LmerResult(self, state, summ, fmin, singular, messages, conv_info), warned

    def _bfgs_hints(self, theta0: np.ndarray, optimizer: str) -> dict:
        """The starting curvature, the sign symmetries of θ (``_start``) and the Newton steps'
        Hessian model (``_hessian``) for ``optimizer="bfgs"``."""
        if optimizer != "bfgs":
            return {}
        return {"curvature": curvature_guess(self.structure, self.backend.crossprod, theta0),
                "mirrors": column_mirrors(self.structure), "rows": row_directions(self.structure),
                "hess": model_hessian(self.structure, self.backend, self.REML)}

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
        base = self.backend.crossprod      # None for the reference backend, which works on the rows
        if crossprod is None:
            if base is not None:
                crossprod = response_crossproducts(self.structure, base, y)[0]
            else:
                check_not_exact(self.structure, y)
        return LinearMixedModel._from_backend(s, self.REML, self.backend.with_response(s, crossprod), self.threads,
                                              self.backend_choice)
