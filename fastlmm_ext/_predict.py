"""Predictions of a fitted model (lme4's ``predict.merMod``), with standard errors and intervals.

Model (lme4's notation):  y = Xβ + offset + Zb + ε,  b = Λ_θ u,  u ~ N(0, σ² I_q),  ε ~ N(0, σ² W⁻¹).

    ŷ = X_new β̂ + offset_new + Σ_i Z_i,new b̂_i

over the random-effects columns kept by ``re_form`` (``_newdata.selected_columns``); Z_i,new
holds the term's model-matrix row of each new observation in the columns of its level, so
Z_i,new b̂_i = Σ_j X_i[r, j] · b̂_i[level(r), j] (:func:`random_part`), a column ``re_form`` drops
contributing 0.  A level not seen in the fit contributes 0 (the mean of b) when
``allow_new_levels=True``.  The design on new rows is built by ``_newdata``.

Standard errors (lme4 has none for lmer fits, its issue #753), for a row with fixed-effects row
x, kept random-effects row z (seen levels) and z_new (the kept columns of its new levels):

* ``"fixed"``:   Var = xᵀ V̂ x, V̂ = Var(β̂) = σ̂²(R_XᵀR_X)⁻¹: β̂'s uncertainty alone;
* ``"condvar"``: Var = xᵀ V̂ x + zᵀ C z + n,  C block diagonal, the conditional covariances of
  the modes per term and level (lme4's condVar, σ̂² T [(ΛᵀZᵀWZΛ + I)⁻¹]_aa Tᵀ): the usual
  approximation, which treats β̂, the levels and the terms as independent;
* ``"joint"``:   Var = [x; z]ᵀ C_full [x; z] + n,  C_full = σ̂² T A⁻¹ Tᵀ the joint covariance of
  (β̂ − β, b̂ − b) from the whole mixed-model system (``_mme``): Var(ŷ − μ) given θ, μ the
  conditional mean xᵀβ + zᵀb.  β̂ and b̂ − b are negatively correlated, so it is never larger
  than ``"condvar"`` and often much smaller;

with n = Σ over the row's new levels of z_newᵀ Σ_g z_new (b̂ = 0 there, b ~ N(0, Σ_g), Σ_g the
term's VarCorr block over the kept columns, independent of everything else).  For population
predictions (no column kept) the three agree: xᵀV̂x.  θ̂ and σ̂ are treated as known.
Intervals: ŷ ± z_{(1+level)/2} · se (``"confidence"``, for μ) or · √(se² + σ̂²/w) (``"prediction"``,
for a new observation of prior weight w), with the normal quantile.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.linalg as la
import scipy.sparse as sp
from scipy import stats

from ._data import as_frame, as_numeric_array, check_columns, check_level
from ._exceptions import ArgumentError, DataError
from ._mme import mme_quadratic
from ._newdata import format_levels, new_rows, selected_columns

__all__ = ["PredictMixin", "random_part", "prediction_variance", "SE_TYPES", "INTERVALS"]

SE_TYPES = ("joint", "condvar", "fixed")
INTERVALS = ("none", "confidence", "prediction")


def random_part(s, b: np.ndarray, terms, out: np.ndarray) -> np.ndarray:
    """``out`` plus Σ_i Z_i b̂_i for ``terms`` = [(term index, X_i rows, level codes)]: per row
    Σ_j X_i[r, j] b̂_i[code(r), j]; a code of −1 (a level the fit did not see) adds 0."""
    for i, Xi, codes in terms:
        t = s.terms[i]
        B = b[t.col_offset:t.col_offset + t.q].reshape(t.nlevels, t.k)
        new = codes < 0
        part = np.einsum("rj,rj->r", Xi, B[np.where(new, 0, codes)])
        out = out + (np.where(new, 0.0, part) if new.any() else part)
    return out


def _random_rows(s, terms, m: int) -> sp.csc_matrix:
    """Zᵀ of the rows (q × m, sparse) in the fit's b order: row r's values X_i[r, :] in the
    columns of its level of term i; new levels (code −1) have no column."""
    rows, cols, vals = [], [], []
    for i, Xi, codes in terms:
        t = s.terms[i]
        seen = np.flatnonzero(codes >= 0)
        for j in range(t.k):
            rows.append(t.col_offset + codes[seen] * t.k + j)
            cols.append(seen)
            vals.append(Xi[seen, j])
    if not rows:
        return sp.csc_matrix((s.q, m))
    return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(s.q, m))


def prediction_variance(res, X: np.ndarray, terms, se_type: str = "joint") -> np.ndarray:
    """Var(ŷ − μ) of rows with fixed-effects rows ``X`` (m × p) and random-effects rows
    ``terms`` = [(term index, X_i rows with dropped columns zeroed, level codes)], by
    ``se_type`` (module docstring)."""
    s = res.structure
    m = X.shape[0]
    if se_type == "joint" and terms:
        var = res.sigma ** 2 * mme_quadratic(res, X, _random_rows(s, terms, m))
    else:
        wb = la.solve_triangular(res._state.RX, X.T, trans="T", lower=False, check_finite=False) if s.p \
            else np.zeros((0, m))
        var = res.sigma ** 2 * np.einsum("ij,ij->j", wb, wb)            # xᵀV̂x = σ̂² ‖R_X⁻ᵀ x‖²
    if se_type == "fixed":
        return var
    cov = res.term_covariances()
    for i, Xi, codes in terms:
        t = s.terms[i]
        new = codes < 0
        if new.any():                                                   # b̂ = 0, Var(b) = Σ_g
            Zn = Xi[new]
            var[new] += np.einsum("rj,jk,rk->r", Zn, cov[t.name], Zn)
        if se_type == "condvar" and (~new).any():                       # + zᵀ C z, C block diagonal
            G = res.condvar[t.name][codes[~new]]
            Zs = Xi[~new]
            var[~new] += np.einsum("rj,rjk,rk->r", Zs, G, Zs)
    return var


def _check_options(se_type: str, interval: str, level) -> float:
    if se_type not in SE_TYPES:
        raise ArgumentError(f"unknown se_type {se_type!r}; choose one of {', '.join(map(repr, SE_TYPES))}")
    if interval not in INTERVALS:
        raise ArgumentError(f"unknown interval {interval!r}; choose one of {', '.join(map(repr, INTERVALS))}")
    return check_level(level)


def _new_weights(weights, newdata, ok: np.ndarray) -> np.ndarray:
    """Prior weights of the usable new rows ``ok`` (the prediction interval's σ̂²/w): a column
    of ``newdata`` or one value per row; 1 by default."""
    if weights is None:
        return np.ones(int(ok.sum()))
    if isinstance(weights, str):
        nd = as_frame(newdata)
        check_columns(nd, [weights])
        w = as_numeric_array(nd[weights], weights, what="weights column")
    else:
        w = as_numeric_array(np.asarray(weights), "weights", what="argument").ravel()
        if w.shape[0] != ok.shape[0]:
            raise DataError(f"weights has length {w.shape[0]} but newdata has {ok.shape[0]} rows")
    w = w[ok]
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise DataError("weights for prediction intervals must be finite and positive")
    return w


class PredictMixin:
    """``predict`` for :class:`LmerResult` (needs ``structure``, ``_state``)."""

    def predict(self, newdata=None, re_form=None, allow_new_levels: bool = False, offset=None, *,
                se_fit: bool = False, interval: str = "none", level: float = 0.95, se_type: str = "joint",
                weights=None) -> pd.Series | pd.DataFrame:
        """Predictions, as lme4's ``predict(fit, newdata, re.form, allow.new.levels)``, with
        standard errors and intervals (as R's ``predict.lm(se.fit = TRUE, interval =)``).

        ŷ = X_new β̂ + offset_new + Σ_{columns kept by re_form} X_i,new[:, j] · b̂_i[level, j]

        * ``newdata=None``: the model's rows (``re_form=None`` gives :meth:`fitted`).
        * X_new is built by the fit's formulaic spec (training levels and contrasts, polynomial
          contrasts for ordered factors, the same stateful transforms); columns dropped for rank
          deficiency are dropped again.  Factor levels are matched by their labels ("1" matches
          1, 1.0 and "1"); a level of a fixed-effect factor not seen in the fit is an error.
        * ``re_form``: None → every random effect; ``"~0"``, ``"NA"``, ``False`` or NaN → none
          (population level, Xβ̂ + offset); a formula such as ``"~ (1 | Subject)"`` → the random
          effects it names, whole terms or part of one, as lme4: ``~ (1 | Subject)`` of a
          ``(Days | Subject)`` fit uses only b̂'s intercept column, ``~ (0 + Days | Subject)``
          only the slope (``_newdata.selected_columns``).
        * Grouping levels not seen in the fit raise :class:`DataError` naming the factor and the
          levels, unless ``allow_new_levels=True``, when they contribute 0 (b's mean).
          Interactions and nested factors are matched by the combined label "b_level:a_level".
        * Rows with a missing value in a variable the prediction uses give NaN (lme4's na.pass).
        * Offsets: ``offset()`` terms of the formula are evaluated on ``newdata``; an offset given
          to the fit as ``offset=`` must be given again here (array or column of ``newdata``).

        Standard errors and intervals (``se_fit=True`` or ``interval`` other than ``"none"``):
        the module docstring has the formulas.  ``se_type="joint"`` (default) is the standard
        error of ŷ − μ from the joint covariance of (β̂, b̂ − b) of the whole mixed-model system,
        the correct one for a conditional prediction given θ̂; ``"condvar"`` is the usual
        approximation that adds β̂'s variance and lme4's condVar blocks as if independent (never
        smaller: it ignores their negative correlation); ``"fixed"`` counts β̂'s uncertainty only.
        A new level adds its VarCorr variance (its b̂ is 0).  Population predictions have
        se = √(xᵀV̂x) whatever ``se_type``.  θ̂ and σ̂ are treated as known.
        ``interval="confidence"``: ŷ ± z·se for μ; ``"prediction"``: ŷ ± z·√(se² + σ̂²/w) for a
        new observation, w its prior weight (``weights=``: an array or a column of ``newdata``,
        default 1; the fit's weights for ``newdata=None``); z = Φ⁻¹((1 + level)/2).

        Returns a float Series indexed like ``newdata`` (the model's rows for ``newdata=None``),
        or, with ``se_fit`` or an interval, a DataFrame with columns ``fit``, ``se_fit`` and
        (with an interval) ``lower``, ``upper``.
        """
        level = _check_options(se_type, interval, level)
        want_se = bool(se_fit) or interval != "none"
        if weights is not None and (interval != "prediction" or newdata is None):
            raise ArgumentError("weights= (prior weights of new rows) is only used for interval='prediction' with "
                                "newdata; the model's own rows have the fit's weights")
        s = self.structure
        cols = selected_columns(s, re_form)
        b = self._state.b
        if newdata is None:
            if offset is not None:
                raise ValueError("offset= is only used with newdata")
            s.require_rows("predict() without newdata")
            index, ok = s.row_index, np.ones(s.n, dtype=bool)
            X = s.X
            mu = s.X @ self._state.beta + (s.offset if s.offset is not None else 0.0)
            terms = [(i, s.terms[i].Xi * mask, s.terms[i].codes) for i, mask in cols.items()]
            w_new = s.weights if s.weights is not None else np.ones(s.n)
        else:
            rows = new_rows(s, newdata, list(cols), offset)
            if rows.unseen and not allow_new_levels:
                what = "; ".join(f"grouping factor {f!r}: {format_levels(v)}" for f, v in rows.unseen.items())
                raise DataError(f"new level(s) not seen in the fitted data, {what}; use allow_new_levels=True "
                                "to predict them at the population level (random effect 0)")
            index, ok, X = rows.index, rows.ok, rows.X
            mu = rows.X @ self._state.beta + rows.offset
            terms = [(i, Xi * cols[i], codes) for i, Xi, codes in rows.terms]
            if interval == "prediction":
                w_new = _new_weights(weights, newdata, ok)
        fit = np.full(ok.shape[0], np.nan)
        if ok.any():
            fit[ok] = random_part(s, b, terms, mu)
        if not want_se:
            return pd.Series(fit, index=index, name="predicted", dtype=float)
        se = np.full(ok.shape[0], np.nan)
        if ok.any():
            se[ok] = np.sqrt(np.maximum(prediction_variance(self, X, terms, se_type), 0.0))
        out = pd.DataFrame({"fit": fit, "se_fit": se}, index=index)
        if interval != "none":
            z = stats.norm.ppf(0.5 + level / 2.0)
            half = np.full(ok.shape[0], np.nan)
            if interval == "confidence":
                half = z * se
            elif ok.any():
                with np.errstate(divide="ignore"):
                    half[ok] = z * np.sqrt(se[ok] ** 2 + self.sigma ** 2 / w_new)
            out["lower"] = fit - half
            out["upper"] = fit + half
        return out
