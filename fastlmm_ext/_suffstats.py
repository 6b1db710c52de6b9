"""Sufficient statistics of an LMM accumulated over blocks of rows.

The profiled criterion needs the data only through  n, Σ log wᵢ  and the cross-products

    ZᵀWZ,  ZᵀW[X ỹ],  [X ỹ]ᵀW[X ỹ],        ỹ = y − offset − X b,

(see ``_crossprod``); all of them are sums over rows, so blocks of rows (chunks of a file,
partitions of a Dask DataFrame) can be reduced independently and added.  ZᵀWZ is kept as
(row, col, value) triplets of its block-closed lower pattern and duplicates are summed when
the buffer grows, so memory is O(non-zeros of ZᵀZ), never O(n).

The shift b removes the bulk of y (its mean, its trend in X) before squares are summed, so
that r² = ỹᵀWỹ − … does not cancel.  Each accumulator takes b from the least-squares fit of
its first block; when two accumulators with shifts b_A, b_B are merged, B's sums are moved to
b_A exactly:  with d = b_A − b_B,
    ZᵀWỹ_A = ZᵀWỹ_B − ZᵀWX d,   XᵀWỹ_A = XᵀWỹ_B − XᵀWX d,
    ỹ_AᵀWỹ_A = ỹ_BᵀWỹ_B − 2 dᵀXᵀWỹ_B + dᵀXᵀWX d.
At the end the same move puts b at the weighted least-squares solution of all the data.
Each block's ỹ subtracts the intercept's share of X b first (``_ols.shift_residual``), so a
response with a large common level (10¹² + …) loses no digits.  For the exact-fit check the
accumulator also keeps Σ w and the sums of w (r − c), w (r − c)² about a value c of r = y − offset
from its first block (moved to the other's c on merge), from which ``response_spread`` gives the
variation of r about its weighted mean without cancellation.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._crossprod import CrossProducts, log_weight_sum, lower_csc, sum_duplicates, ztz_triplets
from ._design import ReTerm, assemble_Z, basis_rows, rank_deficient_keep
from ._ols import centred_ss, ols_shift, response_level, shift_residual

__all__ = ["SuffStats"]

# Sum duplicate ZᵀZ triplets once the unsummed ones outnumber the summed ones (and this many):
# memory stays within about twice ZᵀZ's non-zeros, and each triplet is re-sorted O(log) times.
COMPACT_MIN = 100_000


class _BlockTerm:
    """A term's metadata with one block's codes and model matrix (what ztz_triplets reads)."""
    __slots__ = ("codes", "Xi", "k", "nlevels", "col_offset")

    def __init__(self, t: ReTerm, codes: np.ndarray, Xi: np.ndarray):
        self.codes, self.Xi, self.k, self.nlevels, self.col_offset = codes, Xi, t.k, t.nlevels, t.col_offset

    @property
    def q(self) -> int:
        return self.k * self.nlevels


class SuffStats:
    """Running sums for a model whose terms (sorted, with global levels) and raw fixed-effects
    columns (p of them, before any rank-deficient column is dropped) are fixed.

    ``add`` one block at a time, ``merge`` accumulators of disjoint row sets, ``finish`` to get
    the kernel's :class:`CrossProducts` and the fixed-effects columns kept."""

    def __init__(self, terms: list[ReTerm], p: int, weighted: bool):
        self.terms = list(terms)
        self.q = sum(t.q for t in terms)
        self.p = p
        self.weighted = weighted
        self.n = 0
        self.n_dropped = 0
        self.sum_log_w = 0.0
        self.shift: np.ndarray | None = None      # b of ỹ = y − offset − X b
        self.XyXy = np.zeros((p + 1, p + 1))      # [X ỹ]ᵀ W [X ỹ]
        self.XtX = np.zeros((p, p))               # unweighted XᵀX, for the rank check
        self.ZtXy = np.zeros((self.q, p + 1))
        # For the exact-fit check: Σ w, and Σ w (r − c), Σ w (r − c)² about a value c of r = y − offset
        self.level: float | None = None
        self.sum_w = 0.0
        self.s1 = 0.0
        self.s2 = 0.0
        self._trip: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._merged = 0                          # triplets in _trip[0] after the last compaction
        self._pending = 0
        # The fixed part's data columns (and X) at rows on which X has its rank, for the ANOVA
        # hypotheses (ModelStructure.fixed_rows): a basis of each block's rows, re-reduced as they pile up.
        self.basis: pd.DataFrame | None = None
        self.basis_X = np.zeros((0, p))

    # ------------------------------------------------------------------ accumulation
    def add(self, y: np.ndarray, X: np.ndarray, term_codes: list[np.ndarray], term_Xi: list[np.ndarray],
            offset: np.ndarray | None = None, weights: np.ndarray | None = None,
            rows: pd.DataFrame | None = None) -> None:
        """Add a block of complete rows; ``term_codes``/``term_Xi`` in the order of ``terms``;
        ``rows``: the block's fixed-part data columns, of which a basis is kept (``basis``)."""
        n = y.shape[0]
        if n == 0:
            return
        y0 = y - offset if offset is not None else y
        w = weights
        if self.shift is None:
            self.shift = _pilot_shift(X, y0, w)
            self.level = response_level(y0, w)
        yt = shift_residual(y0, X, self.shift)
        Xy = np.column_stack([X, yt])
        WXy = Xy if w is None else Xy * w[:, None]
        block = Xy.T @ WXy
        self.XyXy += block
        XtX = block[:self.p, :self.p] if w is None else X.T @ X
        if self.weighted:
            self.XtX += XtX
        if rows is not None:
            idx = basis_rows(X, XtX)
            self._add_basis(rows.iloc[idx], X[idx])
        d = y0 - self.level
        wd = d if w is None else w * d
        self.sum_w += float(n if w is None else np.sum(w))
        self.s1 += float(np.sum(wd))
        self.s2 += float(d @ wd)
        if w is not None:
            self.sum_log_w += log_weight_sum(w)
        bt = [_BlockTerm(t, c, Xi) for t, c, Xi in zip(self.terms, term_codes, term_Xi)]
        if bt:
            Z = assemble_Z(bt, n)
            self.ZtXy += np.asarray(Z.T @ WXy)
            r, c, x = ztz_triplets(bt, w)
            self._trip.append((r, c, x))
            self._pending += r.size
            if self._pending > max(self._merged, COMPACT_MIN):
                self._compact()
        self.n += n

    def _add_basis(self, rows: pd.DataFrame, X: np.ndarray) -> None:
        """Append rows to the basis; past 4p + 16 rows, keep a basis of them (it spans the same)."""
        self.basis = rows if self.basis is None else pd.concat([self.basis, rows])
        self.basis_X = np.vstack([self.basis_X, X])
        if len(self.basis_X) > 4 * self.p + 16:
            idx = basis_rows(self.basis_X, self.basis_X.T @ self.basis_X)
            self.basis, self.basis_X = self.basis.iloc[idx], self.basis_X[idx]

    def _compact(self) -> None:
        if len(self._trip) > 1:
            r, c, x = (np.concatenate(a) for a in zip(*self._trip))
            self._trip = [sum_duplicates(r, c, x, self.q)]
        self._merged = self._trip[0][0].size if self._trip else 0
        self._pending = 0

    def merge(self, other: "SuffStats") -> "SuffStats":
        """Add another accumulator's sums (disjoint rows of the same model) into this one."""
        if other.n == 0:
            self.n_dropped += other.n_dropped
            return self
        if self.shift is None:
            self.shift, self.level = other.shift, other.level
        else:
            other._move_shift(self.shift)
            other._move_level(self.level)
        self.n += other.n
        self.n_dropped += other.n_dropped
        self.sum_log_w += other.sum_log_w
        self.XyXy += other.XyXy
        self.XtX += other.XtX
        self.ZtXy += other.ZtXy
        self.sum_w += other.sum_w
        self.s1 += other.s1
        self.s2 += other.s2
        self._trip += other._trip
        self._pending += sum(t[0].size for t in other._trip)
        if other.basis is not None:
            self._add_basis(other.basis, other.basis_X)
        if self._pending > max(self._merged, COMPACT_MIN):
            self._compact()
        return self

    def _move_shift(self, b_new: np.ndarray) -> None:
        """Re-express the sums for ỹ = y − offset − X b_new (module docstring)."""
        p = self.p
        if not p or self.shift is None:
            return
        d = b_new - self.shift
        XtWX, XtWy = self.XyXy[:p, :p], self.XyXy[:p, p]
        yy = self.XyXy[p, p] - 2.0 * d @ XtWy + d @ XtWX @ d
        new_col = XtWy - XtWX @ d
        self.XyXy[:p, p] = new_col
        self.XyXy[p, :p] = new_col
        self.XyXy[p, p] = max(yy, 0.0)
        self.ZtXy[:, p] -= self.ZtXy[:, :p] @ d
        self.shift = b_new.copy()

    def _move_level(self, c_new: float) -> None:
        """Re-express s1, s2 about c_new:  with δ = c − c_new,  Σ w (r − c_new) = s1 + δ Σw  and
        Σ w (r − c_new)² = s2 + 2 δ s1 + δ² Σw."""
        delta = self.level - c_new
        self.s2 += 2.0 * delta * self.s1 + delta * delta * self.sum_w
        self.s1 += delta * self.sum_w
        self.level = c_new

    def response_spread(self) -> tuple[float, float]:
        """(Σ w (r − r̄_w)², Σ w r²) of r = y − offset, for ``_ols.raise_if_exact``."""
        c = self.level or 0.0
        return centred_ss(self.sum_w, self.s1, self.s2), max(self.s2 + 2.0 * c * self.s1 + c * c * self.sum_w, 0.0)

    # ------------------------------------------------------------------ result
    def unweighted_gram(self) -> np.ndarray:
        """XᵀX of all raw fixed-effects columns, unweighted."""
        return self.XtX if self.weighted else self.XyXy[:self.p, :self.p]

    def kept_columns(self) -> list[int]:
        """Fixed-effects columns kept by the same rank rule as the in-memory path (unweighted XᵀX)."""
        return rank_deficient_keep(self.unweighted_gram()) if self.p else []

    def finish(self, keep: list[int]) -> CrossProducts:
        """Cross-products over the kept fixed-effects columns, with ỹ the weighted OLS residual
        (its ỹᵀWỹ is then the residual sum of squares the exact-fit check reads)."""
        self._compact()
        p = self.p
        if keep:
            # The dropped columns are (numerically) combinations of the kept ones, so moving the
            # shift along the kept columns alone leaves the criterion unchanged.
            d = np.zeros(p)
            d[keep] = np.linalg.solve(self.XyXy[np.ix_(keep, keep)], self.XyXy[keep, p])
            self._move_shift(self.shift + d)
        shift = np.zeros(p) if self.shift is None else self.shift
        b = shift[keep]
        dropped = [j for j in range(p) if j not in set(keep)]
        if keep and dropped and np.any(shift[dropped] != 0.0):
            # Express X_dropped b_dropped through the kept columns (least squares in the Gram).
            G = self.XyXy[:p, :p]
            b = b + np.linalg.solve(G[np.ix_(keep, keep)], G[np.ix_(keep, dropped)]) @ shift[dropped]
        idx = np.asarray(list(keep) + [p], dtype=np.intp)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        Ap, Ai, Mx = lower_csc(*(self._trip[0] if self._trip else empty), self.q)
        return CrossProducts(Ap=Ap, Ai=Ai, Mx=Mx, ZtXy=np.asfortranarray(self.ZtXy[:, idx]),
                             XyXy=np.asfortranarray(self.XyXy[np.ix_(idx, idx)]), beta_shift=b, n=self.n,
                             sum_log_w=self.sum_log_w)


def _pilot_shift(X: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """Weighted least-squares coefficients of the first block, on the columns independent there
    (a column dependent on the whole data is dependent on every block, so no shift lands on a
    column the final rank check drops)."""
    p = X.shape[1]
    b = np.zeros(p)
    if p == 0:
        return b
    keep = rank_deficient_keep(X.T @ X)
    if keep:
        b[keep] = ols_shift(X[:, keep], y, w)[1]
    return b
