"""θ's layout, bounds, start and names, Λ, and lme4's Cv_to_Sv / Sv_to_Cv (``_params``): against
hand-computed values, lme4's reference fits and invariants."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import all_reference_fits, load_reference_data
from fastlmm_ext import _params
from fastlmm_ext._design import build_structure

FITS = [(k, f) for k, f in all_reference_fits() if f["dataset"] != "InstEval"]


class Term:
    """The fields of a random-effects term that ``_params`` reads."""

    def __init__(self, k, nlevels=3, theta_offset=0, factor="g", cnms=None):
        self.k, self.nlevels, self.theta_offset, self.factor = k, nlevels, theta_offset, factor
        self.ntheta = k * (k + 1) // 2
        self.cnms = cnms or [f"c{i}" for i in range(k)]


def terms_of(ks):
    out, off = [], 0
    for i, k in enumerate(ks):
        out.append(Term(k, theta_offset=off, factor=f"g{i}"))
        off += out[-1].ntheta
    return out


def test_layout_is_the_lower_triangle_column_by_column():
    rows, cols = _params.tri_indices(3)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2)]
    assert _params.flat_positions(3).tolist() == [0, 1, 2, 4, 5, 8]       # i + 3 j, column-major T
    T = _params.T_from_theta(np.array([1.0, 2.0, 3.0]), 2)
    np.testing.assert_array_equal(T, [[1.0, 0.0], [2.0, 3.0]])
    np.testing.assert_array_equal(_params.theta_from_T(T), [1.0, 2.0, 3.0])
    terms = terms_of([2, 1])
    np.testing.assert_array_equal(_params.lower_bounds(terms), [0.0, -np.inf, 0.0, 0.0])
    np.testing.assert_array_equal(_params.theta_start(terms), [1.0, 0.0, 1.0, 1.0])
    assert _params.theta_kinds(terms) == ["sd", "cor", "sd", "sd"]
    assert _params.theta_names(terms) == ["g0.c0", "g0.c1.c0", "g0.c1", "g1.c0"]


def test_Lambda_is_blockdiag_of_kron():
    terms = terms_of([2, 1])
    terms[1].nlevels = 4
    theta = np.array([0.5, -0.3, 0.8, 1.7])
    T1 = np.array([[0.5, 0.0], [-0.3, 0.8]])
    want = np.zeros((10, 10))
    want[:6, :6] = np.kron(np.eye(3), T1)
    want[6:, 6:] = 1.7 * np.eye(4)
    Lam = _params.Lambda(terms, theta)
    assert sp.issparse(Lam)
    np.testing.assert_array_equal(Lam.toarray(), want)


@pytest.mark.parametrize("key,fit", FITS, ids=[f"{k}:{f['formula']}:{f['REML']}" for k, f in FITS])
def test_bounds_start_and_names_as_lme4(key, fit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = build_structure(fit["formula"], load_reference_data(fit))
    names = list(fit["theta_lower"])
    assert s.theta_names == names
    np.testing.assert_array_equal(s.lower, [-np.inf if v is None else v for v in fit["theta_lower"].values()])
    np.testing.assert_array_equal(s.theta0, [1.0 if v == 0 else 0.0 for v in fit["theta_lower"].values()])
    # lme4's VarCorr from its θ and σ: SDs and correlations in θ's positions
    theta = np.array(list(fit["theta"].values()), dtype=float)
    sv = _params.Cv_to_Sv(s.terms, theta, fit["sigma"])
    want = []
    for t in s.terms:
        rows = {(r["var1"], r["var2"]): r["sdcor"] for r in fit["varcorr"] if r["grp"] == t.name}
        for i, j in zip(*_params.tri_indices(t.k)):
            want.append(rows[(t.cnms[i], None)] if i == j else rows[(t.cnms[j], t.cnms[i])])
    np.testing.assert_allclose(sv, want, rtol=1e-9)


@settings(max_examples=100, deadline=None)
@given(ks=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       sigma=st.floats(0.1, 10.0))
def test_Sv_to_Cv_inverts_Cv_to_Sv(ks, seed, sigma):
    """Cv_to_Sv ∘ Sv_to_Cv is the identity, for T with a positive diagonal (a proper Cholesky
    factor, which is what T is defined up to)."""
    terms = terms_of(ks)
    rng = np.random.default_rng(seed)
    theta = np.concatenate([_params.theta_from_T(np.tril(rng.normal(size=(k, k)), -1)
                                                 + np.diag(rng.uniform(0.2, 2.0, k))) for k in ks])
    sv = _params.Cv_to_Sv(terms, theta, sigma)
    np.testing.assert_allclose(_params.Sv_to_Cv(terms, sv, sigma), theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_params.Cv_to_Sv(terms, _params.Sv_to_Cv(terms, sv, sigma), sigma), sv,
                               rtol=1e-9, atol=1e-12)


def test_a_zero_sd_leaves_its_correlations_undefined():
    """As lme4's as.data.frame(VarCorr) gives NA: an SD of 0 gives NaN correlations."""
    terms = terms_of([3])
    theta = np.array([1.0, 0.5, 0.2, 0.0, 0.0, 0.7])        # T[1, 1] = 0 and T[1, 0] ≠ 0: sd₁ > 0
    sv = _params.Cv_to_Sv(terms, theta, 2.0)
    assert np.isfinite(sv).all()
    theta = np.array([0.0, 0.0, 0.0, 1.0, 0.3, 0.7])        # first column 0: sd₀ = 0
    sv = _params.Cv_to_Sv(terms, theta, 2.0)
    assert sv[0] == 0.0 and np.isnan(sv[1]) and np.isnan(sv[2]) and np.isfinite(sv[3:]).all()
    sd, C = _params.sd_cor(_params.term_T(terms[0], theta), 2.0)
    np.testing.assert_allclose(sd, [0.0, 2.0, 2.0 * np.hypot(0.3, 0.7)])
    assert np.isnan(C[0, 1]) and np.isnan(C[2, 0]) and C[2, 1] == pytest.approx(0.3 / np.hypot(0.3, 0.7))


def test_Sv_to_Cv_of_a_perfect_correlation():
    """A correlation of ±1 makes Σ singular: the factor is still one with T Tᵀ = Σ/σ²."""
    terms = terms_of([2])
    for r in (1.0, -1.0):
        theta = _params.Sv_to_Cv(terms, np.array([3.0, r, 2.0]), 1.5)
        T = _params.term_T(terms[0], theta)
        np.testing.assert_allclose(T @ T.T * 1.5 ** 2, [[9.0, 6.0 * r], [6.0 * r, 4.0]], atol=1e-12)
        assert (np.diag(T) >= 0).all()
