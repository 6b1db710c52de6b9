"""R's formula dialect against lme4 (tests/reference_dialect/make_dialect.R, R 4.2, lme4 1.1.31):
^ inside I(), R's functions (log, poly, ns, bs, scale, factor, as.numeric, ...), R's names of
the model-matrix columns, columns named like transforms, dotted and backtick-quoted names,
stateful transforms on new data; and the Python spellings that keep working."""
from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from conftest import load_reference_data
from fastlmm_ext._design import build_structure
from fastlmm_ext._rformula import r_column_names

DIR = pathlib.Path(__file__).parent / "reference_dialect"
REF = json.loads((DIR / "dialect.json").read_text())
FITS = {f["name"]: f for f in REF["fits"]}
_data: dict = {}


def data(fit: dict) -> pd.DataFrame:
    if fit["data_file"] not in _data:
        _data[fit["data_file"]] = load_reference_data(fit, DIR)
    return _data[fit["data_file"]].copy()


def contrasts_of(fit: dict):
    """The fit's ``contrasts`` as fastlmm_ext takes them (names, fl.contr calls, matrices)."""
    spec = fit.get("contrasts")
    if spec is None:
        return None
    out = {}
    for col, v in spec.items():
        if isinstance(v, str):
            out[col] = v
        elif "treatment_base" in v:
            out[col] = fl.contr.treatment(base=v["treatment_base"])
        elif "colnames" in v:
            out[col] = pd.DataFrame(v["matrix"], columns=v["colnames"])
        else:
            out[col] = np.array(v["matrix"])
    return out


def model(fit: dict) -> fl.LinearMixedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fl.RankDeficiencyWarning)
        return fl.LinearMixedModel(fit["formula"], data(fit), REML=fit["REML"], contrasts=contrasts_of(fit))


_fitted: dict = {}


def fitted(name: str):
    if name not in _fitted:
        m = model(FITS[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _fitted[name] = (m, m.fit())
    return _fitted[name]


def check_against_lme4(res, fit: dict) -> None:
    """Names exactly; criterion 1e-6 absolute; fixef 1e-4 and SEs 1e-3 relative (scale-free:
    relative to the largest coefficient / SE); σ 1e-4 relative."""
    assert list(res.fixef.index) == fit["X_colnames"]
    assert res.nobs == fit["nobs"]
    assert res.criterion == pytest.approx(fit["criterion"], abs=1e-6)
    assert res.loglik == pytest.approx(fit["logLik"], abs=1e-6)
    assert res.sigma == pytest.approx(fit["sigma"], rel=1e-4)
    fx = np.array(list(fit["fixef"].values()))
    se = np.array(list(fit["fixef_se"].values()))
    np.testing.assert_allclose(res.fixef.to_numpy(), fx, rtol=1e-4, atol=1e-4 * np.abs(fx).max())
    np.testing.assert_allclose(res.se.to_numpy(), se, rtol=1e-3, atol=1e-3 * se.max())


DIALECT = [n for n in FITS if not n.startswith("ham_") or n == "ham_treatment"]


@pytest.mark.parametrize("name", DIALECT)
def test_fit_matches_lme4(name):
    check_against_lme4(fitted(name)[1], FITS[name])


@pytest.mark.parametrize("name", [n for n in FITS if "X_rows" in FITS[n]])
def test_model_matrix_rows_match_R(name):
    """poly, ns, bs, scale: R's basis values (QR of the centred Vandermonde matrix, knots at R's
    quantiles, the natural-spline null space, centre and SD) to 1e-8 relative."""
    fit = FITS[name]
    m, _ = fitted(name)
    rows = fit["X_rows"]["rows"]
    want = np.array(fit["X_rows"]["values"])
    np.testing.assert_allclose(m.structure.X[rows], want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


@pytest.mark.parametrize("name", [n for n in DIALECT if "newdata" in FITS[n]])
def test_predictions_on_new_rows_match_R(name):
    """predict(newdata) keeps the training state of poly/ns/bs/scale (R's makepredictcall: the
    same centring, polynomial coefficients and knots; bs/ns extrapolate beyond the boundary
    knots as R does).  Compared at lme4's θ, so only the transforms can differ: 1e-6 relative."""
    fit = FITS[name]
    m, _ = fitted(name)
    at_r = m.result_at(fit["theta"])
    nd = pd.DataFrame(fit["newdata"])
    want = np.array(fit["predict_population"])
    np.testing.assert_allclose(at_r.predict(nd, re_form="~0").to_numpy(), want, rtol=1e-6)
    if "predict_full" in fit:
        np.testing.assert_allclose(at_r.predict(nd).to_numpy(), fit["predict_full"], rtol=1e-6)


@pytest.mark.parametrize("rec", REF["names"], ids=lambda r: r["formula"][:40])
def test_column_names_as_R_names_them(rec):
    """model.matrix's column names: R's deparse (spacing, 1e+06, "lo" in double quotes),
    logicals as `I(x > 0)TRUE`, interactions in R's variable order, backticks for
    non-syntactic names, full dummy coding where R uses it."""
    df = data(FITS["mu_dotted"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fl.RankDeficiencyWarning)
        s = build_structure(rec["formula"].replace("~", "~ (1|g.id) +", 1), df)
    assert r_column_names(s.fixed_spec) == rec["colnames"]


# ----------------------------------------------------------------------------- the dialect

def _co2():
    return data(FITS["co2_log"])


def test_power_inside_calls_and_python_spellings():
    """^ is a power inside I() and inside function arguments; ** and np.log are the same terms
    (named as R would name them)."""
    ox = data(FITS["oxboys_quadratic"])
    r = fitted("oxboys_quadratic")[1]
    py = fl.lmer("height ~ age + I(age**2) + (age|Subject)", ox)
    assert list(py.fixef.index) == ["(Intercept)", "age", "I(age^2)"]
    assert py.criterion == pytest.approx(r.criterion, abs=1e-8)
    co2 = _co2()
    a = fl.lmer("uptake ~ Treatment*log(conc) + (1|Plant)", co2)
    b = fl.lmer("uptake ~ Treatment*np.log(conc) + (1|Plant)", co2)
    c = fl.lmer("uptake ~ Treatment*log(conc^1) + (1|Plant)", co2)
    assert list(b.fixef.index) == ["(Intercept)", "Treatmentchilled", "np.log(conc)", "Treatmentchilled:np.log(conc)"]
    assert a.criterion == pytest.approx(b.criterion, abs=1e-8) == pytest.approx(c.criterion, abs=1e-8)


def test_precedence_is_R_s():
    """I(x > 1 & x < 3) is (x > 1) & (x < 3) and -x^2 is -(x^2), as in R (not Python's precedence)."""
    co2 = _co2()
    s = build_structure("uptake ~ I(conc > 200 & conc < 600) + I(-conc^2) + (1|Plant)", co2)
    conc = co2["conc"].to_numpy()
    want = np.column_stack([np.ones(len(conc)), (conc > 200) & (conc < 600), -(conc ** 2)])
    np.testing.assert_array_equal(s.X, want)


def test_python_spelling_C_keeps_working():
    """C(k) of a numeric column is factor(k): the same fit."""
    mu = data(FITS["mu_factor_offset"])
    r = fitted("mu_factor_offset")[1]
    c = fl.lmer("y.v ~ C(k) + as.numeric(f) + offset(w) + (1|g.id)", mu)
    assert c.criterion == pytest.approx(r.criterion, abs=1e-8)
    np.testing.assert_allclose(c.fixef.to_numpy(), r.fixef.to_numpy(), rtol=1e-8)


def test_dotted_and_backtick_names_everywhere():
    """R's dotted names unquoted and backtick-quoted names in the response, the fixed part, a
    random-effects expression and the grouping factor."""
    mu = data(FITS["mu_dotted"])
    r = fitted("mu_dotted")[1]
    q = mu.rename(columns={"y.v": "my y", "x.1": "my x", "g.id": "my g"})
    b = fl.lmer("`my y` ~ `my x` + (1|`my g`)", q)
    assert b.criterion == pytest.approx(r.criterion, abs=1e-8)
    assert list(b.fixef.index) == ["(Intercept)", "`my x`"] and b.ngrps == {"my g": 24}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fl.SingularFitWarning)
        s1 = fl.lmer("y.v ~ x.1 + (x.1|g.id)", mu)
        s2 = fl.lmer("`my y` ~ `my x` + (`my x`|`my g`)", q)
    assert s1.criterion == pytest.approx(s2.criterion, abs=1e-8)
    assert list(s1.ranef["g.id"].columns) == ["(Intercept)", "x.1"]


def test_columns_named_like_transforms_are_variables():
    """A column is a variable wherever it is not called: `log(log)` is the log of the column
    log, `C + I` are two columns (also in a random-effects term)."""
    mu = data(FITS["mu_shadowed"])
    s = build_structure("y.v ~ log(log) + C + I + Q + Sum + np + (0 + scale + poly|g.id)", mu)
    np.testing.assert_allclose(s.X[:, 1], np.log(mu["log"].to_numpy()), rtol=1e-15)
    np.testing.assert_array_equal(s.X[:, 2:], mu[["C", "I", "Q", "Sum", "np"]].to_numpy())
    assert s.terms[0].cnms == ("scale", "poly")
    np.testing.assert_array_equal(s.terms[0].Xi, mu[["scale", "poly"]].to_numpy())


def test_stateful_transform_state_in_random_effects_terms():
    """scale(conc) in a random-effects term keeps the fit's centre and scale on new data."""
    fit = FITS["co2_scale"]
    m, res = fitted("co2_scale")
    nd = pd.DataFrame(fit["newdata"])
    one = res.predict(nd.iloc[[2]]).iloc[0]
    assert res.predict(nd).iloc[2] == pytest.approx(one, rel=1e-12)    # one row: the same centring


def test_chunked_refuses_stateful_transforms_by_name():
    co2 = _co2()
    chunks = [co2.iloc[:40], co2.iloc[40:]]
    for term, fname in [("poly(conc, 2)", "poly"), ("ns(conc, 3)", "ns"), ("bs(conc, df = 4)", "bs"),
                        ("scale(conc)", "scale"), ("I(center(conc))", "center")]:
        with pytest.raises(fl.FormulaError, match=rf"{fname}\(\) learns its state"):
            fl.lmer_chunked(f"uptake ~ {term} + (1|Plant)", chunks)
    ok = fl.lmer_chunked("uptake ~ Treatment*log(conc) + (1|Plant)", chunks)
    assert ok.criterion == pytest.approx(fitted("co2_log")[1].criterion, abs=1e-6)


@pytest.mark.parametrize("formula, error, match", [
    ("uptake ~ foo(conc) + (1|Plant)", fl.FormulaError, r"unknown function foo\(\)"),
    ("uptake ~ poly(conc, 7) + (1|Plant)", fl.DataError, "unique points"),
    ("uptake ~ poly(conc, degree = 2, deg = 3) + (1|Plant)", fl.FormulaError, "unused argument 'deg'"),
    ("uptake ~ log(conc, 2, 3) + (1|Plant)", fl.FormulaError, "too many arguments"),
    ("uptake ~ ns(conc, df = 0.5) + (1|Plant)", fl.FormulaError, "df must be an integer"),
    ("uptake ~ bs(Treatment) + (1|Plant)", fl.DataError, "numeric variable"),
    ("uptake ~ log(nope) + (1|Plant)", fl.MissingColumnError, "nope"),
    ("uptake ~ I(conc %o% 2) + (1|Plant)", fl.FormulaError, "%o%"),
    ("uptake ~ I(1:3) + (1|Plant)", fl.FormulaError, "':' operator"),
])
def test_dialect_errors_name_the_problem(formula, error, match):
    with pytest.raises(error, match=match):
        fl.lmer(formula, _co2())


def test_new_level_of_an_evaluated_factor_is_an_error():
    """factor(k) on new data: a level the fit did not see is an error (R: "factor has new levels")."""
    mu = data(FITS["mu_factor_offset"])
    res = fitted("mu_factor_offset")[1]
    nd = mu.head(2).assign(k=[1, 7])
    with pytest.raises(fl.DataError, match="new level"):
        res.predict(nd)
