"""Sufficient statistics summed over blocks of rows (``_suffstats``): equal to the cross-products
of the whole data, whatever the blocks and the order of merges."""
from __future__ import annotations

import numpy as np
import pytest

from fastlmm_ext import datasets
from fastlmm_ext._crossprod import CrossProducts
from fastlmm_ext._design import build_structure
from fastlmm_ext._suffstats import SuffStats

DF = datasets.simulate_crossed(900, 30, 9, seed=7, slope_sd=0.3)
W = np.random.default_rng(4).uniform(0.3, 2.5, len(DF))
OFF = np.random.default_rng(5).normal(0, 0.5, len(DF))


def structure(weighted: bool):
    return build_structure("y ~ x + (x|a) + (1|b)", DF.assign(y=DF.y + 1e6, w=W, o=OFF),
                           weights="w" if weighted else None, offset="o")


def stats_of(s, rows, weighted: bool) -> SuffStats:
    st = SuffStats(list(s.terms), s.p, weighted=weighted)
    st.add(s.y[rows], s.X[rows], [t.codes[rows] for t in s.terms], [t.Xi[rows] for t in s.terms],
           offset=s.offset[rows], weights=s.weights[rows] if weighted else None)
    return st


def assert_same(cp: CrossProducts, want: CrossProducts):
    for f in ("Ap", "Ai"):
        np.testing.assert_array_equal(getattr(cp, f), getattr(want, f))
    np.testing.assert_allclose(cp.Mx, want.Mx, rtol=1e-12, atol=1e-12)
    # ỹ differs by the shift only; the criterion uses the fixed-effects-adjusted sums, equal to rounding
    np.testing.assert_allclose(cp.ZtXy, want.ZtXy, rtol=1e-8, atol=1e-8 * np.abs(want.ZtXy).max())
    np.testing.assert_allclose(cp.XyXy, want.XyXy, rtol=1e-8, atol=1e-8 * np.abs(want.XyXy).max())
    np.testing.assert_allclose(cp.beta_shift, want.beta_shift, rtol=1e-9)
    assert cp.n == want.n and cp.sum_log_w == pytest.approx(want.sum_log_w, rel=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_blocks_equal_the_whole(weighted):
    s = structure(weighted)
    want = CrossProducts.from_structure(s)
    parts = np.array_split(np.random.default_rng(1).permutation(s.n), 5)
    acc = stats_of(s, parts[0], weighted)
    for rows in parts[1:]:
        acc.merge(stats_of(s, rows, weighted))
    assert acc.kept_columns() == [0, 1]
    assert_same(acc.finish([0, 1]), want)


def test_merge_is_associative():
    """(A + B) + C and A + (B + C) give the same statistics (to rounding), and so the whole's."""
    s = structure(True)
    want = CrossProducts.from_structure(s)
    a, b, c = np.array_split(np.arange(s.n), 3)
    left = stats_of(s, a, True).merge(stats_of(s, b, True)).merge(stats_of(s, c, True))
    right = stats_of(s, a, True).merge(stats_of(s, b, True).merge(stats_of(s, c, True)))
    empty = SuffStats(list(s.terms), s.p, weighted=True)
    empty.n_dropped = 3
    right = empty.merge(right)
    assert right.n_dropped == 3
    assert_same(left.finish([0, 1]), want)
    assert_same(right.finish([0, 1]), want)


def test_response_spread():
    """Σ w (r − r̄_w)² and Σ w r² of r = y − offset, without cancellation for a large level."""
    s = structure(True)
    st = stats_of(s, np.arange(300), True).merge(stats_of(s, np.arange(300, s.n), True))
    r, w = s.y - s.offset, s.weights
    rbar = np.sum(w * r) / np.sum(w)
    css, ss = st.response_spread()
    assert css == pytest.approx(np.sum(w * (r - rbar) ** 2), rel=1e-9)
    assert ss == pytest.approx(np.sum(w * r * r), rel=1e-12)
