"""predict (fastlmm_ext._predict, the new-data design of _newdata), fitted, residuals and
ranef_table against lme4."""
from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._predict import PredictMixin
from fastlmm_ext._results import LmerResult

from conftest import all_reference_fits, load_reference_data, quiet_lmer, reference_dir


def test_result_has_prediction_methods():
    assert issubclass(LmerResult, PredictMixin)
    assert "type" in inspect.signature(LmerResult.residuals).parameters

REF_FITS = [(k, f) for k, f in all_reference_fits() if "fitted" in f or "ranef" in f]
REF_IDS = [f"{k}-{f['formula']}-{'REML' if f['REML'] else 'ML'}" for k, f in REF_FITS]



@pytest.fixture(scope="module")
def pastes():
    df = datasets.load("Pastes")
    return df, quiet_lmer("strength ~ 1 + (1|batch/cask)", df)


@pytest.fixture(scope="module")
def cake():
    fit = next(f for k, f in all_reference_fits() if k == "cake" and f["REML"])
    return fit, load_reference_data(fit), quiet_lmer(fit["formula"], load_reference_data(fit))


# ----------------------------------------------------------------------------- predict

@pytest.mark.parametrize("backend", ["compiled", "reference", "blocked"])
@pytest.mark.parametrize("name,formula", [("sleepstudy", "Reaction ~ Days + (Days|Subject)"),
                                          ("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)"),
                                          ("Pastes", "strength ~ 1 + (1|batch/cask)")])
def test_predict_training_data_is_fitted(backend, name, formula):
    df = datasets.load(name)
    res = quiet_lmer(formula, df, backend=backend)
    fitted = res.fitted()
    np.testing.assert_allclose(res.predict(df).to_numpy(), fitted, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(res.predict().to_numpy(), fitted, rtol=1e-12, atol=1e-10)
    pop = res.structure.X @ res.beta
    np.testing.assert_allclose(res.predict(df, re_form="~0").to_numpy(), pop, rtol=1e-12)
    for na in ("NA", "~ 0", False, np.nan):
        np.testing.assert_allclose(res.predict(re_form=na).to_numpy(), pop, rtol=1e-12)


@pytest.mark.parametrize("key,fit", REF_FITS, ids=REF_IDS)
def test_fitted_and_ranef_against_lme4(key, fit, fitted_reference):
    df, res = fitted_reference(f"{key}|{fit['formula']}|{fit['REML']}", fit)
    if "fitted" in fit:
        ref = np.asarray(fit["fitted"], dtype=float)
        np.testing.assert_allclose(res.fitted(), ref, rtol=1e-5)
        np.testing.assert_allclose(res.predict(df).to_numpy(), ref, rtol=1e-5)
    if "ranef" in fit:
        ref = pd.DataFrame(fit["ranef"])
        tab = res.ranef_table()
        assert list(tab.columns) == ["grpvar", "term", "grp", "condval", "condsd"]
        assert tab[["grpvar", "term", "grp"]].values.tolist() == ref[["grpvar", "term", "grp"]].values.tolist()
        for col in ("condval", "condsd"):
            r = ref[col].to_numpy(dtype=float)
            np.testing.assert_allclose(tab[col].to_numpy(), r, rtol=1e-3,
                                       atol=1e-3 * np.max(np.abs(r)) + 1e-12, err_msg=col)


def test_predict_subset_reordered_and_string_typed(sleep):
    df, res = sleep
    full = pd.Series(res.fitted(), index=df.index)
    nd = df.sample(25, random_state=3)[["Subject", "Days"]]           # reordered, columns permuted
    p = res.predict(nd)
    assert list(p.index) == list(nd.index)
    np.testing.assert_allclose(p, full.loc[nd.index], rtol=1e-12)
    as_text = nd.astype({"Subject": str, "Days": str})                 # strings for a factor and a number
    np.testing.assert_allclose(res.predict(as_text), p, rtol=1e-12)
    as_float = nd.assign(Subject=nd["Subject"].astype(int).astype(float))   # 308.0 matches level "308"
    np.testing.assert_allclose(res.predict(as_float), p, rtol=1e-12)
    as_dict = {"Days": nd["Days"].tolist(), "Subject": nd["Subject"].astype(int).tolist()}
    np.testing.assert_allclose(res.predict(as_dict).to_numpy(), p.to_numpy(), rtol=1e-12)


def test_predict_new_levels(sleep):
    df, res = sleep
    nd = pd.DataFrame({"Subject": [308, 999, 1000, 309], "Days": [1.0, 2.0, 5.0, 0.0]})
    with pytest.raises(fl.DataError, match=r"Subject.*'999', '1000'"):
        res.predict(nd)
    with pytest.raises(ValueError, match="allow_new_levels"):
        res.predict(nd)
    p = res.predict(nd, allow_new_levels=True).to_numpy()
    pop = res.fixef["(Intercept)"] + res.fixef["Days"] * nd["Days"].to_numpy()
    np.testing.assert_allclose(p[[1, 2]], pop[[1, 2]], rtol=1e-12)
    b = res.ranef["Subject"]
    np.testing.assert_allclose(p[0], pop[0] + b.loc["308", "(Intercept)"] + 1.0 * b.loc["308", "Days"], rtol=1e-12)
    np.testing.assert_allclose(p[3], pop[3] + b.loc["309", "(Intercept)"], rtol=1e-12)
    many = pd.DataFrame({"Subject": np.arange(2000, 2012), "Days": 1.0})
    with pytest.raises(fl.DataError, match=r"and 7 more"):
        res.predict(many)


def test_predict_missing_values_give_nan(sleep):
    df, res = sleep
    nd = pd.DataFrame({"Subject": pd.Series(["308", None, "310", "330"], dtype=object),
                       "Days": [1.0, 2.0, np.nan, 4.0]})
    p = res.predict(nd).to_numpy()
    assert np.isnan(p[1]) and np.isnan(p[2]) and np.isfinite(p[[0, 3]]).all()
    # the population level needs neither the grouping column nor its values
    pop = res.predict(nd[["Days"]], re_form="~0").to_numpy()
    assert np.isnan(pop[2]) and np.isfinite(pop[[0, 1, 3]]).all()


def test_predict_missing_column(sleep):
    df, res = sleep
    with pytest.raises(fl.MissingColumnError, match="Subject"):
        res.predict(df[["Days"]])
    with pytest.raises(fl.MissingColumnError, match="Days"):
        res.predict(df[["Subject"]], re_form="~0")


def test_predict_re_form_subset_of_terms(pastes):
    df, res = pastes
    b = res.ranef
    mu = res.fixef["(Intercept)"]
    nd = pd.DataFrame({"batch": ["A", "C"], "cask": ["b", "a"]})
    only_batch = res.predict(nd, re_form="~ (1 | batch)").to_numpy()
    np.testing.assert_allclose(only_batch, mu + b["batch"].loc[["A", "C"], "(Intercept)"].to_numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="not a random-effects term"):
        res.predict(nd, re_form="~ (1 | cask)")


def test_predict_nested_and_interaction_grouping(pastes):
    df, res = pastes
    assert [t.group_columns for t in res.structure.terms] == [("cask", "batch"), ("batch",)]
    rev = df.iloc[::-1]
    np.testing.assert_allclose(res.predict(rev).to_numpy()[::-1], res.fitted(), rtol=1e-12)
    b = res.ranef
    mu = res.fixef["(Intercept)"]
    nd = pd.DataFrame({"batch": ["A", "A", "Z"], "cask": ["a", "z", "a"]})
    with pytest.raises(fl.DataError, match=r"'cask:batch'.*'z:A', 'a:Z'.*'batch'.*'Z'"):
        res.predict(nd)
    p = res.predict(nd, allow_new_levels=True).to_numpy()
    bA = b["batch"].loc["A", "(Intercept)"]
    np.testing.assert_allclose(p, [mu + bA + b["cask:batch"].loc["a:A", "(Intercept)"], mu + bA, mu], rtol=1e-12)
    # an explicit interaction grouping a:b labels levels "a_level:b_level"
    res2 = quiet_lmer("strength ~ 1 + (1|batch) + (1|batch:cask)", df)
    assert res2.structure.terms[0].factor == "batch:cask"
    np.testing.assert_allclose(res2.predict(df.astype(str)).to_numpy(), res2.fitted(), rtol=1e-12)
    np.testing.assert_allclose(res2.fitted(), res.fitted(), rtol=1e-6)


def test_predict_ordered_factor_fixed_part(cake):
    fit, df, res = cake
    assert "temperature.L" in res.fixef.index
    raw = pd.read_csv(reference_dir() / fit["data_file"])        # ints and strings, no categoricals
    np.testing.assert_allclose(res.predict(raw).to_numpy(), np.asarray(fit["fitted"]), rtol=1e-5)
    np.testing.assert_allclose(res.predict(raw, re_form="~0").to_numpy(), res.structure.X @ res.beta, rtol=1e-12)
    nd = pd.DataFrame({"recipe": ["B", "C"], "temperature": [205, 175], "replicate": [3, 99]})
    p = res.predict(nd, allow_new_levels=True).to_numpy()
    pop = res.predict(nd, re_form="~0").to_numpy()
    assert p[0] == pytest.approx(pop[0] + res.ranef["recipe:replicate"].loc["B:3", "(Intercept)"], rel=1e-12)
    assert p[1] == pytest.approx(pop[1], rel=1e-12)
    # population prediction at (B, 205) equals the fitted population mean of those rows
    rows = (raw["recipe"] == "B").to_numpy() & (raw["temperature"] == 205).to_numpy()
    assert pop[0] == pytest.approx((res.structure.X @ res.beta)[rows][0], rel=1e-12)
    with pytest.raises(fl.DataError, match=r"factor 'temperature' has new level\(s\) '206'"):
        res.predict(nd.assign(temperature=[206, 175]))
    with pytest.raises(fl.DataError, match=r"factor 'recipe'.*'D'"):
        res.predict(nd.assign(recipe=["D", "A"]), re_form="~0")


def test_predict_rank_deficient_and_offsets(sleep):
    df, _ = sleep
    d = df.assign(Days2=2.0 * df["Days"], base=0.5 * df["Days"], half=np.where(df["Days"] >= 5, "late", "early"))
    res = quiet_lmer("Reaction ~ Days + Days2 + half + offset(base) + (1|Subject)", d)
    assert "Days2" not in res.fixef.index
    np.testing.assert_allclose(res.predict(d).to_numpy(), res.fitted(), rtol=1e-12)
    sub = d.iloc[[5, 0, 17]]
    np.testing.assert_allclose(res.predict(sub, re_form="~0").to_numpy(),
                               (res.structure.X @ res.beta + res.structure.offset)[[5, 0, 17]], rtol=1e-12)
    # an offset given as an argument must be given again for new data
    res2 = quiet_lmer("Reaction ~ Days + (1|Subject)", d, offset="base")
    with pytest.raises(fl.DataError, match="offset="):
        res2.predict(d)
    np.testing.assert_allclose(res2.predict(d, offset="base").to_numpy(), res2.fitted(), rtol=1e-12)
    np.testing.assert_allclose(res2.predict(d, offset=d["base"].to_numpy()).to_numpy(), res2.fitted(), rtol=1e-12)


def test_predict_factor_in_random_part_only(sleep):
    df, _ = sleep
    d = df.assign(half=np.where(df["Days"] >= 5, "late", "early"))
    res = quiet_lmer("Reaction ~ Days + (1|Subject) + (0 + half|Subject)", d)
    np.testing.assert_allclose(res.predict(d).to_numpy(), res.fitted(), rtol=1e-12)
    late = d[d["half"] == "late"].head(4)
    full = pd.Series(res.fitted(), index=d.index)
    # the structure records the training levels, so one level alone is coded correctly
    np.testing.assert_allclose(res.predict(late), full.loc[late.index], rtol=1e-12)
    late_cat = late.assign(half=pd.Categorical(late["half"], categories=["early", "late"]))
    np.testing.assert_allclose(res.predict(late_cat), full.loc[late.index], rtol=1e-12)


# ----------------------------------------------------------------------------- residuals

def test_residual_types(sleep):
    df, res = sleep
    r = df["Reaction"].to_numpy() - res.fitted()
    np.testing.assert_allclose(res.residuals(), r)
    np.testing.assert_allclose(res.residuals(type="response"), r)
    np.testing.assert_allclose(res.residuals(type="pearson"), r)        # no weights: lme4's wtres = y − μ
    np.testing.assert_allclose(res.residuals(scaled=True), r / res.sigma)
    np.testing.assert_allclose(res.residuals("pearson", scaled=True), r / res.sigma)
    with pytest.raises(ValueError, match="residual type"):
        res.residuals(type="partial")
    w = np.linspace(0.5, 2.0, len(df))
    rw = quiet_lmer("Reaction ~ Days + (Days|Subject)", df, weights=w)
    e = df["Reaction"].to_numpy() - rw.fitted()
    np.testing.assert_allclose(rw.residuals(), e)
    np.testing.assert_allclose(rw.residuals(type="pearson"), np.sqrt(w) * e)
    np.testing.assert_allclose(rw.residuals(type="pearson", scaled=True), np.sqrt(w) * e / rw.sigma)
    np.testing.assert_allclose(rw.residuals(scaled=True), np.sqrt(w) * e / rw.sigma)   # as before
    assert "Scaled residuals" in rw.summary()
