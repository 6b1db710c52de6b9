"""The front door: ``lmer`` and ``lmer_chunked``, each a model built from its data source and fitted.

    lmer(formula, data)            →  LinearMixedModel(formula, data).fit()
    lmer_chunked(formula, chunks)  →  LinearMixedModel.from_chunks(formula, chunks).fit()

(lme4's ``lmer`` = ``lFormula`` → ``mkLmerDevfun`` → ``optimizeLmer`` → ``mkMerMod``).  The data
source decides how the model is built: a data frame through ``_design``, a Dask DataFrame through
``_dask`` (cross-products per partition), chunks of rows through ``_chunked``; the model and its
fit are the same from there on.
"""
from __future__ import annotations

from ._chunked import DEFAULT_CHUNKSIZE
from ._model import LinearMixedModel
from ._results import LmerResult
from ._threads import fit_threads

__all__ = ["lmer", "lmer_chunked"]


def lmer(formula: str, data, REML: bool = True, backend: str = "auto", *, weights=None, offset=None,
         ordering: str = "default", contrasts=None, allow_python: bool = False, threads: int | None = None,
         **fit_options) -> LmerResult:
    """Fit a linear mixed model with lme4's formula syntax, as lme4's ``lmer``.

    Model::

        y | b ~ N(Xβ + Zb + offset, σ² W⁻¹),   b = Λ_θ u,   u ~ N(0, σ² I_q),

    Var(b_i) = σ² T_i T_iᵀ per random-effects term, θ the lower triangles of the T_i (lme4's
    parameterisation, so every estimate compares one-to-one with lme4's).  β and σ are profiled
    out; θ minimises the profiled REML criterion (or ML deviance, ``REML=False``)::

        −2ℓ_R(θ) = log|L_θ|² + log|R_X|² − log|W| + (n−p) [1 + log(2π r²(θ)/(n−p))]

    with L_θ L_θᵀ = ΛᵀZᵀWZΛ + I (a sparse Cholesky factor, CHOLMOD), R_X the fixed-effects
    factor and r²(θ) the penalised weighted residual sum of squares.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"Reaction ~ Days + (Days | Subject)"``; ``(x || g)`` uncorrelated,
        ``(1 | a/b)`` nested, ``(1 | a) + (1 | b)`` crossed, ``offset(z)``.
    data : pandas.DataFrame or dask.dataframe.DataFrame
        The data; rows missing a used value are dropped (``MissingValuesWarning``).  A Dask
        DataFrame is reduced per partition and the fit keeps no rows (see :func:`lmer_chunked`).
    REML : bool, default True
        REML (lme4's default) or maximum likelihood.
    backend : {"auto", "compiled", "blocked", "single", "reference"}, default "auto"
        How the criterion is evaluated (see :class:`LinearMixedModel`).
    weights : str or array-like, optional
        Prior weights (a column name or one value per row), lme4's ``weights``.
    offset : str or array-like, optional
        A known offset (a column name or one value per row), lme4's ``offset``.
    ordering : {"default", "amd", "natural"}, default "default"
        CHOLMOD's fill-reducing ordering (see :class:`LinearMixedModel`).
    contrasts : dict, optional
        R's contrasts of fixed-effect factors (see :class:`LinearMixedModel`).
    allow_python : bool, default False
        Let the formula evaluate arbitrary Python: **it can then run any code** (see
        :class:`LinearMixedModel`).
    threads : int, optional
        Threads for the BLAS and OpenMP work of the fit; default None: the cores free when the
        fit starts (affinity, cgroup quota, other processes' load; see :class:`LinearMixedModel`).
        The count used is ``res.optsummary.threads``.
    **fit_options
        Options of :meth:`LinearMixedModel.fit`: ``optimizer`` ("auto", "bobyqa", "lbfgsb",
        "nelder_mead", "cobyla"), ``theta0`` (start), ``check_conv`` (lme4's gradient and
        Hessian checks), ``ftol_abs``, ``xtol_abs`` (NLopt tolerances), ``maxeval``,
        ``verbose`` (progress on stderr).

    Returns
    -------
    LmerResult
        ``fixef``, ``se``, ``vcov`` (fixed effects, their SEs and covariance), ``theta``,
        ``sigma``, ``varcorr`` (as.data.frame(VarCorr)), ``ranef`` and ``condvar`` (conditional
        modes and their covariances), ``loglik``, ``aic``, ``bic``, ``criterion``,
        ``deviance``, ``nobs``, ``ngrps``, ``converged``, ``singular``, ``messages``,
        ``optsummary``; methods ``summary()``, ``coef_table()`` (Satterthwaite t tests),
        ``anova_table()``, ``confint()``, ``predict()``, ``fitted()``, ``residuals()``,
        ``simulate()``, ``bootstrap()``, ``refit()``.  See :class:`LmerResult`.

    Raises
    ------
    FormulaError, MissingColumnError, DataError, GroupingFactorError, IdentifiabilityError
        For a malformed formula or data that cannot be used (subclasses of ``FastLMMError``).

    Examples
    --------
    >>> import fastlmm_ext as fl
    >>> res = fl.lmer("pres ~ metal + (1|ingot)", fl.datasets.load("ingot"))
    >>> round(res.sigma, 4)
    3.2205
    """
    with fit_threads(threads):      # one choice of the thread count for the build and the fit
        model = LinearMixedModel(formula, data, REML=REML, backend=backend, weights=weights, offset=offset,
                                 ordering=ordering, contrasts=contrasts, allow_python=allow_python, threads=threads)
        return model.fit(**fit_options)


def lmer_chunked(formula: str, chunks, REML: bool = True, *, weights: str | None = None,
                 offset: str | None = None, chunksize: int = DEFAULT_CHUNKSIZE, ordering: str = "default",
                 progress: bool = False, contrasts=None, allow_python: bool = False, threads: int | None = None,
                 **fit_options):
    """Fit an LMM from data that does not fit in memory, one chunk of rows at a time.

    The profiled likelihood needs the data only through n and the cross-products ZᵀWZ, ZᵀW[X y]
    and [X y]ᵀW[X y], which are sums over rows: the chunks are read twice, first for the factor
    levels (so each chunk numbers a level as the whole data would), then for their sums.  Peak
    memory is one chunk plus the cross-products (ZᵀZ's non-zeros, q × (p+1), (p+1)²), never the
    whole data; estimates, names and the criterion equal :func:`lmer`'s on the concatenated
    data (to rounding).

    Parameters
    ----------
    formula : str
        lme4 formula, as for :func:`lmer`.  Stateful transforms (``scale(x)``, ``poly(x, 2)``,
        ``ns``, ``bs``, ``center``) are refused, since each chunk would learn its own state:
        transform the column before chunking.
    chunks : str, path, list, callable or iterable
        A CSV/TSV (also gzipped) or Parquet file path (read ``chunksize`` rows at a time, model
        columns only); a list of DataFrames; a callable returning a fresh iterable of
        DataFrames; or any iterable of DataFrames such as ``pd.read_csv(path, chunksize=...)``
        (a one-shot iterator is spooled to a temporary directory, model columns only, so it can
        be read twice).
    REML : bool, default True
        REML or maximum likelihood.
    weights, offset : str, optional
        Prior weights and an offset: column names (arrays cannot follow the chunks).
    chunksize : int, default 500000
        Rows per chunk when ``chunks`` is a file path.
    ordering : {"default", "amd", "natural"}, default "default"
        CHOLMOD's fill-reducing ordering (see :class:`LinearMixedModel`).
    progress : bool, default False
        Count the chunks of each pass on stderr.
    contrasts, allow_python, threads
        As for :func:`~fastlmm_ext.lmer`.
    **fit_options
        Options of :meth:`LinearMixedModel.fit` (``optimizer``, ``theta0``, ``check_conv``,
        ``ftol_abs``, ``xtol_abs``, ``maxeval``, ``verbose``).

    Returns
    -------
    LmerResult
        Everything computed from the cross-products (fixef, SEs, θ, σ, VarCorr, ranef and
        condVar, logLik, AIC/BIC, summary, Satterthwaite tests, profile CIs, predict on new
        data); row-level quantities (fitted, residuals, simulate, parametric bootstrap) raise
        ``DataError`` because the rows are gone."""
    with fit_threads(threads):
        model = LinearMixedModel.from_chunks(formula, chunks, REML, weights=weights, offset=offset,
                                             chunksize=chunksize, ordering=ordering, progress=progress,
                                             contrasts=contrasts, allow_python=allow_python, threads=threads)
        return model.fit(**fit_options)
