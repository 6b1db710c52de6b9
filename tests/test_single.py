"""The single-term backend (``_single``, ``src_c/_blockdiag.pyx``) against the dense reference
path on random one-term designs (hypothesis), central differences, the dense inverse, the
CHOLMOD path's fits and lme4's reference fits with one random-effects term."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from conftest import all_reference_fits, load_reference_data, raises_named
from fastlmm_ext import datasets
from fastlmm_ext._crossprod import CrossProducts, block_lower_ZtZ, level_blocks
from fastlmm_ext._design import build_structure
from fastlmm_ext._exceptions import FastLMMError
from fastlmm_ext._single import single_term_applicable

FORMULAS = [
    "y ~ x + (1|g)",
    "y ~ x + (x|g)",
    "y ~ x + z + (1 + x + z|g)",
    "y ~ 0 + x + (1|g)",
    "y ~ 1 + (0 + x|g)",
    "y ~ x + f + (f|g)",
    "y ~ x + (1 + x + z + f|g)",
]


def make_data(seed: int, n: int, ell: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, ell, n)
    x = rng.normal(size=n)
    z = rng.uniform(-1, 1, n)
    y = 2.0 + 0.5 * x + rng.normal(0, 1, ell)[g] + rng.normal(0, 0.6, ell)[g] * x + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "z": z, "f": rng.choice(["a", "b"], n), "g": [f"s{i}" for i in g],
                         "w": rng.uniform(0.3, 3.0, n)})


def build(formula, df, backend, reml, weights=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fl.LinearMixedModel(formula, df, REML=reml, backend=backend, weights=weights)
        except FastLMMError:
            assume(False)


def draw_theta(data, lower, zero_ok=True):
    """θ within the bounds; a diagonal element sometimes exactly on its bound (singular T)."""
    out = []
    for lb in lower:
        if lb == 0.0:
            out.append(data.draw(st.one_of(st.just(0.0), st.floats(0.01, 4.0)) if zero_ok else st.floats(0.05, 3.0)))
        else:
            out.append(data.draw(st.floats(-2.0, 2.0)))
    return np.array(out)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(20, 250), ell=st.integers(2, 15),
       formula=st.sampled_from(FORMULAS), reml=st.booleans(), weighted=st.booleans(), data=st.data())
def test_objective_and_state_equal_the_reference(seed, n, ell, formula, reml, weighted, data):
    df = make_data(seed, n, ell)
    w = "w" if weighted else None
    ms = build(formula, df, "single", reml, w)
    mr = build(formula, df, "reference", reml, w)
    theta = draw_theta(data, ms.lower)
    assert ms.objective(theta) == pytest.approx(mr.objective(theta), rel=1e-9)
    ss, sr = ms.backend.state(theta), mr.backend.state(theta)
    np.testing.assert_allclose(ss.beta, sr.beta, rtol=1e-7, atol=1e-9 * (1 + np.abs(sr.beta).max()))
    np.testing.assert_allclose(ss.u, sr.u, rtol=1e-6, atol=1e-8 * (1 + np.abs(sr.u).max()))
    np.testing.assert_allclose(ss.b, sr.b, rtol=1e-6, atol=1e-8 * (1 + np.abs(sr.b).max()))
    for got, want in [(ss.ldL2, sr.ldL2), (ss.ldRX2, sr.ldRX2), (ss.pwrss, sr.pwrss)]:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(np.abs(ss.RX), np.abs(sr.RX), rtol=1e-8, atol=1e-10 * np.abs(sr.RX).max())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(40, 250), ell=st.integers(4, 15),
       formula=st.sampled_from(FORMULAS), reml=st.booleans(), weighted=st.booleans(), data=st.data())
def test_gradient_equals_central_differences(seed, n, ell, formula, reml, weighted, data):
    m = build(formula, make_data(seed, n, ell), "single", reml, "w" if weighted else None)
    theta = draw_theta(data, m.lower, zero_ok=False)
    g = m.backend.gradient(theta, reml)
    h = 1e-6
    fd = np.array([(m.objective(theta + h * e) - m.objective(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4 * (1 + np.abs(fd).max()))


@pytest.mark.parametrize("formula", ["y ~ x + (1|g)", "y ~ x + (x|g)", "y ~ x + z + (1 + x + z|g)"])
def test_inverse_blocks_equal_the_dense_inverse(formula):
    df = make_data(4, 300, 12)
    m = build(formula, df, "single", True, "w")
    s = m.structure
    rng = np.random.default_rng(0)
    th = np.where(s.lower == 0.0, rng.uniform(0.3, 1.5, s.lower.size), rng.uniform(-0.5, 0.5, s.lower.size))
    ZL = (s.Z @ s.Lambda(th)).toarray() * np.sqrt(s.weights)[:, None]
    Ainv = np.linalg.inv(ZL.T @ ZL + np.eye(s.q))
    t = s.terms[0]
    idx = np.arange(t.nlevels)[:, None] * t.k + np.arange(t.k)[None, :]
    np.testing.assert_allclose(m.backend.inverse_blocks(th, 0), Ainv[idx[:, :, None], idx[:, None, :]],
                               rtol=1e-10, atol=1e-13)
    with raises_named(fl.ArgumentError, "term_index"):
        m.backend.inverse_blocks(th, 1)


@pytest.mark.parametrize("formula", ["y ~ x + (1|g)", "y ~ x + (x|g)", "y ~ x + z + (1 + x + z|g)"])
def test_solve_L_gives_the_inverse_quadratic_form(formula):
    """‖L⁻¹v‖² = vᵀ(ΛᵀZᵀWZΛ + I)⁻¹v against the dense inverse, column by column."""
    m = build(formula, make_data(6, 300, 12), "single", True, "w")
    s = m.structure
    th = np.where(s.lower == 0.0, 0.9, 0.3)
    ZL = (s.Z @ s.Lambda(th)).toarray() * np.sqrt(s.weights)[:, None]
    V = np.random.default_rng(5).normal(size=(s.q, 3))
    got = np.asarray(m.backend.solve_L(th, V))
    want = np.einsum("ij,ji->i", V.T, np.linalg.solve(ZL.T @ ZL + np.eye(s.q), V))
    np.testing.assert_allclose(np.einsum("ij,ij->j", got, got), want, rtol=1e-10)
    L = np.linalg.cholesky(ZL.T @ ZL + np.eye(s.q))        # block diagonal, so P = I and L is unique
    np.testing.assert_allclose(got, np.linalg.solve(L, V), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_level_crossproducts_equal_the_sparse_products(weighted):
    """The one-pass sums over rows (no Z) against the general path's sparse products of Z."""
    df = make_data(9, 2000, 40)
    s = build_structure("y ~ x + f + (1 + x + z|g)", df, weights="w" if weighted else None)
    cp = CrossProducts.from_structure(s)
    W = np.ones(s.n) if s.weights is None else s.weights
    Ap, Ai, Mx = block_lower_ZtZ(s, s.weights)
    np.testing.assert_array_equal(cp.Ap, Ap)
    np.testing.assert_array_equal(cp.Ai, Ai)
    np.testing.assert_allclose(cp.Mx, Mx, rtol=1e-14, atol=1e-14 * np.abs(Mx).max())
    Xy = np.column_stack([s.X, s.y - s.X @ cp.beta_shift])
    np.testing.assert_allclose(cp.ZtXy, s.Z.T @ (Xy * W[:, None]), rtol=1e-12, atol=1e-12 * np.abs(cp.ZtXy).max())
    t = s.terms[0]
    M = level_blocks(cp, t)
    Xi = t.Xi * W[:, None]
    want = np.stack([Xi[t.codes == a].T @ t.Xi[t.codes == a] for a in range(t.nlevels)])
    np.testing.assert_allclose(M, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def test_z_is_not_built_for_a_one_term_fit():
    """The single-term fit needs only the level sums; Z is assembled when something asks for it."""
    df = make_data(3, 500, 20)
    res = fl.lmer("y ~ x + (x|g)", df, backend="single")
    s = res.structure
    assert s.__dict__.get("_Z") is None
    Z = s.Z
    assert Z.shape == (s.n, s.q) and s.__dict__["_Z"] is Z
    np.testing.assert_allclose(res.fitted(), s.X @ res.fixef.to_numpy() + Z @ res.model.backend.state(res.theta).b,
                               rtol=1e-12)


@pytest.mark.parametrize("REML", [True, False])
@pytest.mark.parametrize("formula", ["y ~ x + (1|g)", "y ~ x + (x|g)", "y ~ x + z + (1 + x + z|g)"])
def test_fit_equals_the_cholmod_fit(formula, REML):
    """BOBYQA on the single-term criterion and L-BFGS-B with its gradient both reach the
    optimum of the CHOLMOD path."""
    df = make_data(11, 800, 30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = fl.lmer(formula, df, REML=REML, backend="compiled", optimizer="bobyqa")
        for opt in ("bobyqa", "lbfgsb"):
            got = fl.lmer(formula, df, REML=REML, backend="single", optimizer=opt)
            assert got.model.backend_name == "single"
            assert got.criterion == pytest.approx(want.criterion, abs=1e-6)
            np.testing.assert_allclose(got.fixef, want.fixef, rtol=1e-5, atol=1e-4 * want.se.to_numpy().min())
            np.testing.assert_allclose(got.se, want.se, rtol=1e-4)
            np.testing.assert_allclose(got.ranef_condsd["g"].to_numpy(), want.ranef_condsd["g"].to_numpy(), rtol=1e-3)


ONE_TERM = [(d, f) for d, f in all_reference_fits()
            if f["formula"].count("|") == 1 and not any(op in f["formula"] for op in ("||", "/"))]
ONE_TERM_IDS = [f"{d}:{f['formula']}:{'REML' if f['REML'] else 'ML'}" for d, f in ONE_TERM]


def test_one_term_reference_fits_exist():
    assert {d for d, _ in ONE_TERM} >= {"sleepstudy", "Dyestuff", "Dyestuff2"}


@pytest.mark.parametrize("ds,ref", ONE_TERM, ids=ONE_TERM_IDS)
def test_lme4_reference_fits(ds, ref):
    """lme4's devfun(θ) at its reference points (1e-8 relative) and its fit (criterion, β̂, SEs,
    σ, conditional SDs) with the single-term backend."""
    df = load_reference_data(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fl.LinearMixedModel(ref["formula"], df, REML=ref["REML"], backend="single")
        res = m.fit()
    assert single_term_applicable(m.structure)
    for label, pt in ref["objective_at_theta"].items():
        th = np.atleast_1d(np.asarray(pt["theta"], dtype=float))
        assert m.objective(th) == pytest.approx(pt["objective"], rel=1e-8), label
    rc = ref["criterion"]
    assert res.criterion <= rc + 1e-6 + 2e-10 * abs(rc)
    assert res.criterion >= rc - 1e-3
    assert res.singular == bool(ref["isSingular"])
    np.testing.assert_allclose(res.fixef.to_numpy(), np.array(list(ref["fixef"].values())), rtol=1e-4,
                               atol=1e-3 * np.array(list(ref["fixef_se"].values())).min())
    np.testing.assert_allclose(res.se.to_numpy(), np.array(list(ref["fixef_se"].values())), rtol=1e-3)
    assert res.sigma == pytest.approx(ref["sigma"], rel=1e-3)
    if "ranef" in ref:
        want = pd.DataFrame(ref["ranef"])
        for (grpvar, term), sub in want.groupby(["grpvar", "term"], sort=False):
            sd = res.ranef_condsd[grpvar][term].reindex([str(g) for g in sub["grp"]])
            np.testing.assert_allclose(sd.to_numpy(), sub["condsd"].to_numpy(), rtol=2e-3, atol=1e-6)


def test_more_than_one_term_is_refused_clearly():
    df = make_data(1, 100, 5).assign(h=lambda d: d.g.str[-1])
    with raises_named(fl.ArgumentError, "'single'", "one random-effects term", "2"):
        fl.LinearMixedModel("y ~ x + (1|g) + (1|h)", df, backend="single")
    with raises_named(fl.ArgumentError, "ordering", "'single'"):
        fl.LinearMixedModel("y ~ x + (1|g)", df, backend="single", ordering="amd")


def test_a_response_that_the_fixed_effects_reproduce():
    """r² = 0 at every θ: refused as by the other backends."""
    df = make_data(2, 60, 6)
    df["y"] = 1.0 + 2.0 * df.x
    with pytest.raises(FastLMMError):
        fl.lmer("y ~ x + (1|g)", df, backend="single")


def test_sleepstudy_pieces_are_lme4s():
    """log|L|², log|R_X|², r² and ‖û‖² at lme4's θ̂ (sleepstudy.json's devcomp)."""
    import json
    from conftest import reference_dir
    ref = next(f for f in json.loads((reference_dir() / "sleepstudy.json").read_text())
               if f["formula"] == "Reaction ~ Days + (Days|Subject)" and f["REML"])
    m = fl.LinearMixedModel(ref["formula"], datasets.load("sleepstudy"), backend="single")
    st_ = m.backend.state(np.array(list(ref["theta"].values())))
    cmp = ref["devcomp_cmp"]
    assert st_.ldL2 == pytest.approx(cmp["ldL2"], rel=1e-9)
    assert st_.ldRX2 == pytest.approx(cmp["ldRX2"], rel=1e-9)
    assert st_.pwrss == pytest.approx(cmp["pwrss"], rel=1e-9)
    assert st_.u @ st_.u == pytest.approx(cmp["ussq"], rel=1e-7)
