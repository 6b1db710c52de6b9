"""R's functions of the formula dialect, with R's values: poly, scale, ns, bs, factor, relevel,
as.numeric, log, c.

The stateful ones (poly, scale, ns, bs) take ``_state``: empty when the model is built, they
learn what R's ``makepredictcall`` keeps and store it there; filled (new data in
``predict``), they apply it.

* ``poly(x, k)``: with x̄ the mean, the Gram–Schmidt basis of [1, x−x̄, …, (x−x̄)ᵏ] (QR with R's
  signs), constant column dropped.  Kept: R's ``coefs`` (α, ‖·‖²), with which new x go through
  the three-term recurrence  P₀ = 1, P₁ = x − α₁,  P_{i+1} = (x − α_{i+1}) P_i − (n_{i+1}/n_i) P_{i−1},
  each P_i divided by √n_{i+1}.  ``raw=TRUE``: x, x², …, xᵏ.
* ``scale(x)``: (x − x̄)/s with s the SD (n − 1); ``center=FALSE`` divides by
  √(Σx²/(n − 1)); numbers given for center/scale are used as they are.
* ``bs(x, df, knots, degree = 3)`` and ``ns(x, df, knots)`` (package splines): interior knots at
  the quantiles (type 7) of x at 1/(m+1), …, m/(m+1) with m = df − degree (bs) or df − 1 (ns),
  boundary knots at the range; the B-spline basis of order degree + 1 on those knots (scipy's
  BSpline, which equals R's ``splineDesign``), first column dropped (``intercept = FALSE``).
  ns projects on the null space of the second derivatives at the boundary knots (R: the last
  columns of Q of the QR of that 2-row constraint, transposed).  Beyond the boundary knots R
  extrapolates, and so do these: bs by the Taylor polynomial of degree ``degree`` at a pivot a
  quarter of the way to the nearest interior knot, ns linearly at the boundary knot.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from formulaic.materializers.types import FactorValues
from scipy.interpolate import BSpline

from ._data import _label, factor_codes
from ._exceptions import DataError, FormulaError

__all__ = ["poly", "scale", "ns", "bs", "factor", "relevel", "as_numeric", "r_log", "r_c", "spline_design"]


def _vector(x, fname: str) -> np.ndarray:
    if _is_categorical(x):
        raise DataError(f"{fname}() needs a numeric variable, got a factor")
    a = np.asarray(x, dtype=float)
    if a.ndim != 1:
        raise DataError(f"{fname}() of a matrix is not supported")
    return a


def _basis(M: np.ndarray) -> FactorValues:
    """A matrix-valued variable; R names its columns 1, 2, …  ("poly(x, 2)1")."""
    return FactorValues(M, kind="numerical", column_names=tuple(str(j + 1) for j in range(M.shape[1])),
                        format="{name}[{field}]")


def _flag(v, name: str, fname: str) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    raise FormulaError(f"{fname}(): {name} must be TRUE or FALSE, got {v!r}")


def _count(v, name: str, fname: str, minimum: int = 0) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or float(v) != int(v) or int(v) < minimum:
        raise FormulaError(f"{fname}(): {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


# ----------------------------------------------------------------------------- poly

def poly(x, degree=1, raw=False, *, _state: dict) -> FactorValues:
    """R's ``poly(x, degree, raw)`` (module docstring)."""
    x = _vector(x, "poly")
    degree = _count(degree, "degree", "poly", 1)
    if _flag(raw, "raw", "poly"):
        return _basis(x[:, None] ** np.arange(1, degree + 1)[None, :])
    if "alpha" not in _state:
        if degree >= np.unique(x).size:
            raise DataError(f"poly(): 'degree' ({degree}) must be less than the number of unique points "
                            f"({np.unique(x).size})")
        xbar = x.mean()
        xc = x - xbar
        Q, R = np.linalg.qr(xc[:, None] ** np.arange(degree + 1)[None, :])
        Z = Q * np.diag(R)[None, :]                     # R's qr.qy(QR, diag(R))
        norm2 = np.sum(Z ** 2, axis=0)
        _state["alpha"] = ((xc @ Z ** 2) / norm2 + xbar)[:degree]
        _state["norm2"] = np.concatenate([[1.0], norm2])
        return _basis(Z[:, 1:] / np.sqrt(norm2[1:])[None, :])
    alpha, norm2 = _state["alpha"], _state["norm2"]
    if alpha.size != degree:
        raise FormulaError("poly(): degree differs from the fitted model's")
    Z = np.ones((x.size, degree + 1))
    Z[:, 1] = x - alpha[0]
    for i in range(1, degree):
        Z[:, i + 1] = (x - alpha[i]) * Z[:, i] - (norm2[i + 1] / norm2[i]) * Z[:, i - 1]
    return _basis(Z[:, 1:] / np.sqrt(norm2[2:])[None, :])


# ----------------------------------------------------------------------------- scale

def scale(x, center=True, scale=True, *, _state: dict) -> np.ndarray:
    """R's ``scale(x, center, scale)`` of one variable (module docstring)."""
    x = _vector(x, "scale")
    if "center" not in _state:
        if isinstance(center, (bool, np.bool_)):
            c = float(x.mean()) if center else None
        else:
            c = float(center)
        xc = x - c if c is not None else x
        if isinstance(scale, (bool, np.bool_)):
            s = float(np.sqrt(np.sum(xc ** 2) / (x.size - 1))) if scale and x.size > 1 else None
        else:
            s = float(scale)
        _state["center"], _state["scale"] = c, s
    c, s = _state["center"], _state["scale"]
    out = x - c if c is not None else x.copy()
    return out / s if s is not None else out


# ----------------------------------------------------------------------------- splines

def spline_design(knots: np.ndarray, x: np.ndarray, order: int, deriv: int = 0) -> np.ndarray:
    """R's ``splineDesign(knots, x, ord, derivs)``: the len(knots) − ord B-splines of order ``ord``
    on ``knots`` (or their ``deriv``-th derivative) at x, x within the boundary knots."""
    nb = len(knots) - order
    return np.asarray(BSpline(knots, np.eye(nb), order - 1, extrapolate=False)(x, nu=deriv)).reshape(x.size, nb)


def _knots(x: np.ndarray, n_inner: int) -> np.ndarray:
    if n_inner <= 0:
        return np.zeros(0)
    probs = np.linspace(0.0, 1.0, n_inner + 2)[1:-1]
    return np.quantile(x, probs)


def _spline_state(x, df, knots, n_from_df, boundary, fname: str, _state: dict) -> None:
    if "knots" in _state:
        return
    if boundary is not None:
        b = np.sort(np.asarray(boundary, dtype=float).ravel())
        if b.size != 2:
            raise FormulaError(f"{fname}(): Boundary.knots must be two numbers")
    else:
        b = np.array([x.min(), x.max()])
    inside = x[(x >= b[0]) & (x <= b[1])]
    if knots is not None:
        k = np.sort(np.atleast_1d(np.asarray(knots, dtype=float)))
    elif df is not None:
        k = _knots(inside, max(n_from_df(_count(df, "df", fname, 1)), 0))
    else:
        k = np.zeros(0)
    _state["knots"], _state["boundary"] = k, b


def bs(x, df=None, knots=None, degree=3, intercept=False, Boundary_knots=None, *, _state: dict) -> FactorValues:
    """R's ``splines::bs`` (module docstring)."""
    x = _vector(x, "bs")
    degree = _count(degree, "degree", "bs", 1)
    intercept = _flag(intercept, "intercept", "bs")
    order = degree + 1
    _spline_state(x, df, knots, lambda d: d - order + (1 - int(intercept)), Boundary_knots, "bs", _state)
    k, b = _state["knots"], _state["boundary"]
    t = np.sort(np.concatenate([np.repeat(b, order), k]))
    left, right = x < b[0], x > b[1]
    basis = np.zeros((x.size, t.size - order))
    inside = ~(left | right)
    basis[inside] = spline_design(t, x[inside], order)
    scalef = np.array([math.factorial(j) for j in range(order)], dtype=float)
    for mask, pivot in ((left, 0.75 * b[0] + 0.25 * t[order]), (right, 0.75 * b[1] + 0.25 * t[t.size - order - 1])):
        if mask.any():
            D = np.vstack([spline_design(t, np.array([pivot]), order, j) for j in range(order)])
            P = (x[mask] - pivot)[:, None] ** np.arange(order)[None, :]
            basis[mask] = P @ (D / scalef[:, None])
    return _basis(basis if intercept else basis[:, 1:])


def ns(x, df=None, knots=None, intercept=False, Boundary_knots=None, *, _state: dict) -> FactorValues:
    """R's ``splines::ns`` (module docstring)."""
    x = _vector(x, "ns")
    intercept = _flag(intercept, "intercept", "ns")
    _spline_state(x, df, knots, lambda d: d - 1 - int(intercept), Boundary_knots, "ns", _state)
    k, b = _state["knots"], _state["boundary"]
    t = np.sort(np.concatenate([np.repeat(b, 4), k]))
    left, right = x < b[0], x > b[1]
    basis = np.zeros((x.size, t.size - 4))
    inside = ~(left | right)
    basis[inside] = spline_design(t, x[inside], 4)
    for mask, pivot in ((left, b[0]), (right, b[1])):
        if mask.any():
            D = np.vstack([spline_design(t, np.array([pivot]), 4, j) for j in (0, 1)])
            basis[mask] = np.column_stack([np.ones(mask.sum()), x[mask] - pivot]) @ D
    const = np.vstack([spline_design(t, np.array([bb]), 4, 2) for bb in b])
    if not intercept:
        const, basis = const[:, 1:], basis[:, 1:]
    Q, _ = np.linalg.qr(const.T, mode="complete")
    return _basis(basis @ Q[:, 2:])


# ----------------------------------------------------------------------------- factors

def _is_categorical(x) -> bool:
    return isinstance(x, pd.Categorical) or isinstance(getattr(x, "dtype", None), pd.CategoricalDtype)


def factor(x, levels=None) -> pd.Categorical:
    """R's ``factor(x)`` / ``as.factor(x)``: levels sorted (numbers numerically), labelled as R
    prints them (a factor keeps its level order, unused levels dropped); ``levels=`` gives the
    levels and their order, and every value must be one of them."""
    if _is_categorical(x):
        cat = pd.Categorical(x).remove_unused_categories()
        cat = cat.rename_categories([_label(v) for v in cat.categories])
    else:
        codes, labels = factor_codes(pd.Series(np.asarray(x)), "factor")
        cat = pd.Categorical.from_codes(codes, categories=labels)
    if levels is None:
        return cat
    wanted = [_label(v) for v in np.atleast_1d(np.asarray(levels, dtype=object))]
    out = pd.Categorical(np.asarray(cat, dtype=object), categories=wanted)
    if (out.codes < 0).any():
        missing = sorted(set(np.asarray(cat, dtype=object)[out.codes < 0]))[:5]
        raise DataError(f"factor(): value(s) {missing} are not among levels = {wanted}")
    return out


def relevel(x, ref) -> pd.Categorical:
    """R's ``relevel(f, ref)``: the factor with level ``ref`` moved first (a factor keeps all its
    levels, as in R)."""
    if _is_categorical(x):
        f = pd.Categorical(x)
        f = f.rename_categories([_label(v) for v in f.categories])
    else:
        f = factor(x)
    cats = list(f.categories)
    r = _label(ref)
    if r not in cats:
        raise DataError(f"relevel(): 'ref' {ref!r} is not a level (levels: {', '.join(cats[:10])})")
    return f.reorder_categories([r] + [c for c in cats if c != r])


def as_numeric(x) -> np.ndarray:
    """R's ``as.numeric``: a factor gives its level codes 1..K (as in R), numbers themselves."""
    if _is_categorical(x):
        return np.asarray(pd.Categorical(x).codes, dtype=float) + 1.0
    return np.asarray(pd.to_numeric(pd.Series(np.asarray(x)), errors="raise"), dtype=float)


def r_log(x, base=math.e):
    """R's ``log(x, base = exp(1))``: the natural logarithm unless a base is given."""
    return np.log(x) if base == math.e else np.log(x) / np.log(base)


def r_c(*values) -> np.ndarray:
    """R's ``c(...)`` of numbers or strings (knots = c(1, 2), levels = c("a", "b"))."""
    return np.concatenate([np.atleast_1d(np.asarray(v)) for v in values]) if values else np.zeros(0)
