"""The cross-products of [Z X y] (``_crossprod``) against the dense products of the design, and
the compiled kernel's layout against θ's (``_params``)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from fastlmm_ext import datasets
from fastlmm_ext._crossprod import CrossProducts, kernel_layout, level_blocks, log_weight_sum
from fastlmm_ext._design import build_structure
from fastlmm_ext._params import flat_positions

CROSSED = datasets.simulate_crossed(600, 25, 8, seed=5, slope_sd=0.3)
FORMULAS = ["y ~ x + (x|a) + (1|b)", "y ~ x + (1|a) + (1|b) + (1|a:b)", "y ~ 1 + (1 + x|b)"]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("formula", FORMULAS)
def test_equal_the_dense_products(formula, weighted):
    w = np.random.default_rng(2).uniform(0.2, 3.0, len(CROSSED)) if weighted else None
    s = build_structure(formula, CROSSED.assign(y=CROSSED.y + 1e3), weights=w)
    cp = CrossProducts.from_structure(s)
    Z, X, W = s.Z.toarray(), s.X, np.ones(s.n) if w is None else w
    # ZᵀWZ on its lower block-closed pattern: every stored entry equals the dense product, and
    # every non-zero of the dense lower triangle is stored
    ZtWZ = Z.T @ (Z * W[:, None])
    L = sp.csc_matrix((cp.Mx, cp.Ai, cp.Ap), shape=(s.q, s.q)).toarray()
    stored = sp.csc_matrix((np.ones_like(cp.Mx), cp.Ai, cp.Ap), shape=(s.q, s.q)).toarray() > 0
    np.testing.assert_allclose(L[stored], ZtWZ[stored], rtol=1e-12, atol=1e-12)
    assert not (np.abs(np.tril(ZtWZ)) > 0)[~stored].any()
    # ỹ = y − Xb is the weighted OLS residual, and [X ỹ] enters both products
    yt = s.y - X @ cp.beta_shift
    np.testing.assert_allclose(X.T @ (W * yt), 0.0, atol=1e-8 * np.abs(X.T @ (W * s.y)).max())
    Xy = np.column_stack([X, yt])
    np.testing.assert_allclose(cp.ZtXy, Z.T @ (Xy * W[:, None]), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(cp.XyXy, Xy.T @ (Xy * W[:, None]), rtol=1e-10, atol=1e-8)
    assert cp.n == s.n and cp.sum_log_w == pytest.approx(0.0 if w is None else np.sum(np.log(w)), rel=1e-13)
    for t in s.terms:      # the level blocks are the k×k diagonal blocks of ZᵀWZ
        idx = t.col_offset + np.arange(t.nlevels)[:, None] * t.k + np.arange(t.k)[None, :]
        np.testing.assert_allclose(level_blocks(cp, t), ZtWZ[idx[:, :, None], idx[:, None, :]], rtol=1e-12)


def test_log_weight_sum():
    assert log_weight_sum(None) == 0.0
    assert log_weight_sum(np.array([1.0, np.e, 0.0, np.e ** 2])) == pytest.approx(3.0)   # zero weights do not count


def test_kernel_layout_follows_theta():
    """Per column: its level block's first column and size, the term's T in the flat storage; θ's
    elements sit at the column-major positions of T's lower triangle, column by column."""
    s = build_structure("y ~ x + (x|a) + (1|b)", CROSSED)
    bstart, bsize, toff, Tflat, theta_pos = kernel_layout(s)
    a, b = s.terms
    assert bstart[:6].tolist() == [0, 0, 2, 2, 4, 4] and bsize[:2].tolist() == [2, 2] and toff[0] == 0
    assert bstart[a.q:a.q + 3].tolist() == [a.q, a.q + 1, a.q + 2] and bsize[a.q] == 1 and toff[a.q] == 4
    assert theta_pos.tolist() == flat_positions(2).tolist() + [4] == [0, 1, 3, 4]
    assert Tflat.shape == (5,) and not Tflat.any()
