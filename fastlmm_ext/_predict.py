"""Predictions of a fitted model (lme4's ``predict.merMod``).

Model (lme4's notation):  y = Xβ + offset + Zb + ε,  b = Λ_θ u,  u ~ N(0, σ² I_q),  ε ~ N(0, σ² W⁻¹).

    ŷ = X_new β̂ + offset_new + Σ_i Z_i,new b̂_i

over the random-effects terms i kept by ``re_form``; Z_i,new holds the term's model-matrix row
of each new observation in the columns of its level, so Z_i,new b̂_i = Σ_j X_i[r, j] · b̂_i[level(r), j]
(:func:`random_part`).  A level not seen in the fit contributes 0 (the mean of b) when
``allow_new_levels=True``.  The design on new rows is built by ``_newdata``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._exceptions import DataError
from ._newdata import format_levels, new_rows, selected_terms

__all__ = ["PredictMixin", "random_part"]


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


class PredictMixin:
    """``predict`` for :class:`LmerResult` (needs ``structure``, ``_state``)."""

    def predict(self, newdata=None, re_form=None, allow_new_levels: bool = False, offset=None) -> pd.Series:
        """Predictions, as lme4's ``predict(fit, newdata, re.form, allow.new.levels)``.

        ŷ = X_new β̂ + offset_new + Σ_{i ∈ re_form} Σ_j X_i,new[:, j] · b̂_i[level, j]

        * ``newdata=None``: the model's rows (``re_form=None`` gives :meth:`fitted`).
        * X_new is built by the fit's formulaic spec (training levels and contrasts, polynomial
          contrasts for ordered factors, the same stateful transforms); columns dropped for rank
          deficiency are dropped again.  Factor levels are matched by their labels ("1" matches
          1, 1.0 and "1"); a level of a fixed-effect factor not seen in the fit is an error.
        * ``re_form``: None → every random-effects term; ``"~0"``, ``"NA"``, ``False`` or NaN →
          none (population level, Xβ̂ + offset); a formula such as ``"~ (1 | Subject)"`` → those terms.
        * Grouping levels not seen in the fit raise :class:`DataError` naming the factor and the
          levels, unless ``allow_new_levels=True``, when they contribute 0 (b's mean).
          Interactions and nested factors are matched by the combined label "b_level:a_level".
        * Rows with a missing value in a variable the prediction uses give NaN (lme4's na.pass).
        * Offsets: ``offset()`` terms of the formula are evaluated on ``newdata``; an offset given
          to the fit as ``offset=`` must be given again here (array or column of ``newdata``).

        Returns a float Series indexed like ``newdata`` (the model's rows for ``newdata=None``).
        """
        s = self.structure
        keep = selected_terms(s, re_form)
        b = self._state.b
        if newdata is None:
            if offset is not None:
                raise ValueError("offset= is only used with newdata")
            s.require_rows("predict() without newdata")
            mu = s.X @ self._state.beta + (s.offset if s.offset is not None else 0.0)
            mu = random_part(s, b, [(i, s.terms[i].Xi, s.terms[i].codes) for i in keep], mu)
            return pd.Series(mu, index=s.row_index, name="predicted", dtype=float)
        rows = new_rows(s, newdata, keep, offset)
        if rows.unseen and not allow_new_levels:
            what = "; ".join(f"grouping factor {f!r}: {format_levels(v)}" for f, v in rows.unseen.items())
            raise DataError(f"new level(s) not seen in the fitted data, {what}; use allow_new_levels=True "
                            "to predict them at the population level (random effect 0)")
        out = np.full(rows.ok.shape[0], np.nan)
        if rows.ok.any():
            out[rows.ok] = random_part(s, b, rows.terms, rows.X @ self._state.beta + rows.offset)
        return pd.Series(out, index=rows.index, name="predicted", dtype=float)
