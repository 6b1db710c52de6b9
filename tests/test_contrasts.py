"""R's contrasts (``contrasts=``) against lme4 on lmerTest's ham (tests/reference_dialect):
contr.sum, contr.SAS, contr.helmert, contr.poly, contr.treatment with a base, matrices with and
without column names, a model without intercept; R's coefficient names; predictions; the
same contrasts through every entry point; and the checks of the argument."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from test_dialect import FITS, check_against_lme4, contrasts_of, data, fitted

HAM = [n for n in FITS if n.startswith("ham_")]
FORMULA = "Informed.liking ~ Product*Information + (1|Consumer)"


@pytest.mark.parametrize("name", HAM)
def test_contrasts_match_lme4(name):
    """Estimates, SEs, criterion and R's names (Product1, Product1:Information1, ProductA,
    Product.L, Income<level> for SAS, full indicator coding without intercept)."""
    check_against_lme4(fitted(name)[1], FITS[name])


@pytest.mark.parametrize("name", HAM)
def test_predict_with_every_contrast_kind_matches_R(name):
    """predict(newdata) codes the new rows with the fit's contrasts (at lme4's θ: 1e-6 relative)."""
    fit = FITS[name]
    m, _ = fitted(name)
    nd = pd.DataFrame(fit["newdata"])
    got = m.result_at(fit["theta"]).predict(nd, re_form="~0").to_numpy()
    np.testing.assert_allclose(got, fit["predict_population"], rtol=1e-6)


def _logdet_gram(X):
    return np.linalg.slogdet(X.T @ X)[1]


def _same_model(a, b):
    """Two codings of one model: the same θ̂ and fitted values; the REML criterion differs by
    the constant log|XₐᵀXₐ| − log|X_bᵀX_b| (log|R_X|² moves with the coding, nothing else)."""
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.fitted(), b.fitted(), rtol=1e-7)
    shift = _logdet_gram(a.structure.X) - _logdet_gram(b.structure.X)
    assert a.criterion - b.criterion == pytest.approx(shift, abs=1e-6)


def test_coding_is_recorded_and_fits_agree():
    """The structure records each factor's contrasts; a change of coding is a reparameterisation:
    the same model (see _same_model), and β_sum = T β_treatment with X_treatment = X_sum T."""
    treat, sm = fitted("ham_treatment")[1], fitted("ham_sum")[1]
    rec = sm.structure.contrasts
    assert rec["Product"].kind == "contr.sum" and rec["Information"].kind == "contr.sum"
    assert fitted("ham_poly")[1].structure.contrasts["Product"].kind == "contr.poly"
    assert treat.structure.contrasts == {}
    _same_model(sm, treat)
    Xs, Xt = sm.structure.X, treat.structure.X
    T = np.linalg.lstsq(Xs, Xt, rcond=None)[0]          # Xt = Xs T, so Xs β_s = Xt β_t gives β_s = T β_t
    np.testing.assert_allclose(Xs @ T, Xt, atol=1e-10)
    np.testing.assert_allclose(sm.fixef.to_numpy(), T @ treat.fixef.to_numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ham_sum", "ham_sas_helmert", "ham_matrix", "ham_poly", "ham_treatment_base"])
def test_anova_table_runs_and_does_not_depend_on_the_coding(name):
    base = "ham_treatment" if "*" in FITS[name]["formula"] else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = fitted(name)[1].anova_table()
        ref = fitted(base)[1].anova_table() if base else \
            fl.lmer(FITS[name]["formula"], data(FITS[name])).anova_table()
    assert list(tab.index) == list(ref.index)
    np.testing.assert_allclose(tab["F value"], ref["F value"], rtol=1e-5)
    np.testing.assert_allclose(tab["DenDF"], ref["DenDF"], rtol=1e-5)


def test_ordered_factor_keeps_contr_poly_unless_told():
    ox = data(FITS["oxboys_ordered"])
    default = fitted("oxboys_ordered")[1]
    assert default.structure.contrasts["Occasion"].kind == "contr.poly"
    tr = fl.lmer("height ~ Occasion + (1|Subject)", ox, contrasts={"Occasion": "contr.treatment"})
    assert list(tr.fixef.index)[:3] == ["(Intercept)", "Occasion2", "Occasion3"]
    _same_model(tr, default)


def test_every_entry_point_takes_contrasts():
    """lmer_chunked, from_chunks, a Dask DataFrame and fit_many fit the same coding as lmer."""
    import dask.dataframe as dd
    fit = FITS["ham_sum"]
    ham, con = data(fit), contrasts_of(fit)
    ref = fitted("ham_sum")[1]
    chunks = [ham.iloc[i:i + 200] for i in range(0, len(ham), 200)]
    for res in (fl.lmer_chunked(FORMULA, chunks, contrasts=con),
                fl.LinearMixedModel.from_chunks(FORMULA, chunks, contrasts=con).fit(),
                fl.lmer(FORMULA, dd.from_pandas(ham, npartitions=3), contrasts=con)):
        assert list(res.fixef.index) == list(ref.fixef.index)
        assert res.criterion == pytest.approx(ref.criterion, abs=1e-6)
        np.testing.assert_allclose(res.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(res.predict(ham.head(8)), ref.predict(ham.head(8)), rtol=1e-6)
    tab = fl.fit_many("~ Product*Information + (1|Consumer)", ham, ["Informed.liking"], contrasts=con)
    assert tab.loc[0, "criterion"] == pytest.approx(ref.criterion, abs=1e-6)
    assert tab.loc[0, "fixef:Product1:Information1"] == pytest.approx(ref.fixef["Product1:Information1"], rel=1e-6)


def test_matrix_forms_and_treatment_base():
    """A matrix as ndarray, nested lists or DataFrame (its column names); contr.treatment's base
    by its level label."""
    ham = data(FITS["ham_matrix"])
    M = np.array(FITS["ham_matrix"]["contrasts"]["Product"]["matrix"])
    f = "Informed.liking ~ Product + Information + (1|Consumer)"
    a = fl.lmer(f, ham, contrasts={"Product": M})
    b = fl.lmer(f, ham, contrasts={"Product": M.tolist()})
    c = fl.lmer(f, ham, contrasts={"Product": pd.DataFrame(M, columns=["u", "v", "w"])})
    assert list(a.fixef.index) == list(b.fixef.index) == ["(Intercept)", "Product1", "Product2", "Product3",
                                                          "Information2"]
    assert list(c.fixef.index)[1:4] == ["Productu", "Productv", "Productw"]
    np.testing.assert_allclose(c.fixef.to_numpy(), a.fixef.to_numpy(), rtol=1e-12)
    base = fl.lmer(f, ham, contrasts={"Product": fl.contr.treatment(base=4)})
    assert list(base.fixef.index)[1:4] == ["Product1", "Product2", "Product3"]
    sas = fl.lmer(f, ham, contrasts={"Product": fl.contr.SAS})
    np.testing.assert_allclose(sas.fixef.to_numpy(), base.fixef.to_numpy(), rtol=1e-10)


@pytest.mark.parametrize("contrasts, match", [
    ({"Prodct": "contr.sum"}, "'Prodct', which is not a column"),
    ({"Product": "contr.summ"}, "column 'Product': unknown contrasts 'contr.summ'"),
    ({"Product": np.ones((3, 2))}, "column 'Product'.*3 rows but the factor has 4 levels"),
    ({"Product": np.ones(4)}, "matrix for column 'Product' must be a finite 2-D matrix"),
    ({"Product": [[1, 0], [0, np.nan], [0, 0], [1, 1]]}, "finite"),
    ({"Product": fl.contr.treatment(base="7")}, "column 'Product'.*base '7' is not a level"),
    ({"Age": "contr.sum"}, "only to factors, but column 'Age' is numeric"),
    ({"Product": object()}, "column 'Product' must be a contrast name"),
    (["Product"], "must be a dict"),
])
def test_bad_contrasts_are_named_errors(contrasts, match):
    ham = data(FITS["ham_treatment"])
    with pytest.raises(fl.ContrastsError, match=match):
        fl.lmer("Informed.liking ~ Product + Information + Age + (1|Consumer)", ham, contrasts=contrasts)
    with pytest.raises(ValueError):     # a ContrastsError is a ValueError too
        fl.lmer("Informed.liking ~ Product + Information + Age + (1|Consumer)", ham, contrasts=contrasts)


def test_contrast_of_a_variable_not_in_the_fixed_part_is_ignored_with_a_warning():
    """As R: "variable 'Gender' is absent, its contrast will be ignored"."""
    ham = data(FITS["ham_treatment"])
    with pytest.warns(fl.FastLMMWarning, match="'Gender' is absent"):
        res = fl.lmer("Informed.liking ~ Product + (1|Consumer)", ham, contrasts={"Gender": "contr.sum"})
    assert list(res.fixef.index) == ["(Intercept)", "Product2", "Product3", "Product4"]
