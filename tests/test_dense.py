"""The two-block path's dense kernels (``_dense``): the blocked Cholesky factor and triangular
inverse against their definitions and LAPACK's, on sizes around and across the panel widths."""
import numpy as np
import pytest
import scipy.linalg as la
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlmm_ext._dense import cholesky_lower, invert_lower


def spd(n: int, seed: int, cond: float = 1e3) -> np.ndarray:
    """A symmetric positive-definite n × n matrix with eigenvalues from 1 to ``cond`` (Fortran order)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return np.asfortranarray((Q * np.geomspace(1.0, cond, n)) @ Q.T)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 96, 97, 200, 401])
def test_cholesky_is_the_factor_and_leaves_the_upper_triangle(n):
    S = spd(n, n)
    A = S.copy(order="F")
    upper = np.triu_indices(n, 1)
    A[upper] = 7.0                       # not read, not written
    assert cholesky_lower(A) == 0
    assert np.all(A[upper] == 7.0)
    L = np.tril(A)
    assert np.all(np.diag(L) > 0)
    # the factor's backward error, scale-free (Higham: O(n ε) ‖S‖)
    assert np.linalg.norm(L @ L.T - S) <= 50 * n * np.finfo(float).eps * np.linalg.norm(S)
    ref = np.linalg.cholesky(S)          # the factor is unique: LAPACK's to rounding
    assert np.allclose(L, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("n", [1, 2, 95, 96, 97, 192, 193, 300])
def test_inverse_of_a_lower_triangle(n):
    L = np.linalg.cholesky(spd(n, 100 + n))
    A = np.asfortranarray(L.copy())
    upper = np.triu_indices(n, 1)
    A[upper] = -3.0
    assert invert_lower(A) == 0
    assert np.all(A[upper] == -3.0)
    X = np.tril(A)
    assert np.linalg.norm(X @ L - np.eye(n)) <= 1e-10 * np.sqrt(n)
    ref = la.solve_triangular(L, np.eye(n), lower=True)
    assert np.allclose(X, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("n, bad", [(10, 0), (130, 0), (130, 64), (130, 100), (300, 299)])
def test_not_positive_definite_reports_the_minor(n, bad):
    """info = k > 0, k the order of the first leading minor that is not positive definite, as LAPACK's."""
    S = spd(n, 7)
    # make the leading minor of order bad+1 indefinite, leaving the smaller ones positive definite
    S[bad, bad] = S[bad, :bad] @ np.linalg.solve(S[:bad, :bad], S[:bad, bad]) - 1.0 if bad else -1.0
    assert cholesky_lower(S.copy(order="F")) == bad + 1
    assert la.lapack.dpotrf(S.copy(order="F"), lower=1)[1] == bad + 1


@pytest.mark.parametrize("n, zero", [(5, 0), (200, 150), (200, 199)])
def test_singular_triangle_reports_the_zero(n, zero):
    L = np.asfortranarray(np.linalg.cholesky(spd(n, 3)))
    L[zero, zero] = 0.0
    assert invert_lower(L) == zero + 1


def test_empty_and_non_square():
    assert cholesky_lower(np.zeros((0, 0), order="F")) == 0
    assert invert_lower(np.zeros((0, 0), order="F")) == 0
    with pytest.raises(ValueError, match="square"):
        cholesky_lower(np.zeros((3, 2), order="F"))
    with pytest.raises(ValueError, match="square"):
        invert_lower(np.zeros((3, 2), order="F"))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 260), seed=st.integers(0, 2**31 - 1), logcond=st.floats(0.0, 8.0))
def test_factor_then_inverse_gives_the_inverse(n, seed, logcond):
    """L⁻ᵀ L⁻¹ = S⁻¹ for random SPD S of any size and conditioning up to 1e8."""
    S = spd(n, seed, 10.0 ** logcond)
    A = S.copy(order="F")
    assert cholesky_lower(A) == 0
    assert invert_lower(A) == 0
    X = np.tril(A)
    # residual of S (XᵀX) = I, relative to the conditioning
    assert np.linalg.norm(S @ (X.T @ X) - np.eye(n)) <= 1e-12 * n * 10.0 ** logcond + 1e-12
