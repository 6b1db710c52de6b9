"""The average-information Hessian (``_hessian``) against dense linear algebra on the rows, and the
Newton steps it drives against a tight BOBYQA.

The dense side works from y, X, Z, the weights and Λ(θ) directly: V₀ = W⁻¹ + ZΛΛᵀZᵀ, P₀, and
∂V₀/∂θ_i = Z(Λ_iΛᵀ + ΛΛ_iᵀ)Zᵀ with Λ_i = Λ(e_i) (Λ is linear in θ), none of the
cross-product shortcuts of the module."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from fastlmm_ext._hessian import ai_hessian, gradient_term, model_hessian


def design(seed: int, n: int = 150, weighted: bool = False, slope: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 12, n), rng.integers(0, 7, n)
    x = rng.normal(size=n)
    y = (1 + 0.5 * x + rng.normal(0, 0.8, 12)[a] + rng.normal(0, 0.5, 7)[b] + rng.normal(0, 0.3, 12)[a] * x
         + rng.normal(0, 1, n))
    df = pd.DataFrame({"y": y, "x": x, "a": a.astype(str), "b": b.astype(str)})
    if weighted:
        df["w"] = rng.uniform(0.5, 2.0, n)
    return df


def dense_parts(m: fl.LinearMixedModel, theta: np.ndarray):
    """P₀, D_i, D_ij, y (offset removed) and d, from the rows."""
    s = m.structure
    Z = s.Z.toarray()
    X, y = s.X, s.y - (s.offset if s.offset is not None else 0.0)
    w = s.weights if s.weights is not None else np.ones(s.n)
    Lam = s.Lambda(theta).toarray()
    V0 = np.diag(1.0 / w) + Z @ Lam @ Lam.T @ Z.T
    Vi = np.linalg.inv(V0)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    E = [s.Lambda(np.eye(theta.size)[i]).toarray() for i in range(theta.size)]
    D = [Z @ (Ei @ Lam.T + Lam @ Ei.T) @ Z.T for Ei in E]
    Dij = [[Z @ (Ei @ Ej.T + Ej @ Ei.T) @ Z.T for Ej in E] for Ei in E]
    d = s.n - s.p if m.REML else s.n
    return P, Vi, D, Dij, y, d


@pytest.mark.parametrize("backend", ["compiled", "blocked"])
@pytest.mark.parametrize("REML", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_ai_hessian_equals_the_dense_formula(backend, REML, weighted):
    """H_AI = (d/r²) Wᵀ(P₀ − P₀yyᵀP₀/yᵀP₀y)W with W = [D_iP₀y], from the rows; and the exact
    second-order term c_ij = tr(·D_ij) − d yᵀP₀D_ijP₀y/r² (P₀ for REML, V₀⁻¹ in the trace for ML)."""
    df = design(3, weighted=weighted)
    m = fl.LinearMixedModel("y ~ x + (1 + x|a) + (1|b)", df, REML=REML, backend=backend,
                            weights="w" if weighted else None)
    theta = np.array([0.9, 0.2, 0.4, 0.6])
    P, Vi, D, Dij, y, d = dense_parts(m, theta)
    e = P @ y
    r2 = float(y @ e)
    W = np.column_stack([Di @ e for Di in D])
    want = (d / r2) * (W.T @ P @ W - np.outer(W.T @ e, W.T @ e) / r2)
    got = ai_hessian(m.structure, m.backend, theta, REML)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())
    # c from the analytic gradient
    g = m.backend.gradient(theta, REML)
    T = P if REML else Vi
    c = np.array([[np.trace(T @ Dij[i][j]) - d * (e @ Dij[i][j] @ e) / r2 for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(gradient_term(m.structure, theta, g), c, rtol=1e-6, atol=1e-6 * np.abs(c).max())


def test_exact_hessian_identity_and_ai_near_the_optimum():
    """The dense observed Hessian (the module's formula with the traces) equals finite differences
    of the analytic gradient, and at the optimum H_AI + c is within 5 % of it (sleepstudy)."""
    df = fl.datasets.load("sleepstudy")
    m = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", df, backend="compiled")
    theta = np.asarray(m.fit().theta)
    P, Vi, D, Dij, y, d = dense_parts(m, theta)
    e = P @ y
    r2 = float(y @ e)
    k = theta.size
    H = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            H[i, j] = (-np.trace(P @ D[i] @ P @ D[j]) + np.trace(P @ Dij[i][j])
                       + 2 * d * (e @ D[i] @ P @ D[j] @ e) / r2 - d * (e @ Dij[i][j] @ e) / r2
                       - d * (e @ D[i] @ e) * (e @ D[j] @ e) / r2 ** 2)
    h = 1e-5
    fd = np.column_stack([(m.backend.gradient(theta + h * np.eye(k)[i], True)
                           - m.backend.gradient(theta - h * np.eye(k)[i], True)) / (2 * h) for i in range(k)])
    np.testing.assert_allclose(H, 0.5 * (fd + fd.T), rtol=1e-4, atol=1e-4 * np.abs(H).max())
    A = ai_hessian(m.structure, m.backend, theta, True) + gradient_term(m.structure, theta, m.backend.gradient(theta, True))
    ev = np.linalg.eigvalsh(np.linalg.solve(np.linalg.cholesky(H), np.linalg.solve(np.linalg.cholesky(H), A).T))
    assert np.all(np.abs(ev - 1) < 0.05)


@pytest.mark.parametrize("backend", ["blocked", "single"])
def test_backends_give_the_same_hessian(backend):
    """The blocked (its own level order) and single-term (no CHOLMOD) factors give CHOLMOD's H_AI;
    the reference path, without cross-products, has no gradient fit and no model."""
    df = design(5, n=300, slope=False)
    formula = "y ~ x + (1|a)" if backend == "single" else "y ~ x + (1|a) + (1|b)"
    theta = np.array([0.7]) if backend == "single" else np.array([0.7, 0.4])
    ref = fl.LinearMixedModel(formula, df, backend="compiled")
    m = fl.LinearMixedModel(formula, df, backend=backend)
    dense = fl.LinearMixedModel(formula, df, backend="reference")
    assert model_hessian(dense.structure, dense.backend, True) is None
    if backend == "single":              # its fits keep the BFGS updates (SingleTermBackend.hessian_model)
        assert model_hessian(m.structure, m.backend, True) is None
    np.testing.assert_allclose(ai_hessian(m.structure, m.backend, theta, True),
                               ai_hessian(ref.structure, ref.backend, theta, True), rtol=1e-9)


def test_model_hessian_is_positive_definite_or_none():
    """On its bound a variance's column of W is 0: the model gives it the largest curvature and
    stays positive definite; the gradient term is left out where it would make it indefinite."""
    df = design(7, n=300, slope=False)
    m = fl.LinearMixedModel("y ~ x + (1|a) + (1|b)", df, backend="compiled")
    hess = model_hessian(m.structure, m.backend, True)
    for theta in ([0.0, 0.5], [0.5, 0.0], [3.0, 0.01], [0.01, 0.01]):
        theta = np.array(theta)
        H = hess(theta, m.backend.gradient(theta, True))
        assert H is not None and np.all(np.linalg.eigvalsh(H) > 0)


def crossed(seed: int, n: int, sa: float, sb: float, slope: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 40, n), rng.integers(0, 15, n)
    x = rng.normal(size=n)
    y = (1 + 0.5 * x + rng.normal(0, sa, 40)[a] + rng.normal(0, sb, 15)[b]
         + (rng.normal(0, 0.4, 40)[a] * x if slope else 0) + rng.normal(0, 1, n))
    return pd.DataFrame({"y": y, "x": x, "a": a.astype(str), "b": b.astype(str)})


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), sa=st.sampled_from([0.0, 0.3, 1.0, 3.0]), sb=st.sampled_from([0.0, 0.5, 1.0]),
       slope=st.booleans(), REML=st.booleans())
def test_newton_steps_reach_bobyqa_in_few_evaluations(seed, sa, sb, slope, REML):
    """The default gradient fit (Newton steps on H_AI + c) reaches a tight BOBYQA's criterion
    (within 1e-6, or lower), evaluating no θ twice."""
    df = crossed(seed, 800, sa, sb, slope)
    formula = "y ~ x + (1 + x|a) + (1|b)" if slope else "y ~ x + (1|a) + (1|b)"
    m = fl.LinearMixedModel(formula, df, REML=REML, backend="compiled")
    seen = []
    obj = m.backend.objective
    m.backend.objective = lambda th, reml: (seen.append(np.asarray(th).tobytes()), obj(th, reml))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = m.fit(optimizer="bfgs", check_conv=False)
        best = fl.LinearMixedModel(formula, df, REML=REML, backend="compiled").fit(
            optimizer="bobyqa", ftol_abs=1e-12, xtol_abs=1e-10, check_conv=False)
    assert len(seen) == len(set(seen))
    assert res.criterion <= best.criterion + 1e-6
