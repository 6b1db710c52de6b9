"""The optimiser (``_optimize``) on functions with known minima, knowing nothing of mixed models:
bounds, the L-BFGS-B path, snapping to a bound, lme4's singularity rule and convergence checks."""
from __future__ import annotations

import numpy as np
import pytest

from fastlmm_ext._optimize import check_convergence, is_singular, minimize_theta, snap_to_bounds

LOWER = np.array([0.0, -np.inf, 0.0])
CENTRE = np.array([-1.0, 0.5, 2.0])      # the first coordinate's minimum is below its bound


def f(x):
    return float(np.sum((np.asarray(x) - CENTRE) ** 2 * [1.0, 4.0, 0.5]) + 3.0)


def grad(x):
    return 2.0 * (np.asarray(x) - CENTRE) * [1.0, 4.0, 0.5]


@pytest.mark.parametrize("optimizer", ["bobyqa", "nelder_mead", "cobyla", "lbfgsb"])
def test_bounded_minimum(optimizer):
    summ = minimize_theta(f, np.array([1.0, 0.0, 1.0]), LOWER, optimizer=optimizer,
                          grad=grad if optimizer == "lbfgsb" else None)
    assert summ.converged and summ.optimizer == optimizer
    np.testing.assert_allclose(summ.theta_final, [0.0, 0.5, 2.0], atol=1e-5)
    assert summ.fmin == pytest.approx(4.0, abs=1e-9)            # f(0, 0.5, 2) = 1 + 3
    assert summ.f_initial == pytest.approx(f([1.0, 0.0, 1.0])) and summ.feval > 1


def test_errors():
    with pytest.raises(ValueError, match="gradient"):
        minimize_theta(f, np.ones(3), LOWER, optimizer="lbfgsb")
    with pytest.raises(ValueError, match="unknown optimizer"):
        minimize_theta(f, np.ones(3), LOWER, optimizer="newton")

    def failing(x):
        raise ZeroDivisionError("inside the criterion")
    with pytest.raises(ZeroDivisionError, match="inside the criterion"):   # the criterion's own error
        minimize_theta(failing, np.ones(3), LOWER)


def test_snap_to_bounds():
    theta, fmin = snap_to_bounds(f, np.array([3e-6, 0.5, 2.0]), f([3e-6, 0.5, 2.0]), LOWER)
    assert theta[0] == 0.0 and fmin == f([0.0, 0.5, 2.0])       # f falls towards the bound: snapped
    far, _ = snap_to_bounds(f, np.array([0.5, 0.5, 2.0]), f([0.5, 0.5, 2.0]), LOWER)
    assert far[0] == 0.5                                         # beyond boundary.tol: left alone

    def rising(x):                                               # f rises on the bound: not snapped
        return float((x[0] - 1e-6) ** 2 * 1e12)
    kept, _ = snap_to_bounds(rising, np.array([1e-6]), 0.0, np.array([0.0]))
    assert kept[0] == 1e-6


def test_singular_rule():
    assert is_singular(np.array([5e-5, -3.0, 1.0]), LOWER)       # within 1e-4 of a bound
    assert not is_singular(np.array([2e-4, -1e-9, 1.0]), LOWER)   # the unbounded one never counts


def test_convergence_check():
    """lme4's checkConv: clean at the minimum, a large scaled gradient away from it."""
    opt = CENTRE.copy()
    msgs, info = check_convergence(f, opt, f(opt), np.array([-np.inf] * 3), nobs=100)
    assert msgs == [] and info["checked"] and info["max_scaled_gradient"] < 1e-6
    np.testing.assert_allclose(info["hessian"], np.diag([2.0, 8.0, 1.0]), rtol=1e-6)
    off = opt + 0.1
    msgs, _ = check_convergence(f, off, f(off), np.array([-np.inf] * 3), nobs=100)
    assert any("failed to converge" in m for m in msgs)
    assert check_convergence(f, off, f(off), np.array([-np.inf] * 3), nobs=20_000) == ([], {"checked": False})
