"""Model matrices of the simplest right-hand sides, built with NumPy instead of formulaic.

Most formulas users fit have right-hand sides such as ``Days``, ``1 + x + treatment`` or
``0 + x``: an intercept and plain data columns.  formulaic's model building costs milliseconds
per matrix, which is most of a small fit's time (sleepstudy), so for such a right-hand side the
matrix is written directly, as R's ``model.matrix`` would write it:

* the intercept column "(Intercept)" (all ones) unless ``0`` / ``- 1`` removes it;
* a numeric column: itself;
* an unordered factor with R's default (treatment) contrasts, levels ℓ₁ … ℓ_K: the indicators
  of ℓ₂ … ℓ_K named ``f`` + level, when the constant is already in the span of the columns
  before it (the intercept or an earlier full factor); else the indicators of every level
  (R's rule for ``~ 0 + f + g``: f gets all K columns, g its contrasts);
* terms in the order written, a repeated one once.

Anything else (calls, interactions, ordered factors, user contrasts, non-syntactic names, a
factor with one level) returns None and goes to formulaic (``_rformula.model_matrix``), which
stays the one definition of the general case; the tests check that both give the same matrix,
names and new-data matrices on random designs.

formulaic's ModelSpec of the right-hand side (what predict, the ANOVA hypotheses and marginal
means rebuild the matrix from) is made on first use by :class:`DeferredSpec`, from one row: for
these terms the spec depends on the columns' types and the factors' categories only (which
``_data.prepare_factors`` has cut to the levels present), never on the values.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ._data import RowsAt

__all__ = ["simple_model_matrix", "DeferredSpec"]


def _terms(text: str) -> tuple[bool, list[str]] | None:
    """(intercept, column names in order, once each) of a translated right-hand side written as
    signed items ``±1``, ``+0`` and ``+name``; None for any other form (``- 0``, ``- x``, both
    ``0`` and ``1``, anything but names and the two numbers)."""
    toks = text.split()
    if toks and toks[0] not in ("+", "-"):
        toks.insert(0, "+")
    if not toks or len(toks) % 2:
        return None
    intercept, zero, one, names = True, False, False, []
    for sign, item in zip(toks[0::2], toks[1::2]):
        if sign not in ("+", "-"):
            return None
        if item == "1":
            zero, one = (True, one) if sign == "-" else (zero, True)
        elif item == "0" and sign == "+":
            zero = True
        elif item.isidentifier() and sign == "+":
            if item not in names:
                names.append(item)
        else:
            return None
    if zero and one:
        return None
    return not zero, names


def simple_model_matrix(text: str, frame: pd.DataFrame, contrasts: Mapping | None = None
                        ) -> tuple[np.ndarray, list[str]] | None:
    """(X, R's column names) of the translated right-hand side ``text`` on ``frame`` (complete
    rows, factors already clean Categoricals, numeric columns float64) when it is simple (module
    docstring); None otherwise.  ``contrasts``: the factors' non-default contrasts (any entry for
    a column used here sends the right-hand side to formulaic)."""
    parsed = _terms(text)
    if parsed is None:
        return None
    intercept, names = parsed
    n = len(frame)
    cols: list[np.ndarray] = []
    out_names: list[str] = []
    if intercept:
        cols.append(np.ones((n, 1)))
        out_names.append("(Intercept)")
    spanned = intercept
    for name in names:
        if name not in frame.columns or (contrasts and name in contrasts):
            return None
        s = frame[name]
        dtype = s.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cats = dtype.categories
            if dtype.ordered or len(cats) < 2 or not _plain_labels(cats):
                return None
            codes = np.asarray(s.cat.codes)
            first = 1 if spanned else 0
            K = len(cats)
            block = np.zeros((n, K - first))
            rows = np.flatnonzero(codes >= first)
            block[rows, codes[rows] - first] = 1.0
            cols.append(block)
            out_names.extend(f"{name}{c}" for c in cats[first:])
            spanned = True
        elif isinstance(dtype, np.dtype) and dtype.kind == "f":
            cols.append(np.asarray(s, dtype=np.float64).reshape(n, 1))
            out_names.append(name)
        else:
            return None
    if not cols:
        return None
    return np.hstack(cols), out_names


def _plain_labels(cats: pd.Index) -> bool:
    """Level labels that formulaic writes as ``str(level)`` and R as the same text: strings and
    integers (a float or other level goes to formulaic, which names it its own way)."""
    if isinstance(cats.dtype, np.dtype) and cats.dtype.kind in "iu":
        return True
    if isinstance(cats.dtype, pd.StringDtype):
        return True
    return all(isinstance(c, str) for c in cats)


class DeferredSpec:
    """formulaic's ModelSpec of a simple right-hand side, made when first used.

    ``make(rows)`` builds it (``_rformula.model_matrix(...).model_spec``) from a one-row frame of
    the columns it reads: a factor's categories are in its dtype and a numeric column has no
    state, so one row gives the spec the full frame would.  The row is kept as arrays
    (``_data.RowsAt``) and becomes a frame only when the spec is made.  Every attribute is the
    spec's; a copy or pickle is the spec itself."""

    def __init__(self, make, row: RowsAt):
        self._make = make
        self._row = row
        self._spec = None

    @classmethod
    def of(cls, make, frame: pd.DataFrame, columns) -> DeferredSpec:
        """A DeferredSpec over the first row of ``frame``'s ``columns``."""
        return cls(make, RowsAt.take(frame, columns, np.arange(1)))

    def resolve(self):
        """The ModelSpec (made on the first call)."""
        if self._spec is None:
            self._spec = self._make(self._row.frame())
            self._make = self._row = None
        return self._spec

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_make", "_row", "_spec"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)

    def __reduce__(self):
        return (_the, (self.resolve(),))

    def __eq__(self, other) -> bool:
        other = other.resolve() if isinstance(other, DeferredSpec) else other
        return self.resolve() == other

    __hash__ = None


def _the(spec):
    return spec
