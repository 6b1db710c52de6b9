"""Influence diagnostics (fastlmm_ext._influence): hat values, Cook's distances, studentized
residuals and case/group deletion, against tests/reference_r/influence.json (lme4 1.1.31, with
tight refits of every deletion), a dense hat matrix and fresh fits without the deleted rows."""
from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets
from fastlmm_ext._influence import deleted_model

from conftest import load_reference_data, quiet_lmer

REF_R = pathlib.Path(__file__).resolve().parent / "reference_r"
INFLUENCE = {c["id"]: c for c in json.loads((REF_R / "influence.json").read_text())["cases"]}
MODELS = {m["id"]: m for m in json.loads((REF_R / "models.json").read_text())}


def _model(case_id: str, backend: str = "compiled") -> tuple[fl.LinearMixedModel, dict, pd.DataFrame]:
    case = INFLUENCE[case_id]
    fit = MODELS[case["fit"]]
    df = load_reference_data(fit, REF_R)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fl.LinearMixedModel(case["formula"], df, REML=case["REML"], backend=backend, weights=case["weights"],
                                contrasts=fit["contrasts_arg"])
    return m, fit, df


def _matrix(rec: dict) -> pd.DataFrame:
    return pd.DataFrame(np.array(rec["values"], dtype=float), index=rec["rownames"], columns=rec["colnames"])


@pytest.mark.parametrize("case_id", list(INFLUENCE))
def test_hat_cooks_rstudent_against_lme4(case_id, backend):
    """At lme4's θ̂ (weighted oats included) the values differ from R's by rounding only."""
    m, fit, _ = _model(case_id, backend)
    res = m.result_at(np.array(list(fit["theta"].values()), dtype=float))
    case = INFLUENCE[case_id]
    np.testing.assert_allclose(res.hatvalues(), case["hatvalues"], rtol=1e-9)
    np.testing.assert_allclose(res.cooks_distance(), case["cooks_distance"], rtol=1e-8)
    np.testing.assert_allclose(res.rstudent(), case["rstudent"], rtol=1e-8)
    np.testing.assert_allclose(res.residuals(type="pearson"), case["residuals_pearson"], rtol=1e-8, atol=1e-10)
    assert res.structure.p == case["rank_X"]


def test_hat_matrix_dense(backend):
    """hᵢ is the diagonal of H with ŷ = H y (dense H of the (β, u) fit), Σ hᵢ = trace H; zero
    weights give h = 0."""
    df = datasets.simulate_crossed(200, 10, 5, seed=4, slope_sd=0.3)
    w = np.random.default_rng(2).uniform(0.5, 2.0, len(df))
    w[[3, 50]] = 0.0
    res = quiet_lmer("y ~ x + (x|a) + (1|b)", df, weights=w, backend=backend)
    s = res.structure
    ZL = (s.Z @ s.Lambda(res.theta)).toarray()
    G = np.hstack([s.X, ZL])
    A = G.T @ (G * w[:, None])
    A[s.p:, s.p:] += np.eye(s.q)
    H = G @ np.linalg.solve(A, G.T * w)
    np.testing.assert_allclose(H @ s.y, res.fitted(), rtol=1e-9)
    np.testing.assert_allclose(res.hatvalues(), np.diag(H), rtol=1e-9, atol=1e-14)
    assert res.hatvalues().sum() == pytest.approx(np.trace(H), rel=1e-10)       # effective df
    assert res.hatvalues()[[3, 50]].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("case_id", ["ergoStool_REML", "Machines_nested_REML", "Orthodont_slope_REML"])
@pytest.mark.parametrize("by", ["cases", "groups"])
def test_deletion_against_lme4s_tight_refits(case_id, by):
    m, fit, _ = _model(case_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = m.fit()
    case = INFLUENCE[case_id]
    ref, tight = case[f"influence_{by}"], case[f"influence_{by}_tight"]
    inf = res.influence(groups=None if by == "cases" else ref["groups"])
    assert inf.groups == ref["groups"]
    if by == "groups":
        assert list(inf.deleted) == ref["deleted"]                      # order of first appearance
    else:
        assert len(inf.deleted) == len(ref["deleted"])
    assert list(inf.fixed_effects_deleted.columns) == ref["fixed_effects_deleted"]["colnames"]
    assert list(inf.var_cov_comps.index) == list(ref["var_cov_comps"])
    fx = np.array(tight["fixed_effects_deleted"]["values"], dtype=float)
    np.testing.assert_allclose(inf.fixed_effects_deleted, fx, rtol=1e-6, atol=1e-6 * np.abs(fx).max())
    np.testing.assert_allclose(inf.var_cov_comps_deleted, np.array(tight["var_cov_comps_deleted"]["values"]),
                               rtol=1e-4)
    np.testing.assert_allclose(inf.theta_deleted, np.array(tight["theta_deleted"]["values"]), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(inf.sigma_deleted, tight["sigma_deleted"], rtol=1e-5)
    np.testing.assert_allclose(inf.criterion_deleted, tight["criterion_deleted"], rtol=1e-8)
    assert inf.converged.all()
    # Cook's distance: lme4's formula on the tight refits' dfbeta (from this fit: lme4's own full
    # fit of Orthodont stopped early enough to move dfbeta by 1e-4)
    d = fx - inf.fixed_effects.to_numpy()
    V = inf.vcov.to_numpy()
    np.testing.assert_allclose(V, np.array(ref["vcov"]["values"]), rtol=1e-3, atol=1e-9)
    mm, p = d.shape
    cook = np.einsum("ij,ji->i", d, np.linalg.solve(V, d.T)) * (mm - p) / (mm * p)
    np.testing.assert_allclose(inf.cooks_distance(), cook, rtol=1e-4, atol=1e-6 * cook.max())
    # lme4's own (early-stopped) refits: dfbeta and dfbetas to their accuracy
    np.testing.assert_allclose(inf.dfbeta(), _matrix(ref["dfbeta"]), atol=1e-4 * np.abs(fx).max())
    np.testing.assert_allclose(inf.dfbetas(), _matrix(ref["dfbetas"]), atol=1e-3)
    vd = next(iter(inf.vcov_deleted.values()))
    np.testing.assert_allclose(vd, _matrix(next(iter(ref["vcov_deleted"].values()))), rtol=1e-3)
    np.testing.assert_allclose(inf.dfbeta("var_cov"), inf.var_cov_comps_deleted - inf.var_cov_comps.to_numpy())


@pytest.mark.parametrize("formula,groups", [("Reaction ~ Days + (Days|Subject)", None),
                                            ("Reaction ~ Days + (Days|Subject)", "Subject")])
def test_deleted_model_is_a_fresh_model_without_the_rows(backend, formula, groups):
    """The deleted design (other rows, every level, zero weights in the cross-products on the
    same pattern) has the criterion, estimates and covariances of a model built from the other
    rows alone, at any θ; deleting a whole level equals a model without that level."""
    df = datasets.load("sleepstudy")
    w = np.linspace(0.5, 2.0, len(df))
    m = fl.LinearMixedModel(formula, df, weights=w, backend=backend)
    rows = np.array([7]) if groups is None else np.flatnonzero(df["Subject"].astype(str) == "331")
    keep = np.setdiff1d(np.arange(len(df)), rows)
    sub = df.iloc[keep].copy()
    sub["Subject"] = sub["Subject"].astype(str)             # a fresh fit drops the unused level
    fresh = fl.LinearMixedModel(formula, sub, weights=w[keep], backend=backend)
    dm = deleted_model(m, rows)
    assert dm.structure.n == len(keep) and dm.structure.q == m.structure.q
    for th in (np.array([0.9, 0.02, 0.23]), np.array([1.4, -0.3, 0.1])):
        assert dm.objective(th) == pytest.approx(fresh.objective(th), rel=1e-11)
        a, b = dm.result_at(th), fresh.result_at(th)
        np.testing.assert_allclose(a.fixef, b.fixef, rtol=1e-10)
        np.testing.assert_allclose(a.vcov, b.vcov, rtol=1e-9)
        assert a.sigma == pytest.approx(b.sigma, rel=1e-11)
    for reml in (True, False):
        mm = dm if reml else dm.ml_twin()
        assert mm.objective(np.array([0.8, 0.1, 0.3])) == pytest.approx(
            (fresh if reml else fresh.ml_twin()).objective(np.array([0.8, 0.1, 0.3])), rel=1e-11)
    # the original model is untouched by the deleted one sharing its kernel
    th = np.array([0.9, 0.02, 0.23])
    assert m.objective(th) == pytest.approx(fl.LinearMixedModel(formula, df, weights=w, backend=backend).objective(th),
                                            rel=1e-13)


def test_refit_equals_lmer_without_the_rows(sleep):
    df, res = sleep
    inf = res.influence()
    for i in (0, 97):
        fresh = quiet_lmer("Reaction ~ Days + (Days|Subject)", df.drop(index=df.index[i]))
        np.testing.assert_allclose(inf.fixed_effects_deleted.iloc[i], fresh.fixef, rtol=1e-7)
        np.testing.assert_allclose(inf.var_cov_comps_deleted.iloc[i].to_numpy(),
                                   np.r_[fresh.sigma ** 2, fresh.varcorr["vcov"].to_numpy()[[0, 2, 1]]], rtol=1e-5)
        np.testing.assert_allclose(inf.vcov_deleted[inf.deleted[i]], fresh.vcov, rtol=1e-5)
    np.testing.assert_allclose(inf.hat, res.hatvalues(), rtol=1e-13)
    assert list(inf.deleted) == list(df.index)


def test_influence_leaves_the_fit_as_it_was(sleep):
    """The refits share the fit's kernel: afterwards its factor, selected inverse and gradient
    are its own again."""
    df, _ = sleep
    res = quiet_lmer("Reaction ~ Days + (Days|Subject)", df)
    twin = quiet_lmer("Reaction ~ Days + (Days|Subject)", df)
    before = (res.hatvalues(), res.model.backend.inverse_blocks(res.theta, 0))
    res.influence("Subject")
    np.testing.assert_allclose(res.hatvalues(), before[0], rtol=1e-14)
    np.testing.assert_allclose(res.model.backend.inverse_blocks(res.theta, 0), before[1], rtol=1e-14)
    np.testing.assert_allclose(res.condvar["Subject"], twin.condvar["Subject"], rtol=1e-13)
    np.testing.assert_allclose(res.model.backend.gradient(res.theta, True),
                               twin.model.backend.gradient(twin.theta, True), rtol=1e-8, atol=1e-10)


def test_parallel_equals_serial():
    df = datasets.load("Pastes")
    res = quiet_lmer("strength ~ 1 + (1|batch/cask)", df)
    one = res.influence("batch")
    two = res.influence("batch", n_jobs=2)
    assert two.n_jobs == 2 and two.parallel in ("processes", "threads")
    pd.testing.assert_frame_equal(one.fixed_effects_deleted, two.fixed_effects_deleted)
    pd.testing.assert_frame_equal(one.var_cov_comps_deleted, two.var_cov_comps_deleted)
    assert list(one.var_cov_comps.index) == ["sigma^2", "cask:batch:v[(Intercept)]", "batch:v[(Intercept)]"]


def test_groups_as_labels_and_a_failed_refit(sleep):
    """Labels per row group the deletions; a deletion that leaves X rank deficient is a NaN row
    with its reason, as a failed refit (lme4 would drop the column)."""
    df, _ = sleep
    d = df.assign(first=(np.arange(len(df)) == 0).astype(float))
    res = quiet_lmer("Reaction ~ Days + first + (1|Subject)", d)
    halves = np.where(d["Days"] < 5, "early", "late")
    inf = res.influence(groups=halves)
    assert list(inf.deleted) == ["early", "late"] and inf.groups == "groups"
    assert inf.fixed_effects_deleted.loc["early"].isna().all()
    assert "rank deficient" in inf.messages["early"] and not inf.converged["early"]
    fresh = quiet_lmer("Reaction ~ Days + first + (1|Subject)", d[halves == "early"])
    assert inf.fixed_effects_deleted.loc["late", "Days"] == pytest.approx(fresh.fixef["Days"], rel=1e-6)


def test_errors(sleep):
    df, res = sleep
    with pytest.raises(fl.ArgumentError, match="'Days'.*'Subject'"):
        res.influence(groups="Days")
    with pytest.raises(fl.DataError, match="3 labels"):
        res.influence(groups=["a", "b", "c"])
    with pytest.raises(fl.ArgumentError, match="n_jobs"):
        res.influence(n_jobs=0)
    with pytest.raises(fl.ArgumentError, match="which"):
        res.influence("Subject").dfbeta("random")
    chunked = fl.lmer_chunked("Reaction ~ Days + (Days|Subject)", [df.iloc[:90], df.iloc[90:]])
    for method in (chunked.hatvalues, chunked.cooks_distance, chunked.rstudent, chunked.influence):
        with pytest.raises(fl.DataError, match="rows"):
            method()
