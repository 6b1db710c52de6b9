"""The compiled CHOLMOD path and the pure-Python reference path agree on random designs."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
import fastlmm_ext.datasets  # noqa: F401  (fl.datasets in tests)
from conftest import raises_named
from fastlmm_ext._exceptions import FastLMMError

FORMULAS = [
    "y ~ x + (1|g1)",
    "y ~ x + (x|g1)",
    "y ~ x + (1 + x + z|g1)",
    "y ~ x + (x||g1)",
    "y ~ x + (1|g1) + (1|g2)",
    "y ~ x + (x|g1) + (1|g2)",
    "y ~ 1 + (1|g1/g3)",
    "y ~ x + z + (1|g1) + (0 + x|g2) + (1|g1:g2)",
    "y ~ 0 + x + (1|g2)",
    "y ~ x + f + (1|g1) + (0 + f|g2)",
]


def make_data(seed: int, n: int, l1: int, l2: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g1 = rng.integers(0, l1, n)
    g2 = rng.integers(0, l2, n)
    g3 = rng.integers(0, 3, n)
    x = rng.normal(size=n)
    z = rng.uniform(-1, 1, size=n)
    f = rng.choice(["a", "b"], n)
    y = (1 + 0.5 * x + rng.normal(0, 1, l1)[g1] + rng.normal(0, 0.7, l1)[g1] * x
         + rng.normal(0, 0.5, l2)[g2] + rng.normal(0, 1, n))
    return pd.DataFrame({"y": y, "x": x, "z": z, "f": f, "g1": [f"s{i}" for i in g1],
                         "g2": pd.Categorical(g2), "g3": g3.astype(str)})


def build(formula, df, backend, reml):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fl.LinearMixedModel(formula, df, REML=reml, backend=backend)
        except FastLMMError:
            assume(False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(30, 200), l1=st.integers(2, 12), l2=st.integers(2, 6),
       formula=st.sampled_from(FORMULAS), reml=st.booleans(), data=st.data())
def test_objective_compiled_equals_reference(seed, n, l1, l2, formula, reml, data):
    df = make_data(seed, n, l1, l2)
    mc = build(formula, df, "compiled", reml)
    mr = build(formula, df, "reference", reml)
    lower = mc.lower
    theta = []
    for lb in lower:
        if lb == 0.0:  # diagonal: positive, sometimes exactly on the bound (singular)
            theta.append(data.draw(st.one_of(st.just(0.0), st.floats(0.01, 5.0))))
        else:
            theta.append(data.draw(st.floats(-2.0, 2.0)))
    theta = np.array(theta)
    assert mc.objective(theta) == pytest.approx(mr.objective(theta), rel=1e-9)
    sc, sr = mc.backend.state(theta), mr.backend.state(theta)
    np.testing.assert_allclose(sc.beta, sr.beta, rtol=1e-7, atol=1e-9 * (1 + np.abs(sr.beta).max()))
    np.testing.assert_allclose(sc.b, sr.b, rtol=1e-6, atol=1e-8 * (1 + np.abs(sr.b).max()))
    assert sc.ldL2 == pytest.approx(sr.ldL2, rel=1e-9, abs=1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(60, 200), l1=st.integers(3, 10),
       formula=st.sampled_from(FORMULAS[:7]), reml=st.booleans())
def test_fit_compiled_equals_reference(seed, n, l1, formula, reml):
    df = make_data(seed, n, l1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = build(formula, df, "compiled", reml).fit(check_conv=False)
        rr = build(formula, df, "reference", reml).fit(check_conv=False)
    # Two runs of a derivative-free optimiser reach the same optimum to its tolerance.
    assert rc.criterion == pytest.approx(rr.criterion, abs=1e-6)
    assert np.all(np.abs(rc.fixef.to_numpy() - rr.fixef.to_numpy())
                  <= 1e-4 * np.abs(rr.fixef.to_numpy()) + 1e-3 * rr.se.to_numpy())
    assert rc.sigma == pytest.approx(rr.sigma, rel=1e-3)
    assert rc.singular == rr.singular or abs(rc.criterion - rr.criterion) < 1e-6


def test_ldL2_against_scikit_sparse():
    """log|L|² from our kernel equals scikit-sparse's CHOLMOD logdet of ΛᵀZᵀZΛ + I."""
    import scipy.sparse as sp
    from sksparse.cholmod import cholesky

    df = make_data(7, 400, 40, 15)
    m = fl.LinearMixedModel("y ~ x + (x|g1) + (1|g2)", df, backend="compiled")
    theta = np.array([0.8, 0.3, 0.5, 1.3])
    s = m.structure
    ZL = (s.Z @ s.Lambda(theta)).tocsc()
    A = (ZL.T @ ZL + sp.identity(s.q)).tocsc()
    m.backend.kernel.update(theta)
    assert m.backend.kernel.ldL2 == pytest.approx(cholesky(A).logdet(), rel=1e-11)


# CHOLMOD's codes for the ordering it used (cholmod.h: CHOLMOD_NATURAL 0, CHOLMOD_AMD 2); "default"
# lets CHOLMOD choose among AMD, METIS and nested dissection.
USED_ORDERING = {"default": (2, 3, 4), "amd": (2,), "natural": (0,)}


@pytest.mark.parametrize("ordering", ["default", "amd", "natural"])
def test_orderings_agree(ordering):
    """Every CHOLMOD ordering gives the reference path's criterion, and the factor was really
    computed with the ordering asked for (also when backend="auto" is given one)."""
    df = make_data(3, 300, 30, 10)
    ref = fl.LinearMixedModel("y ~ x + (1|g1) + (1|g2)", df, backend="reference")
    for backend in ("compiled", "auto"):
        m = fl.LinearMixedModel("y ~ x + (1|g1) + (1|g2)", df, ordering=ordering, backend=backend)
        if backend == "auto" and ordering == "default":
            assert m.backend_name == m.backend_choice.backend in ("compiled", "blocked")    # the estimate's pick
            continue
        assert m.backend_name == "compiled" and m.ordering == ordering
        for th in ([1.0, 1.0], [0.3, 2.0], [0.0, 0.5]):
            assert m.objective(th) == pytest.approx(ref.objective(th), rel=1e-10)
        assert m.backend.kernel.factor_info["ordering"] in USED_ORDERING[ordering]


@pytest.mark.parametrize("backend", ["blocked", "reference", "single"])
def test_ordering_without_cholmod_is_refused(backend):
    df = make_data(3, 300, 30, 10)
    with raises_named(fl.ArgumentError, "ordering", "'amd'", backend):
        fl.LinearMixedModel("y ~ x + (1|g1) + (1|g2)", df, ordering="amd", backend=backend)
    with raises_named(fl.ArgumentError, "ordering", "'metis'"):
        fl.LinearMixedModel("y ~ x + (1|g1) + (1|g2)", df, ordering="metis")


def test_large_mean_response_is_stable():
    """A response with a huge mean and small spread: the OLS shift keeps r² accurate."""
    df = make_data(11, 150, 8, 4)
    df2 = df.assign(y=df.y + 1e7)
    m1 = fl.LinearMixedModel("y ~ x + (1|g1)", df)
    m2 = fl.LinearMixedModel("y ~ x + (1|g1)", df2)
    for th in ([0.5], [1.0], [3.0]):
        assert m2.objective(th) == pytest.approx(m1.objective(th), rel=1e-10)


# ----------------------------------------------------------------------------- blocked path + gradient
BLOCKED_FORMULAS = [
    "y ~ x + (1|g1)",
    "y ~ x + (x|g1)",
    "y ~ x + (1 + x + z|g1)",
    "y ~ x + (1|g1) + (1|g2)",
    "y ~ x + (x|g1) + (1|g2)",
    "y ~ 1 + (1|g1/g3)",
    "y ~ 0 + x + (1|g2)",
    "y ~ x + f + (1|g1) + (1|g2) + (1|g3)",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(40, 200), l1=st.integers(6, 14), l2=st.integers(2, 6),
       formula=st.sampled_from(BLOCKED_FORMULAS), reml=st.booleans(), data=st.data())
def test_blocked_objective_and_gradient(seed, n, l1, l2, formula, reml, data):
    """Blocked criterion == reference criterion; analytic gradient == central differences."""
    df = make_data(seed, n, l1, l2)
    mb = build(formula, df, "blocked", reml) if _blocked_ok(formula, df) else None
    assume(mb is not None)
    mr = build(formula, df, "reference", reml)
    theta = np.array([data.draw(st.floats(0.05, 3.0)) if lb == 0.0 else data.draw(st.floats(-1.0, 1.0))
                      for lb in mb.lower])
    assert mb.objective(theta) == pytest.approx(mr.objective(theta), rel=1e-9)
    g = mb.backend.gradient(theta, reml)
    h = 1e-6
    fd = np.array([(mb.objective(theta + h * e) - mb.objective(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4 * (1 + np.abs(fd).max()))


def _blocked_ok(formula, df):
    from fastlmm_ext._blocked import blocked_applicable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return blocked_applicable(fl.LinearMixedModel(formula, df, backend="reference").structure)
        except FastLMMError:
            return False


def test_blocked_gradient_zero_on_scalar_bound():
    """The criterion is even in a scalar term's θ, so its derivative on the bound is 0."""
    df = make_data(5, 150, 10, 4)
    m = fl.LinearMixedModel("y ~ x + (1|g1) + (1|g2)", df, backend="blocked")
    g = m.backend.gradient(np.array([0.7, 0.0]), True)
    assert g[1] == 0.0
    # one-sided difference quotients shrink linearly with h (no first-order term)
    q1, q2 = ((m.objective([0.7, h]) - m.objective([0.7, 0.0])) / h for h in (1e-4, 1e-5))
    assert abs(q2) < abs(q1) / 5


def test_blocked_restarts_from_the_edge():
    df = fl.datasets.load("sleepstudy")
    m = fl.LinearMixedModel("Reaction ~ Days + (1|Subject) + (0+Days|Subject)", df, backend="blocked")
    res = m.fit(theta0=[0.0, 0.0])
    assert res.criterion == pytest.approx(1743.669293581, abs=1e-6)
    assert not res.singular


def test_blocked_not_applicable_is_clear():
    df = make_data(1, 200, 10, 4)
    with pytest.raises(ValueError, match="scalar terms after the first"):
        fl.LinearMixedModel("y ~ x + (1|g1) + (x|g2)", df, backend="blocked")


def test_lbfgsb_needs_gradient():
    df = make_data(1, 200, 10, 4)
    with pytest.raises(ValueError, match="gradient"):
        fl.lmer("y ~ x + (1|g1)", df, optimizer="lbfgsb", backend="reference")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(40, 200), l1=st.integers(6, 14), l2=st.integers(2, 6),
       formula=st.sampled_from(FORMULAS), reml=st.booleans(), data=st.data())
def test_compiled_gradient_equals_differences(seed, n, l1, l2, formula, reml, data):
    """The compiled path's gradient (selected inverse of the CHOLMOD factor) == central differences."""
    df = make_data(seed, n, l1, l2)
    m = build(formula, df, "compiled", reml)
    theta = np.array([data.draw(st.floats(0.05, 3.0)) if lb == 0.0 else data.draw(st.floats(-1.0, 1.0))
                      for lb in m.lower])
    g = m.backend.gradient(theta, reml)
    h = 1e-6
    fd = np.array([(m.objective(theta + h * e) - m.objective(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4 * (1 + np.abs(fd).max()))


def test_auto_optimizer_choice():
    small = fl.lmer("Reaction ~ Days + (Days|Subject)", fl.datasets.load("sleepstudy"))
    assert small.optsummary.optimizer == "bobyqa"
    big = fl.lmer("y ~ x + (1|g1) + (1|g2)", make_data(2, 3000, 300, 40))
    assert big.optsummary.optimizer == "bfgs" and big.converged


@pytest.mark.parametrize("backend", ["auto", "compiled", "blocked", "reference"])
@pytest.mark.parametrize("optimizer", ["bobyqa", "lbfgsb", "bfgs"])
def test_boundary_optimum_is_exactly_on_the_bound(backend, optimizer):
    """A term whose variance is estimated as 0 is reported with θ exactly 0 by every backend and
    optimiser (an optimiser stops near the bound, at a place that depends on f's rounding)."""
    if optimizer in ("lbfgsb", "bfgs") and backend in ("compiled", "reference", "auto"):
        backend = "blocked"
    df = fl.datasets.load("sleepstudy")
    df["junk"] = np.tile(np.arange(10), 18)   # repeats Days within every subject: no variance of its own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fl.lmer("Reaction ~ Days + (1|Subject) + (1|junk)", df, backend=backend, optimizer=optimizer)
    junk = r.theta_names.index("junk.(Intercept)")
    assert r.theta[junk] == 0.0 and r.singular
    assert r.criterion == r.model.objective(r.theta)    # the reported criterion is that of the reported θ
    assert r.varcorr.loc[r.varcorr.grp == "junk", "vcov"].item() == 0.0
    # at the optimum: the dense reference path reaches the same criterion on the bound
    ref = fl.lmer("Reaction ~ Days + (1|Subject) + (1|junk)", df, backend="reference") if backend != "reference" else r
    assert abs(r.criterion - ref.criterion) < 1e-6
