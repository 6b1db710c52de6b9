"""Cross-products of new responses on a fixed design (refit, ``fit_many``).

Of the sufficient statistics in :class:`~fastlmm_ext._crossprod.CrossProducts`, only the
response's column and row depend on y:

    ZᵀWỹ  (q),   XᵀWỹ  (p),   ỹᵀWỹ,      ỹ = y − offset − X b,  b = argmin ‖W^½(y − offset − X b)‖²

while ZᵀWZ, ZᵀWX and XᵀWX are shared.  As in ``CrossProducts.from_structure``, ỹ is the weighted
OLS residual (the criterion is invariant to y → y − X b; removing the mean of y avoids
cancellation in r²), and β̂ is shifted back by b afterwards.  For an n × m matrix of responses
all m columns of ZᵀWỸ come from one sparse-dense product; the O(n p²) dense parts are formed
per column, exactly as a fresh model forms them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ._crossprod import CrossProducts
from ._design import ModelStructure
from ._exceptions import DataError
from ._ols import raise_if_exact_rows, response_shift

__all__ = ["check_not_exact", "response_crossproducts"]


def response_crossproducts(s: ModelStructure, cp: CrossProducts, Y) -> list[CrossProducts]:
    """Cross-products of each column of ``Y`` (n × m, or a vector) on the design of ``s``,
    sharing ``cp``'s ZᵀWZ arrays; one :class:`CrossProducts` per column (``dataclasses.replace``
    of ``cp`` with new ``ZtXy``, ``XyXy`` and ``beta_shift``).

    ZᵀWỸ for all columns is one sparse-dense product.  The small dense parts (b, the
    (p+1)×(p+1) Gram matrix of [X ỹ]) are formed column by column with the same operations as
    ``CrossProducts.from_structure``, so each response's statistics are bitwise those of a fresh
    model on it, whatever the batch it comes in (results do not depend on batching or n_jobs).

    Raises DataError for a column that X reproduces exactly (no residual variance; lmer refuses
    such a response too).  The caller checks lengths and finiteness."""
    Y = np.asarray(Y, dtype=np.float64)
    Y = Y.reshape(-1, 1) if Y.ndim == 1 else Y
    if Y.shape[0] != s.n:
        raise DataError(f"responses have {Y.shape[0]} rows, the model has {s.n} observations")
    m = Y.shape[1]
    w = s.weights
    Yt = np.empty_like(Y)
    B = np.zeros((s.p, m))
    for j in range(m):
        Yt[:, j], B[:, j], r = response_shift(Y[:, j], s.X, s.offset, w)
        raise_if_exact_rows(Yt[:, j], r, w, "response" if m == 1 else f"response {j + 1} of {m}", s.p)
    WYt = Yt if w is None else Yt * w[:, None]
    ZtWY = np.asarray(s.Z.T @ WYt).reshape(s.q, m)       # the one sparse-dense product
    out = []
    for j in range(m):
        Xy = np.column_stack([s.X, Yt[:, j]])
        XyXy = Xy.T @ (Xy if w is None else Xy * w[:, None])
        out.append(_one(cp, s.p, ZtWY[:, j], XyXy, B[:, j]))
    return out


def check_not_exact(s: ModelStructure, y) -> None:
    """DataError if ``y`` minus the offset is a linear function of X."""
    yt, _, r = response_shift(np.asarray(y, dtype=np.float64).ravel(), s.X, s.offset, s.weights)
    raise_if_exact_rows(yt, r, s.weights, "response", s.p)


def _one(cp: CrossProducts, p: int, zty: np.ndarray, G: np.ndarray, b: np.ndarray) -> CrossProducts:
    """cp with its response column and row replaced by those of ZᵀWỹ and the Gram matrix ``G`` of
    [X ỹ] (its two triangles may differ in the last bit, so both are copied); the kernel wants
    whole Fortran arrays."""
    ZtXy = np.empty_like(cp.ZtXy, order="F")
    ZtXy[:, :p] = cp.ZtXy[:, :p]
    ZtXy[:, p] = zty
    XyXy = np.array(cp.XyXy, order="F", copy=True)
    XyXy[:, p] = G[:, p]
    XyXy[p, :] = G[p, :]
    return dataclasses.replace(cp, ZtXy=ZtXy, XyXy=XyXy, beta_shift=np.array(b, dtype=np.float64))
