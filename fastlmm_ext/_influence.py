"""Influence diagnostics as lme4's: hat values, Cook's distances, studentized residuals and case
(or group) deletion (``hatvalues.merMod``, ``cooks.distance.merMod``, ``rstudent.merMod``,
``influence.merMod`` with its ``dfbeta``, ``dfbetas`` and ``cooks.distance`` methods).

* Hat values: hᵢ = wᵢ gᵢᵀA⁻¹gᵢ, gᵢ = (xᵢ, Λᵀzᵢ), the diagonal of the hat matrix of the whole
  (β, u) fit (ŷ = H y), from the factor by triangular solves (``_mme``), never n × n; Σ hᵢ is
  the fit's effective number of parameters.
* Cook's distance (lme4's merMod method): Dᵢ = (rᵢ/(1 − hᵢ))² hᵢ / (σ̂² rank X), rᵢ the Pearson
  residual √wᵢ(yᵢ − ŷᵢ); studentized residuals rᵢ / (σ̂ √(1 − hᵢ)).  h = 1 gives NaN.
* Deletion: each unit (a row, or a level of a grouping factor) is removed and the model refitted
  from θ̂.  A deleted fit equals a fresh fit without the rows *exactly*: the design keeps every
  level and ZᵀWZ keeps its pattern, the rows' weights are set to 0 in the cross-products and n
  counts only the rows kept.  (A zero weight alone would not do: n would still count the row.
  A level left without rows has the block I in ΛᵀZᵀWZΛ + I and û = 0 there, so it adds nothing
  to the criterion: the fit is the fit without that level.)  The compiled backend reuses its
  symbolic analysis (the kernel takes the new ZᵀWZ values on the same pattern); refits run in
  parallel through ``_parallel`` (``n_jobs``) with a progress bar (``_progress``).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np
import pandas as pd
import scipy.linalg as la

from ._crossprod import CrossProducts
from ._design import ModelStructure, assemble_Z, independent_columns
from ._exceptions import ArgumentError, DataError
from ._mme import mme_quadratic
from ._parallel import n_workers, run_tasks
from ._progress import Progress

__all__ = ["InfluenceMixin", "InfluenceResult", "hatvalues", "deleted_model", "var_cov_comps"]

_FIT_DEFAULTS = {"check_conv": False}


def hatvalues(res) -> np.ndarray:
    """Diagonal of the hat matrix of the conditional fit (module docstring), one per row."""
    s = res.structure
    s.require_rows("hatvalues()")
    h = mme_quadratic(res, s.X, s.Z.T)
    return h if s.weights is None else h * s.weights


def var_cov_comps(res) -> pd.Series:
    """σ̂² and the lower triangle (column by column) of each VarCorr block, named as lme4's
    ``influence.merMod`` names them: ``sigma^2``, ``v[(Intercept)]``, ``C[age,(Intercept)]``,
    ``v[age]``; with several terms prefixed by the term's name (``Worker:v[(Intercept)]``)."""
    s = res.structure
    names, vals = ["sigma^2"], [res.sigma ** 2]
    cov = res.term_covariances()
    for t in s.terms:
        pre = f"{t.name}:" if len(s.terms) > 1 else ""
        S = cov[t.name]
        for j in range(t.k):
            for i in range(j, t.k):
                names.append(pre + (f"v[{t.cnms[i]}]" if i == j else f"C[{t.cnms[i]},{t.cnms[j]}]"))
                vals.append(S[i, j])
    return pd.Series(vals, index=names, dtype=float)


def _rows_kept(s: ModelStructure, keep: np.ndarray) -> ModelStructure:
    """``s`` on the rows ``keep`` (bool[n]), every level and X column kept."""
    terms = tuple(dataclasses.replace(t, codes=t.codes[keep], Xi=np.ascontiguousarray(t.Xi[keep]))
                  for t in s.terms)
    sub = lambda a: None if a is None else a[keep]  # noqa: E731
    return dataclasses.replace(s, y=s.y[keep], X=np.asfortranarray(s.X[keep]), terms=terms,
                               Z=assemble_Z(list(terms), int(keep.sum())), offset=sub(s.offset),
                               weights=sub(s.weights), row_index=s.row_index[keep])


def deleted_model(model, rows: np.ndarray):
    """``model`` without the rows ``rows`` (positions), as a fresh model on the other rows
    (module docstring): its structure keeps the other rows and every level; its cross-products
    are the full design's with weight 0 on ``rows`` and n = the rows kept, on the same ZᵀWZ
    pattern, so the compiled backend shares the kernel and its symbolic analysis.  DataError if
    the fixed-effects columns are rank deficient on the rows kept."""
    s = model.structure
    keep = np.ones(s.n, dtype=bool)
    keep[np.asarray(rows, dtype=np.intp)] = False
    s_del = _rows_kept(s, keep)
    # The rank rule of a fresh fit of the remaining rows (build_structure decides on X itself).
    if s.p and len(independent_columns(s_del.X)) < s.p:
        raise DataError("the fixed-effects columns are rank deficient without these rows")
    cp = None
    if model.backend.crossprod is not None:
        w0 = np.ones(s.n) if s.weights is None else s.weights.copy()
        w0[~keep] = 0.0
        cp = CrossProducts.from_structure(dataclasses.replace(s, weights=w0))
        cp = dataclasses.replace(cp, n=s_del.n)
    return type(model)._from_backend(s_del, model.REML, model.backend.with_response(s_del, cp))


def _units(res, groups) -> tuple[str, pd.Index, list[np.ndarray]]:
    """(name, labels, row positions of each unit) for case deletion or a grouping factor."""
    s = res.structure
    if groups is None:
        return "case", pd.Index(s.row_index), [np.array([i]) for i in range(s.n)]
    if isinstance(groups, str):
        t = next((t for t in s.terms if t.factor == groups), None)
        if t is None:
            raise ArgumentError(f"groups={groups!r} is not a grouping factor of the model "
                                f"({', '.join(map(repr, dict.fromkeys(t.factor for t in s.terms)))}); "
                                "pass one label per row for other groupings")
        labels = np.asarray(t.levels, dtype=object)[t.codes]
        name = groups
    else:
        labels = np.asarray(groups, dtype=object).ravel()
        if labels.shape[0] != s.n:
            raise DataError(f"groups has {labels.shape[0]} labels, the model has {s.n} observations")
        if pd.isna(labels).any():
            raise DataError("groups has missing labels")
        name = "groups"
    codes, uniq = pd.factorize(pd.Series(labels), sort=False)          # order of first appearance
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniq) + 1))
    return name, pd.Index(uniq), [order[bounds[j]:bounds[j + 1]] for j in range(len(uniq))]


@dataclasses.dataclass
class _Job:
    """What every worker needs: the model (pickled once per worker process), θ̂ and fit options."""
    model: object
    theta: np.ndarray
    fit_options: dict

    def refit(self, rows: np.ndarray) -> tuple:
        """The fit without ``rows``: (fixef, var_cov_comps, vcov, θ, σ, criterion, converged,
        evaluations, message), NaN with the error's message if it fails."""
        s = self.model.structure
        try:
            r = deleted_model(self.model, rows).fit(theta0=self.theta, **self.fit_options)
            msg = "; ".join(r.messages)
            return (r.fixef.to_numpy(), var_cov_comps(r).to_numpy(), r.vcov.to_numpy(), r.theta, r.sigma,
                    r.criterion, bool(r.converged), int(r.optsummary.feval), msg)
        except Exception as e:  # noqa: BLE001 - recorded per unit, as a failed refit in lme4 is
            nv = 1 + sum(t.ntheta for t in s.terms)
            return (np.full(s.p, np.nan), np.full(nv, np.nan), np.full((s.p, s.p), np.nan),
                    np.full(s.ntheta, np.nan), np.nan, np.nan, False, 0, f"{type(e).__name__}: {e}")


def _quiet(job: _Job) -> _Job:
    """A worker's setup (``_parallel``): the refits' warnings are recorded in ``messages``, not shown."""
    warnings.simplefilter("ignore")
    return job


def _refits(job: _Job, chunk: list[np.ndarray]) -> list[tuple]:
    return [job.refit(rows) for rows in chunk]


def influence(res, groups=None, n_jobs: int = 1, progress=None,
              fit_options: dict | None = None) -> InfluenceResult:
    """Case or group deletion of ``res`` (``InfluenceMixin.influence`` says how)."""
    s = res.structure
    s.require_rows("influence()")
    name, labels, units = _units(res, groups)
    ntask = len(units)
    workers = n_workers(n_jobs, ntask)
    job = _Job(res.model, np.asarray(res.theta, dtype=float).copy(), {**_FIT_DEFAULTS, **(fit_options or {})})
    size = 1 if workers == 1 else max(1, math.ceil(ntask / (workers * 4)))
    chunks = [units[a:a + size] for a in range(0, ntask, size)]
    t0 = time.perf_counter()
    bar = Progress(progress, "influence", "refits", total=ntask)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts, parallel = run_tasks(_quiet, _refits, chunks, job, workers, bar, weight=len, local=job)
    finally:
        bar.close()
    out = [r for part in parts for r in part]
    fx = list(s.fixef_names)
    vc = var_cov_comps(res)
    idx = labels.rename(name)
    return InfluenceResult(
        groups=name, deleted=idx, fixed_effects=res.fixef.rename(None),
        fixed_effects_deleted=pd.DataFrame(np.vstack([r[0] for r in out]).reshape(ntask, s.p), index=idx,
                                           columns=fx),
        var_cov_comps=vc,
        var_cov_comps_deleted=pd.DataFrame(np.vstack([r[1] for r in out]), index=idx, columns=vc.index),
        vcov=res.vcov.copy(),
        vcov_deleted={lab: pd.DataFrame(r[2], index=fx, columns=fx) for lab, r in zip(idx, out)},
        theta_deleted=pd.DataFrame(np.vstack([r[3] for r in out]).reshape(ntask, s.ntheta), index=idx,
                                   columns=list(s.theta_names)),
        sigma_deleted=pd.Series([r[4] for r in out], index=idx, name="sigma", dtype=float),
        criterion_deleted=pd.Series([r[5] for r in out], index=idx, name="criterion", dtype=float),
        converged=pd.Series([r[6] for r in out], index=idx, name="converged", dtype=bool),
        function_evals=pd.Series([r[7] for r in out], index=idx, name="function_evals", dtype=int),
        messages=pd.Series([r[8] for r in out], index=idx, name="messages", dtype=object),
        hat=pd.Series(hatvalues(res), index=s.row_index, name="hat"),
        parallel=parallel, n_jobs=workers, elapsed=time.perf_counter() - t0)


@dataclasses.dataclass
class InfluenceResult:
    """Deletion diagnostics of a fit, as lme4's ``influence.merMod`` object (its fields, with
    ``_`` for R's dots and ``_deleted`` for ``[-case]`` / ``[-group]``).

    Attributes
    ----------
    groups : "case", the grouping factor's name, or "groups" for labels given per row.
    deleted : Index of the deleted units (row labels, or levels in order of first appearance).
    fixed_effects, fixed_effects_deleted : β̂ of the fit; one row of refitted β̂ per unit.
    var_cov_comps, var_cov_comps_deleted : σ̂² and the VarCorr blocks' lower triangles
        (:func:`var_cov_comps`), of the fit and per unit.
    vcov, vcov_deleted : Var(β̂) of the fit; per unit (a dict of DataFrames).
    theta_deleted, sigma_deleted, criterion_deleted : θ, σ and the criterion of each refit.
    converged, function_evals, messages : each refit's status (messages: singular fits, errors;
        a failed refit has NaN values and its error here).
    hat : the fit's hat values (lme4's ``influence(fit, do.coef = FALSE)$hat``).
    parallel, n_jobs, elapsed : how the refits ran ("serial" | "processes" | "threads").
    """
    groups: str
    deleted: pd.Index
    fixed_effects: pd.Series
    fixed_effects_deleted: pd.DataFrame
    var_cov_comps: pd.Series
    var_cov_comps_deleted: pd.DataFrame
    vcov: pd.DataFrame
    vcov_deleted: dict
    theta_deleted: pd.DataFrame
    sigma_deleted: pd.Series
    criterion_deleted: pd.Series
    converged: pd.Series
    function_evals: pd.Series
    messages: pd.Series
    hat: pd.Series
    parallel: str
    n_jobs: int
    elapsed: float

    def dfbeta(self, which: str = "fixed") -> pd.DataFrame:
        """Change of each estimate on deletion, deleted − full (lme4's ``dfbeta``):
        ``which="fixed"`` the fixed effects, ``"var_cov"`` the variance components."""
        if which == "fixed":
            return self.fixed_effects_deleted - self.fixed_effects.to_numpy()
        if which in ("var_cov", "var.cov"):
            return self.var_cov_comps_deleted - self.var_cov_comps.to_numpy()
        raise ArgumentError(f"unknown which {which!r}; choose 'fixed' or 'var_cov'")

    def dfbetas(self) -> pd.DataFrame:
        """dfbeta of the fixed effects over the deleted fit's standard errors, √diag Var(β̂)[−i]."""
        se = np.vstack([np.sqrt(np.diag(self.vcov_deleted[k].to_numpy())) for k in self.deleted])
        return self.dfbeta() / se.reshape(self.dfbeta().shape)

    def cooks_distance(self) -> pd.Series:
        """Cook's distance of each unit, lme4's ``cooks.distance(influence(fit))``:
        Dᵢ = dᵢᵀ V̂⁻¹ dᵢ · (m − p)/(m p), dᵢ = dfbeta, V̂ = Var(β̂) of the fit, m units, p = dim β
        (V̂⁻¹ applied through its Cholesky factor)."""
        d = self.dfbeta().to_numpy()
        m, p = d.shape
        if p == 0:
            return pd.Series(np.zeros(m), index=self.deleted, name="cooks_distance")
        f = la.cho_factor(self.vcov.to_numpy(), lower=True)
        q = np.einsum("ij,ji->i", d, la.cho_solve(f, d.T))
        return pd.Series(q * (m - p) / (m * p), index=self.deleted, name="cooks_distance")

    def __repr__(self) -> str:
        bad = int((~self.converged).sum())
        return (f"<InfluenceResult {len(self.deleted)} deletions by {self.groups}"
                f"{f' ({bad} not converged)' if bad else ''}, {self.parallel}>")


class InfluenceMixin:
    """``hatvalues``, ``cooks_distance``, ``rstudent`` and ``influence`` for :class:`LmerResult`."""

    def hatvalues(self) -> np.ndarray:
        """Diagonal of the hat matrix of the conditional fit, lme4's ``hatvalues(fit)``:
        hᵢ = wᵢ [xᵢ; Λᵀzᵢ]ᵀ A⁻¹ [xᵢ; Λᵀzᵢ], A the coefficient matrix of the mixed-model
        equations in (β, u), so that ŷ = H y; Σ hᵢ = trace H, the effective number of parameters.
        Computed from the factor by triangular solves, never forming an n × n matrix."""
        return hatvalues(self)

    def cooks_distance(self) -> np.ndarray:
        """Cook's distances, lme4's ``cooks.distance(fit)``:  (rᵢ/(1 − hᵢ))² hᵢ / (σ̂² rank X), rᵢ
        the Pearson residual √wᵢ (yᵢ − ŷᵢ), hᵢ the hat value; NaN where hᵢ = 1."""
        h = hatvalues(self)
        r = self.residuals(type="pearson")
        with np.errstate(divide="ignore", invalid="ignore"):
            d = (r / (1.0 - h)) ** 2 * h / (self.sigma ** 2 * self.structure.p)
        return np.where(np.isfinite(d), d, np.nan)

    def rstudent(self) -> np.ndarray:
        """Studentized residuals, lme4's ``rstudent(fit)``: rᵢ / (σ̂ √(1 − hᵢ)), rᵢ the Pearson
        residual; NaN where hᵢ = 1."""
        h = hatvalues(self)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.residuals(type="pearson") / (self.sigma * np.sqrt(1.0 - h))
        return np.where(np.isfinite(r), r, np.nan)

    def influence(self, groups=None, n_jobs: int = 1, progress=None,
                  fit_options: dict | None = None) -> InfluenceResult:
        """Case or group deletion, as lme4's ``influence(fit, groups)``: the model refitted
        without each row (``groups=None``) or each level of ``groups`` (a grouping factor of the
        model, e.g. ``"Subject"`` or ``"Machine:Worker"``, or one label per row), starting from
        θ̂.  Each refit equals a fresh fit without those rows (``_influence``), reusing the
        design and, on the compiled backend, CHOLMOD's symbolic analysis.

        * ``n_jobs > 1`` (``-1``: all cores) refits in a process pool (threads where processes
          cannot be used), with the same results as ``n_jobs=1``.
        * ``progress``: True → a progress bar on stderr; None → only on a terminal after 2 s.
        * ``fit_options`` go to every refit (default ``{"check_conv": False}``; the optimiser's
          tolerances are the fit's, tighter than lme4's default, so the refits are at their optima).
        * A refit's warnings are not shown; its status is in ``converged`` and ``messages``.

        Returns an :class:`InfluenceResult` (``fixed_effects_deleted``,
        ``var_cov_comps_deleted``, ``vcov_deleted``, ..., ``dfbeta()``, ``dfbetas()``,
        ``cooks_distance()``)."""
        return influence(self, groups, n_jobs, progress, fit_options)
