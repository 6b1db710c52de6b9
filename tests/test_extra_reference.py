"""Against extra lme4 values made by tests/reference_extra/make_extra.R (R 4.2, lme4 1.1.31):
prior weights, offsets, profile and Wald intervals."""
from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from conftest import reference_dir
from fastlmm_ext import datasets

EXTRA = json.loads((pathlib.Path(__file__).parent / "reference_extra" / "extra.json").read_text())


def _sleep():
    ss = datasets.load("sleepstudy")
    ss["w"] = 1.0 + (ss.Days % 3)
    ss["off"] = 2.0 * ss.Days
    return ss


def _check_fit(res, ref):
    assert res.criterion <= ref["criterion"] + 1e-6 + 2e-10 * abs(ref["criterion"])
    assert res.criterion == pytest.approx(ref["criterion"], abs=1e-4)
    assert res.sigma == pytest.approx(ref["sigma"], rel=1e-3)
    np.testing.assert_allclose(res.fixef.to_numpy(), list(ref["fixef"].values()), rtol=1e-4)
    np.testing.assert_allclose(res.se.to_numpy(), list(ref["fixef_se"].values()), rtol=1e-3)
    np.testing.assert_allclose(res.varcorr["vcov"].to_numpy(float), [r["vcov"] for r in ref["varcorr"]], rtol=1e-3,
                               atol=1e-3)
    assert res.loglik == pytest.approx(ref["logLik"], abs=1e-4)
    assert res.aic == pytest.approx(ref["AIC"], abs=1e-4)


@pytest.mark.parametrize("backend", ["compiled", "reference", "blocked", "single"])
@pytest.mark.parametrize("key", ["weights_REML", "weights_ML"])
def test_prior_weights_match_lme4(key, backend):
    ref = EXTRA[key]
    ss = _sleep()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fl.lmer("Reaction ~ Days + (Days|Subject)", ss, REML=ref["REML"], weights="w", backend=backend)
        arr = fl.lmer("Reaction ~ Days + (Days|Subject)", ss, REML=ref["REML"], weights=ss["w"].to_numpy(),
                      backend=backend)
    _check_fit(res, ref)
    assert arr.criterion == pytest.approx(res.criterion, rel=1e-12)
    assert "Weights: prior weights" in res.summary()


@pytest.mark.parametrize("how", ["offset_arg", "offset_formula"])
def test_offsets_match_lme4(how):
    ref = EXTRA[how]
    ss = _sleep()
    if how == "offset_arg":
        res = fl.lmer("Reaction ~ Days + (1|Subject)", ss, offset="off")
        arr = fl.lmer("Reaction ~ Days + (1|Subject)", ss, offset=ss["off"].to_numpy())
        assert arr.criterion == pytest.approx(res.criterion, rel=1e-12)
    else:
        res = fl.lmer("Reaction ~ Days + offset(off) + (1|Subject)", ss)
    _check_fit(res, ref)
    # the offset is part of the fitted values
    np.testing.assert_allclose(res.fitted() - ss["off"].to_numpy(), res.structure.X @ res.fixef.to_numpy()
                               + res.structure.Z @ res._state.b, rtol=1e-10)


def test_bad_weights_and_offsets():
    ss = _sleep()
    with pytest.raises(fl.DataError, match="non-negative"):
        fl.lmer("Reaction ~ Days + (1|Subject)", ss, weights=-ss.w.to_numpy())
    with pytest.raises(fl.DataError, match="length"):
        fl.lmer("Reaction ~ Days + (1|Subject)", ss, weights=np.ones(10))
    with pytest.raises(fl.MissingColumnError, match="nope"):
        fl.lmer("Reaction ~ Days + (1|Subject)", ss, offset="nope")


def _confint_data(name):
    if name.startswith("Dyestuff"):
        df = pd.read_csv(reference_dir() / "Dyestuff.csv")
        df["Batch"] = df["Batch"].astype(str)
        return df
    return datasets.load(name.split("_")[0])


@pytest.mark.parametrize("case", EXTRA["confint"], ids=[c["name"] for c in EXTRA["confint"]])
def test_profile_confint_matches_lme4(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fl.lmer(case["formula"], _confint_data(case["name"]), REML=case["REML"])
    want = pd.DataFrame({"2.5 %": case["profile"]["lower"], "97.5 %": case["profile"]["upper"]},
                        index=case["profile"]["rownames"])
    got = res.confint(method="profile")
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-3, atol=1e-6)
    # Wald: NaN for variance parameters, β̂ ± z SE for the fixed effects
    wald = res.confint(method="wald")
    lo = np.array([np.nan if v is None else v for v in case["wald"]["lower"]], dtype=float)
    np.testing.assert_allclose(wald["2.5 %"].to_numpy(), lo, rtol=1e-4)


def test_profile_confint_other_level_and_parm():
    case = next(c for c in EXTRA["confint"] if c["name"] == "Penicillin")
    res = fl.lmer(case["formula"], datasets.load("Penicillin"))
    got = res.confint(method="profile", level=0.90, parm=[".sigma", "(Intercept)"])
    assert list(got.columns) == ["5 %", "95 %"]
    rn = case["profile90"]["rownames"]
    want = np.array([[case["profile90"]["lower"][rn.index(p)], case["profile90"]["upper"][rn.index(p)]]
                     for p in [".sigma", "(Intercept)"]])
    np.testing.assert_allclose(got.to_numpy(), want, rtol=1e-3)


def test_predict_matches_lme4_on_new_data():
    """lme4's predict() with new levels allowed, and re.form = NA, on new rows."""
    ref = EXTRA["predict"]
    res = fl.lmer(ref["formula"], datasets.load("sleepstudy"))
    nd = pd.DataFrame(ref["newdata"])
    np.testing.assert_allclose(res.predict(nd, allow_new_levels=True).to_numpy(), ref["full_new_levels"], rtol=1e-5)
    np.testing.assert_allclose(res.predict(nd, re_form="~0").to_numpy(), ref["population"], rtol=1e-6)
    with pytest.raises(fl.DataError, match="999"):
        res.predict(nd)
    refp = EXTRA["predict_nested"]
    resp = fl.lmer(refp["formula"], datasets.load("Pastes"))
    np.testing.assert_allclose(resp.predict(pd.DataFrame(refp["newdata"])).to_numpy(), refp["full"], rtol=1e-5)


def test_bootstrap_confint_brackets_profile():
    res = fl.lmer("Reaction ~ Days + (Days|Subject)", datasets.load("sleepstudy"))
    ci = res.confint(method="boot", nsim=100, seed=3)
    prof = next(c for c in EXTRA["confint"] if c["name"] == "sleepstudy")["profile"]
    assert list(ci.index) == prof["rownames"]
    # the percentile intervals of 100 replicates cover the estimates and overlap lme4's profile intervals
    for name, lo, hi in zip(prof["rownames"], prof["lower"], prof["upper"]):
        assert ci.loc[name, "2.5 %"] < hi and ci.loc[name, "97.5 %"] > lo, name
    again = res.confint(method="boot", nsim=100, seed=3)
    pd.testing.assert_frame_equal(ci, again)
