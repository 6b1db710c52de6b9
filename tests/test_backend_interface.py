"""Every criterion backend against the one interface (``_backends.Backend``): each test runs once
per backend through conftest's ``backend`` fixture, and checks values against lme4, the dense
inverse, finite differences or a freshly built model, never against the backend itself."""
from __future__ import annotations

import dataclasses
import json
import pickle
import warnings

import numpy as np
import pytest

import fastlmm_ext as fl
from conftest import reference_dir
from fastlmm_ext import datasets
from fastlmm_ext._backends import Backend
from fastlmm_ext._crossprod import CrossProducts
from fastlmm_ext._pls import profiled_criterion

SLEEP = datasets.load("sleepstudy")
FORMULA = "Reaction ~ Days + (Days|Subject)"
THETAS = [np.array([0.9667, 0.0152, 0.2309]), np.array([1.3, -0.4, 0.05]), np.array([0.4, 0.2, 1.1])]


def model(backend, REML=True, data=SLEEP, formula=FORMULA, **kw) -> fl.LinearMixedModel:
    return fl.LinearMixedModel(formula, data, REML=REML, backend=backend, **kw)


def crossed() -> "pd.DataFrame":  # noqa: F821
    df = datasets.simulate_crossed(3000, 60, 25, seed=3, slope_sd=0.4)
    return df.assign(w=np.random.default_rng(1).uniform(0.5, 2.0, len(df)))


def test_members(backend):
    m = model(backend)
    be: Backend = m.backend
    assert be.name == backend == m.backend_name
    assert be.has_gradient == (backend != "reference")
    assert (be.crossprod is None) == (backend == "reference")
    assert be.ordering == ("default" if backend == "compiled" else None) == m.ordering
    w = np.random.default_rng(0).uniform(0.5, 2.0, len(SLEEP))
    assert model(backend, weights=w).backend.sum_log_w == pytest.approx(np.sum(np.log(w)), rel=1e-13)
    assert be.sum_log_w == 0.0


@pytest.mark.parametrize("REML", [True, False])
def test_objective_is_lme4s_devfun(backend, REML):
    """lme4 1.1.31's devfun(theta) at the reference points of sleepstudy's fits."""
    fits = json.loads((reference_dir() / "sleepstudy.json").read_text())
    ref = next(f for f in fits if f["formula"] == FORMULA and f["REML"] == REML)
    m = model(backend, REML=REML)
    for pt in ref["objective_at_theta"].values():
        assert m.objective(np.array(pt["theta"], dtype=float)) == pytest.approx(pt["objective"], rel=1e-10)


@pytest.mark.parametrize("REML", [True, False])
def test_state_gives_the_objective(backend, REML):
    """The criterion is the one formula of _pls applied to the state's pieces; pls_terms are the
    state's; b = Λ û."""
    m = model(backend, REML=REML)
    s = m.structure
    for th in THETAS:
        st = m.backend.state(th)
        assert m.objective(th) == pytest.approx(
            profiled_criterion(st.ldL2, st.ldRX2, st.pwrss, s.n, s.p, REML), rel=1e-13)
        assert m.backend.pls_terms(th) == pytest.approx((st.ldL2, st.pwrss), rel=1e-13)
        np.testing.assert_allclose(st.b, s.Lambda(th) @ st.u, rtol=1e-12, atol=1e-12)


def test_the_factor_follows_theta(backend):
    """A backend reuses its factor only at the θ it belongs to: interleaved evaluations give the
    state of a freshly built model."""
    m, fresh = model(backend), model(backend)
    t1, t2 = THETAS[0], THETAS[1]
    want = fresh.backend.state(t1)
    m.backend.state(t1)
    m.objective(t2)
    m.backend.pls_terms(t2)
    got = m.backend.state(t1)
    assert got.pwrss == pytest.approx(want.pwrss, rel=1e-12)
    np.testing.assert_allclose(got.beta, want.beta, rtol=1e-12)


def test_kernel_updated_behind_the_backend():
    """Regression: after ``be.state(t1); be.kernel.update(t2)``, ``be.state(t1)`` returned the
    pwrss of t2 (the backend's own θ cache did not see the kernel move); the kernel now records
    the θ of its factor."""
    be = model("compiled").backend
    t1, t2 = THETAS[0], THETAS[1]
    want = be.state(t1).pwrss
    be.kernel.update(t2)
    assert be.kernel.pwrss != pytest.approx(want, rel=1e-3)
    assert be.state(t1).pwrss == pytest.approx(want, rel=1e-12)
    assert be.pls_terms(t1)[1] == pytest.approx(want, rel=1e-12)


def test_inverse_blocks_equal_the_dense_inverse(backend):
    df = crossed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model(backend, data=df, formula="y ~ x + (x|a) + (1|b)", weights="w")
    s = m.structure
    th = np.array([0.8, 0.2, 0.5, 0.7])
    ZL = (s.Z @ s.Lambda(th)).toarray() * np.sqrt(s.weights)[:, None]
    Ainv = np.linalg.inv(ZL.T @ ZL + np.eye(s.q))
    for i, t in enumerate(s.terms):
        idx = t.col_offset + np.arange(t.nlevels)[:, None] * t.k + np.arange(t.k)[None, :]
        np.testing.assert_allclose(m.backend.inverse_blocks(th, i), Ainv[idx[:, :, None], idx[:, None, :]],
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("REML", [True, False])
def test_gradient_or_a_clear_refusal(backend, REML):
    m = model(backend, REML=REML)
    th = THETAS[1]
    if not m.backend.has_gradient:
        with pytest.raises(fl.ArgumentError, match="gradient"):
            m.backend.gradient(th, REML)
        with pytest.raises(fl.ArgumentError, match="lbfgsb"):
            m.fit(optimizer="lbfgsb")
        return
    h = 1e-6
    fd = [(m.objective(th + h * e) - m.objective(th - h * e)) / (2 * h) for e in np.eye(th.size)]
    np.testing.assert_allclose(m.backend.gradient(th, REML), fd, rtol=1e-5, atol=1e-5)


def test_gradient_of_a_singular_vector_term(backend):
    """T with a zero diagonal has no T⁻¹: the gradient falls back to finite differences
    (_gradient.fd_fallback), central where both sides are feasible, forward on the bound."""
    m = model(backend)
    th = np.array([0.9, 0.3, 0.0])
    if not m.backend.has_gradient:       # the reference path has none, and says so
        with pytest.raises(fl.ArgumentError, match="gradient"):
            m.backend.gradient(th, True)
        return
    f = m.objective
    h = 1e-6
    want = [(f(th + [h, 0, 0]) - f(th - [h, 0, 0])) / (2 * h), (f(th + [0, h, 0]) - f(th - [0, h, 0])) / (2 * h),
            (f(th + [0, 0, h]) - f(th)) / h]
    np.testing.assert_allclose(m.backend.gradient(th, True), want, rtol=1e-9, atol=1e-9)


def test_with_response_is_a_fresh_model(backend):
    y = np.sqrt(SLEEP.Reaction.to_numpy()) * 30.0
    m = model(backend)
    fresh = model(backend, data=SLEEP.assign(Reaction=y))
    twin = m._with_response(y)
    for th in THETAS:
        assert twin.objective(th) == pytest.approx(fresh.objective(th), rel=1e-11)
        assert m.objective(th) == pytest.approx(model(backend).objective(th), rel=1e-13)   # untouched


def test_pickle_round_trip(backend):
    m = model(backend)
    back = pickle.loads(pickle.dumps(m))
    assert back.backend.name == backend
    for th in THETAS:
        assert back.objective(th) == pytest.approx(m.objective(th), rel=1e-13)


def test_solve_L_gives_the_inverse_quadratic_form(backend):
    """‖L⁻¹P v‖² = vᵀ(ΛᵀZᵀWZΛ + I)⁻¹v (dense inverse), for every backend's factor and permutation."""
    df = crossed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model(backend, data=df, formula="y ~ x + (x|a) + (1|b)", weights="w")
    s = m.structure
    th = np.array([0.8, 0.2, 0.5, 0.7])
    ZL = (s.Z @ s.Lambda(th)).toarray() * np.sqrt(s.weights)[:, None]
    V = np.random.default_rng(5).normal(size=(s.q, 4))
    got = np.asarray(m.backend.solve_L(th, V))
    want = np.einsum("ij,ji->i", V.T, np.linalg.solve(ZL.T @ ZL + np.eye(s.q), V))
    np.testing.assert_allclose(np.einsum("ij,ij->j", got, got), want, rtol=1e-10)


def test_with_response_of_other_weights(backend):
    """A backend for the same design with other weights on the same ZᵀWZ pattern (the zero
    weights of a deletion) is a fresh model with those weights; the original stays as it was,
    gradient included."""
    w = np.random.default_rng(3).uniform(0.5, 2.0, len(SLEEP))
    w2 = w.copy()
    w2[::7] = 0.25
    m = model(backend, weights=w)
    s2 = dataclasses.replace(m.structure, weights=w2)
    cp = CrossProducts.from_structure(s2) if m.backend.crossprod is not None else None
    twin = fl.LinearMixedModel._from_backend(s2, True, m.backend.with_response(s2, cp))
    fresh = model(backend, weights=w2)
    orig = model(backend, weights=w)
    for th in THETAS:
        assert twin.objective(th) == pytest.approx(fresh.objective(th), rel=1e-12)
        assert m.objective(th) == pytest.approx(orig.objective(th), rel=1e-13)
        if m.backend.has_gradient:
            np.testing.assert_allclose(twin.backend.gradient(th, True), fresh.backend.gradient(th, True), rtol=1e-9)
            np.testing.assert_allclose(m.backend.gradient(th, True), orig.backend.gradient(th, True), rtol=1e-9)
        np.testing.assert_allclose(twin.backend.inverse_blocks(th, 0), fresh.backend.inverse_blocks(th, 0), rtol=1e-11)
        np.testing.assert_allclose(m.backend.inverse_blocks(th, 0), orig.backend.inverse_blocks(th, 0), rtol=1e-12)
