"""The response's least-squares shift ỹ = r − X b, and the exact-fit check, for every path.

The profiled criterion is invariant to y → y − X b for any b (β̂ absorbs b), so the in-memory,
refit and chunked paths all form their cross-products from

    ỹ = r − X b,    r = y − offset,    b = argmin_b ‖W^½ (r − X b)‖²,

and shift β̂ back by b; ỹ has the size of the residual variation, so sums of its squares do
not cancel.

Digits.  For a response with a large common level (y = 10¹² + x + noise), every element of
a computed X b is rounded to the level's unit of rounding (ulp(10¹²) ≈ 1.2·10⁻⁴), which would
perturb ỹ by that much and the criterion by ~10⁻³.  When X has a column of ones (the
intercept), a value c of r is subtracted first: r − c is exact for values within a factor 2 of
c (Sterbenz's lemma), so the common level costs nothing, and the small rest of X b rounds
at its own scale.  The same order (the ones column's share first, then the rest) serves a given
b (``shift_residual``, the chunked path's fixed shift).

Exactness.  A response that X reproduces leaves no residual variance.  The check is
scale-free: with rss = ‖W^½ ỹ‖², css = Σ w (r − r̄_w)² (the variation of r about its weighted
mean) and ss = Σ w r²,

    exact  ⇔  rss ≤ (10⁻¹²)² css     (residual negligible beside the variation of r)
           or  rss ≤ (10⁻¹⁵)² ss      (residual at the level of rounding of r itself, ~4.5 ulp;
                                       R's summary.lm warns of an "essentially perfect fit"
                                       at about the same level).

A common level of y alone is no reason to refuse (10¹² + noise of sd 0.5 is fitted, and
equals the fit of y − 10¹²); only noise within a few units of rounding of the level, which
float64 cannot keep apart from it, counts as none.  Without an intercept the same two tests
apply (X must then reproduce r's mean too).  A constant response is refused: with an
intercept, r − c and so ỹ and css are exactly zero.  With prior weights every sum is weighted;
rows of weight 0 do not count.
"""
from __future__ import annotations

import numpy as np

from ._exceptions import DataError

__all__ = ["ols_shift", "response_shift", "remove_level", "shift_residual", "ones_column", "response_level",
           "centred_ss", "raise_if_exact", "raise_if_exact_rows"]

EXACT_REL = 1e-12       # ‖ỹ‖ / ‖r − r̄‖ at or below this: the fixed effects reproduce r
ROUNDING_REL = 1e-15    # ‖ỹ‖ / ‖r‖ at or below this: ỹ is rounding of r's magnitude


def ones_column(X: np.ndarray) -> int | None:
    """Index of a column of X that is 1 in every row (the intercept), or None."""
    for j in range(X.shape[1]):
        col = X[:, j]
        if col.size and col[0] == 1.0 and np.all(col == 1.0):
            return j
    return None


def response_level(r: np.ndarray, w: np.ndarray | None = None) -> float:
    """A value of r (its first row of positive weight): subtracting it is exact for a response
    with a large common level, and makes a constant response exactly zero."""
    if r.size == 0:
        return 0.0
    return float(r[0 if w is None else int(np.argmax(w > 0))])


def remove_level(X: np.ndarray, r: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, int | None, float]:
    """(r − c, j, c): where X has a ones column j, r moved by one of its values c (exact for a
    large common level, module docstring), to be added back to β̂_j; else (r, None, 0)."""
    j = ones_column(X)
    c = response_level(r, w) if j is not None else 0.0
    return (r - c if c != 0.0 else r), j, c


def ols_shift(X: np.ndarray, r: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ỹ, b): b the weighted least-squares coefficients of r on X, ỹ = r − X b (module
    docstring: with a ones column, r is first moved by one of its values)."""
    p = X.shape[1]
    if p == 0:
        return r, np.zeros(0)
    rc, j, c = remove_level(X, r, w)
    if w is None:
        b = np.linalg.lstsq(X, rc, rcond=None)[0]
    else:
        sw = np.sqrt(w)
        b = np.linalg.lstsq(X * sw[:, None], rc * sw, rcond=None)[0]
    yt = rc - X @ b
    if j is not None:
        b[j] += c
    return yt, b


def response_shift(y: np.ndarray, X: np.ndarray, offset: np.ndarray | None = None,
                   w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ỹ, b, r) of a response: r = y − offset and :func:`ols_shift`'s ỹ = r − X b, as every path
    (in memory, refit, fit_many) forms its cross-products and checks for an exact fit."""
    r = y - offset if offset is not None else y
    yt, b = ols_shift(X, r, w)
    return yt, b, r


def shift_residual(r: np.ndarray, X: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ỹ = r − X b for a given b, the share of a ones column subtracted first and alone."""
    if X.shape[1] == 0:
        return r
    j = ones_column(X)
    if j is None:
        return r - X @ b
    rest = np.array(b, dtype=np.float64)
    rest[j] = 0.0
    return (r - b[j]) - X @ rest


def centred_ss(sum_w: float, s1: float, s2: float) -> float:
    """Σ w (r − r̄_w)² from sums about any value c of r:  s1 = Σ w (r − c),  s2 = Σ w (r − c)²."""
    if sum_w <= 0.0:
        return 0.0
    return max(s2 - s1 * s1 / sum_w, 0.0)


def raise_if_exact(rss: float, css: float, ss: float, what: str, p: int) -> None:
    """DataError if the weighted residual sum of squares ``rss`` of r on the p fixed effects is
    zero relative to the variation ``css`` of r about its mean or to ``ss`` = Σ w r² (module
    docstring).  ``what`` names the response ("response 'y'")."""
    if rss <= EXACT_REL ** 2 * css or rss <= ROUNDING_REL ** 2 * ss:
        how = "an exact linear function of the fixed effects" if p else "zero in every row"
        raise DataError(f"{what} is {how}: the residual variance is zero and the model cannot be fitted")


def raise_if_exact_rows(yt: np.ndarray, r: np.ndarray, w: np.ndarray | None, what: str, p: int) -> None:
    """:func:`raise_if_exact` for a response held as rows: ỹ from :func:`ols_shift`, r = y − offset."""
    wr = r if w is None else w * r
    c = response_level(r, w)
    d = r - c
    sum_w = float(r.size if w is None else np.sum(w))
    s1 = float(np.sum(d if w is None else w * d))
    s2 = float(d @ (d if w is None else w * d))
    rss = float(yt @ (yt if w is None else w * yt))
    raise_if_exact(rss, centred_ss(sum_w, s1, s2), float(r @ wr), what, p)
