"""Prediction standard errors and intervals (fastlmm_ext._predict, the mixed-model-equation
quadratic forms of _mme) and lme4's partial ``re.form`` (_newdata.selected_columns), against
tests/reference_r/predict.json (R, with the three standard errors computed there by hand), a
dense inverse of the mixed-model equations and invariants."""
from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._mme import mme_quadratic
from fastlmm_ext._newdata import selected_columns

from conftest import load_reference_data, quiet_lmer, reference_dir

REF_R = pathlib.Path(__file__).resolve().parent / "reference_r"
PREDICT = json.loads((REF_R / "predict.json").read_text())
MODELS = {m["id"]: m for m in json.loads((REF_R / "models.json").read_text())}
SE_NAMES = {"fixed": "se_fixed", "condvar": "se_cond", "joint": "se_joint"}


def _case_fit(case: dict) -> tuple[dict, np.ndarray]:
    """The model record of a predict.json case and lme4's θ̂ (the sleepstudy fits are those of
    the shared lme4 reference, the same data and lme4)."""
    fit = MODELS.get(case["fit"])
    if fit is None:
        fit = dict(PREDICT["sleepstudy_fits"], REML=case["REML"], contrasts_arg=None)
        shared = json.loads((reference_dir() / "sleepstudy.json").read_text())
        theta = next(f["theta"] for f in shared if f["formula"] == "Reaction ~ Days + (Days|Subject)"
                     and f["REML"] == case["REML"])
    else:
        theta = fit["theta"]
    return fit, np.array(list(theta.values()) if isinstance(theta, dict) else theta, dtype=float)


def _at_lme4_theta(case: dict, backend: str) -> fl.LmerResult:
    fit, theta = _case_fit(case)
    df = load_reference_data(fit, REF_R)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fl.LinearMixedModel(case["formula"], df, REML=case["REML"], backend=backend,
                                contrasts=fit.get("contrasts_arg"))
    return m.result_at(theta)


CASES = [(c, name) for c in PREDICT["cases"] for name in c["results"]]


@pytest.mark.parametrize("case,name", CASES, ids=[f"{c['id']}-{n}" for c, n in CASES])
def test_against_R_at_lme4s_theta(case, name, backend):
    """Predictions, the three SEs, their prediction SEs, confidence and prediction intervals of
    predict.json, for re.form NULL, NA and partial terms, with new levels; at lme4's θ̂ the only
    difference is rounding."""
    res = _at_lme4_theta(case, backend)
    assert res.sigma == pytest.approx(case["sigma"], rel=1e-10)
    r = case["results"][name]
    nd = pd.DataFrame(case["newdata"])
    for se_type, key in SE_NAMES.items():
        conf = res.predict(nd, re_form=r["re_form"], allow_new_levels=True, interval="confidence", se_type=se_type)
        pred = res.predict(nd, re_form=r["re_form"], allow_new_levels=True, interval="prediction", se_type=se_type)
        assert list(conf.columns) == ["fit", "se_fit", "lower", "upper"]
        np.testing.assert_allclose(conf["fit"], r["prediction"], rtol=1e-10)
        np.testing.assert_allclose(conf["fit"], r["lme4_predict"], rtol=1e-10)
        np.testing.assert_allclose(conf["se_fit"], r[key], rtol=1e-8, err_msg=key)
        np.testing.assert_allclose(pred["se_fit"], r[key], rtol=1e-8)
        tag = key.removeprefix("se_")
        half = np.asarray(r[f"pi95_{tag}"]["upper"]) - np.asarray(r["prediction"])
        np.testing.assert_allclose(half, case["z_quantile"] * np.asarray(r[f"se_pred_{tag}"]), rtol=1e-9)
        for side in ("lower", "upper"):
            np.testing.assert_allclose(pred[side], r[f"pi95_{tag}"][side], rtol=1e-9, err_msg=f"pi95_{tag}")
            if f"ci95_{tag}" in r:
                np.testing.assert_allclose(conf[side], r[f"ci95_{tag}"][side], rtol=1e-9, err_msg=f"ci95_{tag}")
    # the partial re.form kept the columns R kept
    kept = {t.factor: [] for t in res.structure.terms}
    for i, mask in selected_columns(res.structure, r["re_form"]).items():
        t = res.structure.terms[i]
        kept[t.factor] += [c for c, k in zip(t.cnms, mask) if k]
    assert kept == r["kept_columns"]


def test_fitted_model_against_R(backend):
    """At our own optimum the predictions agree with lme4's to the optimisers' precision."""
    case = next(c for c in PREDICT["cases"] if c["id"] == "Machines_nested_REML")
    fit, _ = _case_fit(case)
    res = quiet_lmer(case["formula"], load_reference_data(fit, REF_R), backend=backend)
    nd = pd.DataFrame(case["newdata"])
    for name, r in case["results"].items():
        out = res.predict(nd, re_form=r["re_form"], allow_new_levels=True, se_fit=True)
        np.testing.assert_allclose(out["fit"], r["prediction"], rtol=1e-6)
        np.testing.assert_allclose(out["se_fit"], r["se_joint"], rtol=1e-3)


def test_default_se_is_joint_and_never_above_condvar(sleep):
    df, res = sleep
    nd = pd.DataFrame({"Subject": ["308", "309", "372", "999"], "Days": [0.0, 4.5, 9.0, 3.0]})
    joint = res.predict(nd, allow_new_levels=True, se_fit=True)
    cond = res.predict(nd, allow_new_levels=True, se_fit=True, se_type="condvar")
    fixed = res.predict(nd, allow_new_levels=True, se_fit=True, se_type="fixed")
    np.testing.assert_array_equal(joint.to_numpy(), res.predict(nd, allow_new_levels=True, se_fit=True,
                                                                se_type="joint").to_numpy())
    assert (joint["se_fit"] <= cond["se_fit"] * (1 + 1e-12)).all()
    # (the joint SE can be below the fixed one too: β̂ and b̂ − b are negatively correlated)
    # a new level's row: b̂ = 0 and Var(b) = Σ from VarCorr, independent of β̂, in both
    x = np.array([1.0, 3.0])
    S = res.term_covariances()["Subject"]
    want = np.sqrt(x @ res.vcov.to_numpy() @ x + x @ S @ x)
    assert joint["se_fit"].iloc[3] == pytest.approx(want, rel=1e-12)
    assert cond["se_fit"].iloc[3] == pytest.approx(want, rel=1e-12)
    assert fixed["se_fit"].iloc[3] == pytest.approx(np.sqrt(x @ res.vcov.to_numpy() @ x), rel=1e-12)
    # population predictions: xᵀV̂x whatever se_type, equal to the fit's coefficient covariance
    for se_type in SE_NAMES:
        pop = res.predict(nd, re_form="NA", se_fit=True, se_type=se_type)
        Xn = np.column_stack([np.ones(4), nd["Days"]])
        np.testing.assert_allclose(pop["se_fit"], np.sqrt(np.einsum("ij,jk,ik->i", Xn, res.vcov.to_numpy(), Xn)),
                                   rtol=1e-12)


def _dense_mme_inverse_quadratic(res, X, Z):
    """gᵀA⁻¹g from the dense coefficient matrix of the mixed-model equations (np.linalg.solve)."""
    s = res.structure
    w = np.ones(s.n) if s.weights is None else s.weights
    ZL = (s.Z @ s.Lambda(res.theta)).toarray()
    XX, ZZ = s.X * np.sqrt(w)[:, None], ZL * np.sqrt(w)[:, None]
    A = np.block([[XX.T @ XX, XX.T @ ZZ], [ZZ.T @ XX, ZZ.T @ ZZ + np.eye(s.q)]])
    G = np.hstack([X, (Z @ s.Lambda(res.theta)).toarray()])
    return np.einsum("ij,ji->i", G, np.linalg.solve(A, G.T))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), weighted=st.booleans())
def test_mme_quadratic_equals_the_dense_inverse(seed, weighted):
    """Random crossed designs with a random slope, every backend: the factor's quadratic forms
    equal those of the dense A⁻¹, for rows of the fit and for arbitrary rows."""
    rng = np.random.default_rng(seed)
    df = datasets.simulate_crossed(300, 12, 6, seed=seed, slope_sd=0.4)
    w = rng.uniform(0.3, 2.0, len(df)) if weighted else None
    for backend in ("compiled", "blocked", "reference"):
        res = quiet_lmer("y ~ x + (x|a) + (1|b)", df, weights=w, backend=backend)
        s = res.structure
        Zr = sp.csr_matrix(rng.normal(size=(7, s.q)) * (rng.uniform(size=(7, s.q)) < 0.2))
        Xr = rng.normal(size=(7, s.p))
        for X, Z in ((s.X, s.Z), (Xr, Zr)):
            np.testing.assert_allclose(mme_quadratic(res, X, Z.T), _dense_mme_inverse_quadratic(res, X, Z),
                                       rtol=1e-9, err_msg=backend)


def test_joint_se_of_training_rows_is_the_hat_value(sleep):
    """For the model's own rows the joint variance is σ̂² hᵢ / wᵢ (the hat matrix diagonal)."""
    df, _ = sleep
    w = np.linspace(0.5, 2.0, len(df))
    res = quiet_lmer("Reaction ~ Days + (Days|Subject)", df, weights=w)
    out = res.predict(se_fit=True, interval="prediction")
    np.testing.assert_allclose(out["fit"], res.fitted(), rtol=1e-12)
    np.testing.assert_allclose(out["se_fit"] ** 2, res.sigma ** 2 * res.hatvalues() / w, rtol=1e-10)
    z = 1.959963984540054
    np.testing.assert_allclose(out["upper"] - out["fit"], z * np.sqrt(out["se_fit"] ** 2 + res.sigma ** 2 / w),
                               rtol=1e-12)
    # new rows carry weights of their own for the prediction interval (1 by default)
    nd = df.head(3)
    p1 = res.predict(nd, interval="prediction")
    p4 = res.predict(nd, interval="prediction", weights=np.full(3, 4.0))
    np.testing.assert_allclose((p1["upper"] - p1["fit"]) ** 2 / z ** 2 - p1["se_fit"] ** 2, res.sigma ** 2,
                               rtol=1e-10)
    np.testing.assert_allclose((p4["upper"] - p4["fit"]) ** 2 / z ** 2 - p4["se_fit"] ** 2, res.sigma ** 2 / 4,
                               rtol=1e-10)
    np.testing.assert_allclose(res.predict(nd.assign(w=4.0), interval="prediction", weights="w"), p4, rtol=1e-14)


def test_level_and_missing_rows(sleep):
    df, res = sleep
    nd = pd.DataFrame({"Subject": ["308", None, "310"], "Days": [1.0, 2.0, np.nan]})
    out = res.predict(nd, interval="confidence", level=0.9)
    assert out.iloc[1:].isna().all().all() and out.iloc[0].notna().all()
    half = out["upper"].iloc[0] - out["fit"].iloc[0]
    assert half == pytest.approx(1.6448536269514722 * out["se_fit"].iloc[0], rel=1e-12)
    assert isinstance(res.predict(nd), pd.Series)        # without se_fit or an interval: as before


def test_partial_re_form_of_uncorrelated_terms(sleep):
    """A (Days||Subject) fit has two terms on Subject; re.form picks columns across them as
    lme4 picks them from ranef(fit)$Subject by name."""
    df, _ = sleep
    res = quiet_lmer("Reaction ~ Days + (Days||Subject)", df)
    nd = df.iloc[[0, 25, 99]]
    b = res.ranef["Subject"].loc[nd["Subject"].astype(str)]
    pop = res.predict(nd, re_form="NA").to_numpy()
    icpt = pop + b["(Intercept)"].to_numpy()
    slope = pop + b["Days"].to_numpy() * nd["Days"].to_numpy()
    np.testing.assert_allclose(res.predict(nd, re_form="~ (1 | Subject)"), icpt, rtol=1e-12)
    np.testing.assert_allclose(res.predict(nd, re_form="~ (0 + Days | Subject)"), slope, rtol=1e-12)
    for full in ("~ (Days | Subject)", "~ (Days || Subject)", "~ (1 + Days | Subject)"):
        np.testing.assert_allclose(res.predict(nd, re_form=full), res.predict(nd), rtol=1e-12)
    # the same columns of a correlated fit's single term
    res2 = quiet_lmer("Reaction ~ Days + (Days|Subject)", df)
    b2 = res2.ranef["Subject"].loc[nd["Subject"].astype(str)]
    pop2 = res2.predict(nd, re_form="~0").to_numpy()
    np.testing.assert_allclose(res2.predict(nd, re_form="~(0+Days|Subject)"),
                               pop2 + b2["Days"].to_numpy() * nd["Days"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(res2.predict(re_form="~(1|Subject)").to_numpy()[[0, 25, 99]],
                               pop2 + b2["(Intercept)"].to_numpy(), rtol=1e-12)


def test_partial_re_form_of_nested_factors():
    df = datasets.load("Pastes")
    res = quiet_lmer("strength ~ 1 + (1|batch/cask)", df)
    mu = res.fixef["(Intercept)"]
    nd = pd.DataFrame({"batch": ["A", "C"], "cask": ["b", "a"]})
    b = res.ranef
    np.testing.assert_allclose(res.predict(nd, re_form="~ (1 | cask:batch)"),
                               mu + b["cask:batch"].loc[["b:A", "a:C"], "(Intercept)"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(res.predict(nd, re_form="~ (1 | batch/cask)"), res.predict(nd), rtol=1e-12)


def test_re_form_errors(sleep):
    df, res = sleep
    with pytest.raises(fl.ArgumentError, match=r"'Sub' is not one of its grouping factors"):
        res.predict(df, re_form="~ (1 | Sub)")
    with pytest.raises(fl.ArgumentError, match=r"column 'I\(Days\^2\)'.*'\(Intercept\)', 'Days'"):
        res.predict(df, re_form="~ (0 + I(Days^2) | Subject)")
    with pytest.raises(fl.ArgumentError, match="re_form"):
        res.predict(df, re_form=3)
    with pytest.raises(fl.ArgumentError, match="keeps only some columns"):
        res.simulate(1, seed=1, re_form="~ (1 | Subject)")
    for bad, what in ((dict(se_type="cond"), "se_type"), (dict(interval="yes"), "interval"),
                      (dict(interval="confidence", level=1.5), "level"),
                      (dict(se_fit=True, weights=np.ones(len(df))), "weights")):
        with pytest.raises(fl.ArgumentError, match=what):
            res.predict(df, **bad)
    with pytest.raises(fl.DataError, match="weights"):
        res.predict(df.head(2), interval="prediction", weights=[1.0, -1.0])
    with pytest.raises(fl.MissingColumnError, match="wt"):
        res.predict(df.head(2), interval="prediction", weights="wt")


def test_model_from_cross_products(sleep):
    """A model fitted from chunks keeps no rows, but its cross-products carry everything the
    standard errors need: at the same θ they equal the in-memory model's."""
    df, res = sleep
    chunked = fl.lmer_chunked("Reaction ~ Days + (Days|Subject)", [df.iloc[:90], df.iloc[90:]])
    at = chunked.model.result_at(res.theta)
    nd = pd.DataFrame({"Subject": ["308", "309", "999"], "Days": [9.0, 4.5, 3.0]})
    for se_type in SE_NAMES:
        for re_form in (None, "~(1|Subject)", "NA"):
            kw = dict(re_form=re_form, allow_new_levels=True, interval="prediction", se_type=se_type)
            np.testing.assert_allclose(at.predict(nd, **kw), res.predict(nd, **kw), rtol=1e-10)
    with pytest.raises(fl.DataError, match="rows"):
        at.predict(se_fit=True)
