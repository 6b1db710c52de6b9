"""Inference: Satterthwaite t-tests and type III F-tests against lmerTest 3.1, Wald intervals,
likelihood-ratio tests against lme4's log-likelihoods, and the invariants behind them."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import all_reference_fits, load_reference_data
from scipy import stats

import fastlmm_ext as fl
from fastlmm_ext._derivatives import hessian_richardson, jacobian_richardson
from fastlmm_ext._inference import anova
from fastlmm_ext._satterthwaite import SatterthwaiteInfo

FITS = all_reference_fits()
IDS = [f"{ds}:{f['formula']}:{'REML' if f['REML'] else 'ML'}" for ds, f in FITS]   # as test_reference (shared cache)
KEY = {id(f): i for f, i in zip((f for _, f in FITS), IDS)}

# InstEval fits cost ~6 s each (plus ~4 s of derivatives): one by default, all with FASTLMM_FULL_INFERENCE=1.
FULL = os.environ.get("FASTLMM_FULL_INFERENCE", "") not in ("", "0")
_first_insteval = next(i for (ds, f), i in zip(FITS, IDS) if ds == "InstEval" and f["REML"] and "service" in f["formula"])
SELECTED = [(ds, f) for (ds, f), i in zip(FITS, IDS) if ds != "InstEval" or FULL or i == _first_insteval]
SELECTED_IDS = [KEY[id(f)] for _, f in SELECTED]
SMALL = [(ds, f) for ds, f in FITS if ds != "InstEval"]
SMALL_IDS = [KEY[id(f)] for _, f in SMALL]


def _get(fitted_reference, ref):
    return fitted_reference(KEY[id(ref)], ref)


def _ref_table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows).set_index("term")


def _find(ds: str, formula: str, reml: bool) -> dict:
    return next(f for d, f in FITS if d == ds and f["formula"] == formula and f["REML"] == reml)


# ----------------------------------------------------------------------------- against lmerTest

@pytest.mark.parametrize("ds,ref", SELECTED, ids=SELECTED_IDS)
def test_satterthwaite_coefficients_match_lmerTest(ds, ref, fitted_reference):
    _, res = _get(fitted_reference, ref)
    want = _ref_table(ref["lmerTest_satterthwaite"]["coefficients"])
    got = res.coef_table()
    assert list(got.columns) == ["Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"]
    assert list(got.index) == list(want.index)
    # lmerTest evaluated lme4's optimum; ours differs from it by ~1e-4 in θ, hence rtol 1e-3 on df.
    np.testing.assert_allclose(got["Estimate"], want["Estimate"], rtol=1e-4, atol=1e-6 * want["Std. Error"].max())
    np.testing.assert_allclose(got["Std. Error"], want["Std. Error"], rtol=1e-3)
    np.testing.assert_allclose(got["df"], want["df"], rtol=1e-3)
    np.testing.assert_allclose(got["t value"], want["t value"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got["Pr(>|t|)"], want["Pr(>|t|)"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("ds,ref", SELECTED, ids=SELECTED_IDS)
def test_type3_anova_matches_lmerTest(ds, ref, fitted_reference):
    _, res = _get(fitted_reference, ref)
    want = _ref_table(ref["lmerTest_satterthwaite"]["anova_type3"]) if ref["lmerTest_satterthwaite"]["anova_type3"] \
        else pd.DataFrame()
    got = res.anova_table()
    assert list(got.columns) == ["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
    assert list(got.index) == list(want.index)      # intercept-only models: an empty table, as lmerTest
    if len(want) == 0:
        return
    assert list(got["NumDF"]) == [int(v) for v in want["NumDF"]]
    for col in ("Sum Sq", "Mean Sq", "F value"):
        np.testing.assert_allclose(got[col], want[col], rtol=5e-4)
    np.testing.assert_allclose(got["DenDF"], want["DenDF"], rtol=1e-3)
    np.testing.assert_allclose(got["Pr(>F)"], want["Pr(>F)"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("ds,ref", SMALL, ids=SMALL_IDS)
def test_satterthwaite_at_lme4_optimum_reproduces_lmerTest(ds, ref, fitted_reference):
    """Evaluated at lme4's own (θ, σ) the method reproduces lmerTest's df to 1e-6: the remaining
    differences in the tests above are the optimiser's, not the method's."""
    _, res = _get(fitted_reference, ref)
    theta = np.array(list(ref["theta"].values()), dtype=float)
    info = SatterthwaiteInfo(res.model, theta, ref["sigma"])
    V_lme4 = np.array(ref["vcov_fixef"]["values"], dtype=float).reshape(res.structure.p, res.structure.p)
    np.testing.assert_allclose(info.vcov_beta, V_lme4, rtol=1e-6, atol=1e-10 * np.abs(V_lme4).max())
    want = _ref_table(ref["lmerTest_satterthwaite"]["coefficients"])
    dfs = [info.df_contrast(np.eye(res.structure.p)[j]) for j in range(res.structure.p)]
    np.testing.assert_allclose(dfs, want["df"], rtol=1e-6)


def test_dyestuff2_boundary_fit_has_residual_like_df(fitted_reference):
    """θ = 0 (singular): differenced two-sided like lmerTest, where the deviance is even in θ."""
    ref = _find("Dyestuff2", "Yield ~ 1 + (1|Batch)", True)
    _, res = _get(fitted_reference, ref)
    assert res.theta[0] == 0.0
    info = res.satterthwaite
    assert abs(info.hessian[0, 1]) < 1e-6 * abs(info.hessian[1, 1])
    assert np.allclose(info.jacobian[0], 0.0, atol=1e-12)
    assert res.coef_table()["df"].iloc[0] == pytest.approx(res.nobs - 1, rel=1e-6)


# ----------------------------------------------------------------------------- the building blocks

@pytest.mark.parametrize("ds,ref", SMALL[::3], ids=SMALL_IDS[::3])
def test_unprofiled_deviance_reduces_to_lme4_criterion(ds, ref, fitted_reference):
    """d(θ, σ) at σ² = r²(θ)/df is lme4's profiled criterion, at the optimum and elsewhere."""
    _, res = _get(fitted_reference, ref)
    info = res.satterthwaite
    assert info.deviance(info.varpar) == pytest.approx(res.criterion, abs=1e-8 * abs(res.criterion))
    s = res.structure
    dfr = s.n - s.p if res.REML else s.n
    for scale in (0.5, 1.7):
        th = np.where(s.lower == 0, res.theta * scale + 0.05, res.theta * scale)
        st = res.model.backend.state(th)
        sig = np.sqrt(st.pwrss / dfr)
        assert info.deviance(np.r_[th, sig]) == pytest.approx(res.model.objective(th), abs=1e-8 * abs(res.criterion))
        # and σ̂(θ) minimises it over σ
        assert info.deviance(np.r_[th, sig * 1.01]) > info.deviance(np.r_[th, sig])


def test_sigma_derivatives_agree_with_closed_form(fitted_reference):
    """∂²d/∂σ² = 6r²/σ⁴ − 2·df/σ² and ∂Var(β̂)/∂σ = 2 Var(β̂)/σ, against the numerical ones."""
    for reml in (True, False):
        ref = _find("sleepstudy", "Reaction ~ Days + (Days|Subject)", reml)
        _, res = _get(fitted_reference, ref)
        info = res.satterthwaite
        s, sig = res.structure, res.sigma
        dfr = s.n - s.p if reml else s.n
        r2 = res.model.backend.state(res.theta).pwrss
        assert info.hessian[-1, -1] == pytest.approx(6 * r2 / sig ** 4 - 2 * dfr / sig ** 2, rel=1e-7)
        np.testing.assert_allclose(info.jacobian[-1], 2 * res.vcov.to_numpy() / sig, rtol=1e-7)
        np.testing.assert_allclose(info.vcov_varpar, 2 * np.linalg.inv(info.hessian), rtol=1e-10, atol=1e-14)


def test_richardson_derivatives_of_known_functions():
    f = lambda x: np.exp(x[0]) * np.sin(x[1]) + x[0] ** 2 * x[2] ** 3
    x = np.array([0.3, 1.1, 0.0])
    H = hessian_richardson(f, x)
    e, s, c = np.exp(0.3), np.sin(1.1), np.cos(1.1)
    want = np.array([[e * s, e * c, 0.0], [e * c, -e * s, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(H, want, atol=1e-8)
    J = jacobian_richardson(lambda x: np.array([[x[0] * x[1], np.log(x[1])]]), np.array([2.0, 3.0]))
    np.testing.assert_allclose(J[0], [[3.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(J[1], [[2.0, 1 / 3.0]], atol=1e-9)


# ----------------------------------------------------------------------------- other ddf, invariants

def test_residual_and_normal_ddf(fitted_reference):
    ref = _find("sleepstudy", "Reaction ~ Days + (Days|Subject)", True)
    _, res = _get(fitted_reference, ref)
    sat = res.coef_table()
    r = res.coef_table(ddf="residual")
    z = res.coef_table(ddf="normal")
    pd.testing.assert_frame_equal(z, res.coef_table(ddf="z"))
    for tab in (r, z):
        assert list(tab.columns) == list(sat.columns)
        pd.testing.assert_series_equal(tab["t value"], sat["t value"])
        pd.testing.assert_series_equal(tab["Estimate"], res.fixef.rename("Estimate"))
        np.testing.assert_allclose(tab["Std. Error"], res.se)
    assert (r["df"] == res.nobs - res.structure.p).all()
    np.testing.assert_allclose(r["Pr(>|t|)"], 2 * stats.t.sf(np.abs(r["t value"]), res.nobs - 2))
    assert np.isinf(z["df"]).all()
    np.testing.assert_allclose(z["Pr(>|t|)"], 2 * stats.norm.sf(np.abs(z["t value"])))
    a_res, a_z = res.anova_table(ddf="residual"), res.anova_table(ddf="normal")
    assert a_res["DenDF"].iloc[0] == res.nobs - 2 and np.isinf(a_z["DenDF"].iloc[0])
    assert a_z["Pr(>F)"].iloc[0] == pytest.approx(z.loc["Days", "Pr(>|t|)"], rel=1e-10)
    with pytest.raises(ValueError, match="satterthwaite.*kenward-roger.*residual.*normal"):
        res.coef_table(ddf="kenward")
    with pytest.raises(ValueError, match="satterthwaite"):
        res.anova_table(ddf="bogus")


def test_one_df_F_test_is_the_squared_t_test(fitted_reference):
    ref = _find("sleepstudy", "Reaction ~ Days + (1|Subject) + (0+Days|Subject)", False)
    _, res = _get(fitted_reference, ref)
    ct, an = res.coef_table(), res.anova_table()
    assert an.loc["Days", "F value"] == pytest.approx(ct.loc["Days", "t value"] ** 2, rel=1e-12)
    assert an.loc["Days", "DenDF"] == pytest.approx(ct.loc["Days", "df"], rel=1e-12)
    assert an.loc["Days", "Pr(>F)"] == pytest.approx(ct.loc["Days", "Pr(>|t|)"], rel=1e-9)
    assert an.loc["Days", "Sum Sq"] == pytest.approx(an.loc["Days", "F value"] * res.sigma ** 2, rel=1e-12)
    row = res.contrast_test([0.0, 1.0]).iloc[0]
    assert row["F value"] == pytest.approx(an.loc["Days", "F value"], rel=1e-12)
    with pytest.raises(ValueError, match="columns"):
        res.contrast_test([1.0, 0.0, 0.0])


def test_cake_type3_hypotheses_are_marginal(fitted_reference):
    """Polynomial-coded temperature: recipe's hypothesis is its own columns (the polynomial
    contrasts sum to zero), temperature's averages its slopes over the three recipes."""
    ref = _find("cake", "angle ~ recipe * temperature + (1|recipe:replicate)", True)
    _, res = _get(fitted_reference, ref)
    hyp = res.anova_hypotheses()
    names = list(res.fixef.index)
    assert list(hyp) == ["recipe", "temperature", "recipe:temperature"]
    rec = hyp["recipe"]
    assert rec.shape == (2, 18)
    np.testing.assert_allclose(rec[:, [names.index("recipeB"), names.index("recipeC")]], np.eye(2), atol=1e-12)
    # other entries vanish up to the 7-digit rounding (R's zapsmall) of the map between codings
    assert np.abs(np.delete(rec, [1, 2], axis=1)).max() < 1e-6
    # temperature: the row space of {temperature.k + (recipeB:temperature.k + recipeC:temperature.k)/3}
    target = np.zeros((5, 18))
    for k, suf in enumerate([".L", ".Q", ".C", "^4", "^5"]):
        target[k, names.index("temperature" + suf)] = 1.0
        target[k, names.index("recipeB:temperature" + suf)] = target[k, names.index("recipeC:temperature" + suf)] = 1 / 3
    got = hyp["temperature"]
    assert got.shape == (5, 18) and np.linalg.matrix_rank(got) == 5
    coef, *_ = np.linalg.lstsq(target.T, got.T, rcond=None)
    assert np.abs(target.T @ coef - got.T).max() < 1e-6
    assert hyp["recipe:temperature"].shape == (10, 18)


def test_type3_invariant_to_coding_and_equal_to_unweighted_marginal_means():
    """Unbalanced cake (40 rows dropped): type III F tests are the same for polynomial and
    treatment coding, and the recipe test is the test of equal unweighted marginal means."""
    ref = _find("cake", "angle ~ recipe * temperature + (1|recipe:replicate)", True)
    df = load_reference_data(ref)
    drop = np.random.default_rng(0).choice(len(df), 40, replace=False)
    poly = df.drop(index=drop).reset_index(drop=True)
    treat = poly.assign(temperature=pd.Categorical(poly["temperature"].astype(str),
                                                   categories=list(df["temperature"].cat.categories)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_poly = fl.lmer(ref["formula"], poly)
        r_treat = fl.lmer(ref["formula"], treat)
    a_poly, a_treat = r_poly.anova_table(), r_treat.anova_table()
    assert list(a_poly.index) == list(a_treat.index) == ["recipe", "temperature", "recipe:temperature"]
    for col in ("F value", "DenDF", "Sum Sq"):
        np.testing.assert_allclose(a_poly[col], a_treat[col], rtol=1e-5)
    assert list(a_poly["NumDF"]) == [2, 5, 10]
    # unweighted marginal means of recipe: mean over temperatures of the cell means x_cellᵀβ
    spec = r_treat.structure.fixed_spec
    R, T = list(df["recipe"].cat.categories), list(df["temperature"].cat.categories)
    grid = pd.DataFrame({"recipe": pd.Categorical([r for r in R for _ in T], categories=R),
                         "temperature": pd.Categorical([t for _ in R for t in T], categories=T)})
    M = spec.get_model_matrix(grid).to_numpy(dtype=float).reshape(len(R), len(T), -1).mean(axis=1)
    L = M[1:] - M[0]
    row = r_treat.contrast_test(L).iloc[0]
    assert row["F value"] == pytest.approx(a_treat.loc["recipe", "F value"], rel=1e-6)
    assert row["DenDF"] == pytest.approx(a_treat.loc["recipe", "DenDF"], rel=1e-6)


def test_type3_with_covariate_interaction(fitted_reference):
    """Days * group: Days (contained in Days:group) is tested at the average slope; the group
    main effect (not contained: the interaction has a covariate) at Days = 0."""
    ref = _find("sleepstudy", "Reaction ~ Days + (Days|Subject)", True)
    df, _ = _get(fitted_reference, ref)
    df = df.assign(grp=pd.Categorical(np.where(df["Subject"].astype(str).str[-1].astype(int) % 2 == 0, "even", "odd")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fl.lmer("Reaction ~ Days * grp + (Days|Subject)", df)
    hyp = res.anova_hypotheses()
    assert list(res.fixef.index) == ["(Intercept)", "Days", "grpodd", "Days:grpodd"]
    np.testing.assert_allclose(hyp["Days"], [[0, 1, 0, 0.5]], atol=1e-12)
    np.testing.assert_allclose(hyp["grp"], [[0, 0, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(hyp["Days:grp"], [[0, 0, 0, 1]], atol=1e-12)
    tab = res.anova_table()
    assert (tab["NumDF"] == 1).all() and (tab["DenDF"] > 0).all() and tab["Pr(>F)"].between(0, 1).all()


# ----------------------------------------------------------------------------- Wald intervals

def test_wald_confint_like_lme4(fitted_reference):
    ref = _find("sleepstudy", "Reaction ~ Days + (Days|Subject)", True)
    _, res = _get(fitted_reference, ref)
    ci = res.confint()
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    assert list(ci.index) == [".sig01", ".sig02", ".sig03", ".sigma", "(Intercept)", "Days"]
    assert ci.iloc[:4].isna().all().all()
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(ci.loc[["(Intercept)", "Days"], "2.5 %"], res.fixef - z * res.se, rtol=1e-12)
    np.testing.assert_allclose(ci.loc[["(Intercept)", "Days"], "97.5 %"], res.fixef + z * res.se, rtol=1e-12)
    # lme4's Wald interval from the reference β̂ and SE
    want = np.array(list(ref["fixef"].values())) + z * np.array(list(ref["fixef_se"].values()))
    np.testing.assert_allclose(ci["97.5 %"].iloc[4:], want, rtol=1e-4)
    ci90 = res.confint(method="Wald", level=0.9)
    assert list(ci90.columns) == ["5 %", "95 %"]
    assert list(res.confint(level=0.99).columns) == ["0.5 %", "99.5 %"]
    assert ci90.loc["Days", "95 %"] == pytest.approx(res.fixef["Days"] + stats.norm.ppf(0.95) * res.se["Days"])
    assert list(res.confint(parm=["Days"]).index) == ["Days"]
    with pytest.raises(ValueError):
        res.confint(method="nonsense")
    with pytest.raises(ValueError):
        res.confint(level=1.5)


# ----------------------------------------------------------------------------- likelihood-ratio tests

def test_lrt_sleepstudy_matches_lme4_loglik(fitted_reference):
    full_f, diag_f = "Reaction ~ Days + (Days|Subject)", "Reaction ~ Days + (1|Subject) + (0+Days|Subject)"
    _, full = _get(fitted_reference, _find("sleepstudy", full_f, True))
    _, diag = _get(fitted_reference, _find("sleepstudy", diag_f, True))
    tab = anova(full, diag, names=["full", "diag"])        # REML fits: refitted by ML
    assert list(tab.columns) == ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]
    assert list(tab.index) == ["diag", "full"]             # sorted by number of parameters
    assert list(tab["npar"]) == [5, 6]
    ml_full, ml_diag = _find("sleepstudy", full_f, False), _find("sleepstudy", diag_f, False)
    np.testing.assert_allclose(tab["logLik"], [ml_diag["logLik"], ml_full["logLik"]], atol=1e-6)
    np.testing.assert_allclose(tab["AIC"], [ml_diag["AIC"], ml_full["AIC"]], atol=2e-6)
    np.testing.assert_allclose(tab["BIC"], [ml_diag["BIC"], ml_full["BIC"]], atol=2e-6)
    np.testing.assert_allclose(tab["deviance"], [ml_diag["criterion"], ml_full["criterion"]], atol=2e-6)
    chisq = 2 * (ml_full["logLik"] - ml_diag["logLik"])       # lme4's arithmetic on its own numbers
    assert np.isnan(tab["Chisq"].iloc[0]) and np.isnan(tab["Df"].iloc[0]) and np.isnan(tab["Pr(>Chisq)"].iloc[0])
    assert tab["Chisq"].iloc[1] == pytest.approx(chisq, abs=2e-5)
    assert tab["Df"].iloc[1] == 1
    assert tab["Pr(>Chisq)"].iloc[1] == pytest.approx(stats.chi2.sf(chisq, 1), abs=1e-4)
    # ML fits are used as they are; the order of the arguments does not matter
    _, ml1 = _get(fitted_reference, ml_full)
    tab2 = anova(ml1, diag)
    assert list(tab2.index) == ["model2", "model1"]
    np.testing.assert_allclose(tab2["Chisq"].iloc[1], tab["Chisq"].iloc[1], atol=1e-6)


def test_lrt_requires_same_observations(fitted_reference):
    df, full = _get(fitted_reference, _find("sleepstudy", "Reaction ~ Days + (Days|Subject)", False))
    sub = fl.lmer("Reaction ~ Days + (1|Subject)", df.iloc[:150], REML=False)
    with pytest.raises(ValueError, match="same number of observations"):
        anova(full, sub)
    other = fl.lmer("Reaction ~ Days + (1|Subject)", df.assign(Reaction=df["Reaction"] * 2), REML=False)
    with pytest.raises(ValueError, match="same response"):
        anova(full, other)
    with pytest.raises(ValueError):
        anova()
    pd.testing.assert_frame_equal(anova(full), full.anova_table())
