"""statsmodels-style names, lme4 aliases, to_dict/to_json and the HTML repr of LmerResult."""
from __future__ import annotations

import copy
import html
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import fastlmm_ext as fl
from fastlmm_ext import datasets

SLEEP = "Reaction ~ Days + (Days|Subject)"


@pytest.fixture(scope="module")
def res():
    return fl.lmer(SLEEP, datasets.load("sleepstudy"))


@pytest.fixture(scope="module")
def res_ml():
    return fl.lmer(SLEEP, datasets.load("sleepstudy"), REML=False)


# ----------------------------------------------------------------------------- statsmodels names

def test_statsmodels_names_equal_lme4_names(res):
    pd.testing.assert_series_equal(res.params, res.fixef)
    pd.testing.assert_series_equal(res.bse, res.se)
    pd.testing.assert_frame_equal(res.cov_params(), res.vcov)
    assert res.llf == res.loglik
    assert res.df_resid == res.nobs - res.npar == 174          # lme4's df.residual(fit)
    assert res.random_effects.keys() == res.ranef.keys()
    pd.testing.assert_frame_equal(res.random_effects["Subject"], res.ranef["Subject"])
    # copies: changing them does not change the result
    p = res.params
    p.iloc[0] = -1.0
    assert res.fixef.iloc[0] != -1.0
    assert isinstance(res.nobs, int) and res.nobs == 180


def test_tvalues_pvalues(res):
    t = res.tvalues
    np.testing.assert_allclose(t, res.fixef / res.se, rtol=1e-15)
    assert t["Days"] == pytest.approx(6.771, abs=5e-4)        # lme4's t value
    p = res.pvalues
    assert p.name == "P>|z|"
    np.testing.assert_allclose(p, 2 * stats.norm.sf(np.abs(t)), rtol=1e-12)
    assert p["Days"] == pytest.approx(1.2747e-11, rel=1e-3)
    assert list(p.index) == list(res.fixef.index)


def test_conf_int(res):
    ci = res.conf_int()
    assert list(ci.columns) == [0, 1] and list(ci.index) == list(res.fixef.index)
    z = 1.959963984540054
    np.testing.assert_allclose(ci[0], res.fixef - z * res.se, rtol=1e-12)
    np.testing.assert_allclose(ci[1], res.fixef + z * res.se, rtol=1e-12)
    ci90 = res.conf_int(alpha=0.1)
    assert (ci90[1] - ci90[0] < ci[1] - ci[0]).all()
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            res.conf_int(alpha=bad)


def test_lme4_aliases(res):
    assert res.logLik == res.loglik == pytest.approx(-871.8141, abs=1e-4)
    assert res.AIC == res.aic == pytest.approx(1755.628, abs=1e-3)
    assert res.BIC == res.bic == pytest.approx(1774.786, abs=1e-3)
    assert res.VarCorr is res.varcorr


def test_getME(res):
    s = res.structure
    np.testing.assert_array_equal(res.getME("theta"), res.theta)
    np.testing.assert_array_equal(res.getME("beta"), res.fixef.to_numpy())
    assert res.getME("sigma") == res.sigma
    X, Z, y = res.getME("X"), res.getME("Z"), res.getME("y")
    assert X.shape == (180, 2) and sp.issparse(Z) and Z.shape == (180, 36)
    np.testing.assert_array_equal(y, datasets.load("sleepstudy")["Reaction"].to_numpy(dtype=float))
    np.testing.assert_array_equal(res.getME("lower"), [0.0, -np.inf, 0.0])
    assert (res.getME("n"), res.getME("p"), res.getME("q"), res.getME("ntheta")) == (180, 2, 36, 3)
    # fitted = X beta + Z b with b the conditional modes, level by level
    b = res.ranef["Subject"].to_numpy().ravel()
    np.testing.assert_allclose(X @ res.getME("beta") + Z @ b, res.fitted(), rtol=1e-12)
    # Lambda: 18 diagonal copies of the 2x2 lower-triangular T(theta)
    L = res.getME("Lambda")
    assert sp.issparse(L) and L.shape == (36, 36)
    T = s.terms[0].T(res.theta)
    np.testing.assert_allclose(L[:2, :2].toarray(), T)
    np.testing.assert_allclose(L[34:, 34:].toarray(), T)
    assert L.nnz == 18 * 3
    np.testing.assert_allclose(res.getME("Lambdat").toarray(), L.T.toarray())
    np.testing.assert_allclose(res.getME("Zt").toarray(), Z.T.toarray())
    # var(b) per subject: sigma^2 T T'
    np.testing.assert_allclose(res.sigma ** 2 * (L @ L.T)[:2, :2].toarray(),
                               res.term_covariances()["Subject"])
    with pytest.raises(ValueError, match="unknown component 'Xt'"):
        res.getME("Xt")


# ----------------------------------------------------------------------------- to_dict / to_json

KEYS = {"schema_version", "formula", "REML", "backend", "nobs", "n_dropped", "npar", "df_resid",
        "criterion", "logLik", "AIC", "BIC", "deviance", "sigma", "theta", "theta_names", "fixef", "vcov",
        "varcorr", "ngrps", "converged", "singular", "messages", "optsummary"}


def _plain(obj, where="$"):
    """Assert a structure holds only JSON's plain Python types (no numpy scalars, no NaN)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), where
            _plain(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _plain(v, f"{where}[{i}]")
    else:
        assert obj is None or type(obj) in (str, bool, int, float), (where, type(obj))
        if type(obj) is float:
            assert math.isfinite(obj), where


def test_to_dict_schema_and_values(res):
    d = res.to_dict()
    assert set(d) == KEYS
    _plain(d)
    assert json.loads(json.dumps(d)) == d                     # round-trips through JSON unchanged
    assert d["formula"] == SLEEP and d["REML"] is True and d["backend"] == "single"   # auto: one term
    assert d["nobs"] == 180 and d["n_dropped"] == 0 and d["npar"] == 6 and d["df_resid"] == 174
    assert d["criterion"] == {"name": "REMLcrit", "value": res.criterion}
    assert (d["logLik"], d["AIC"], d["BIC"], d["deviance"], d["sigma"]) == (
        res.loglik, res.aic, res.bic, res.deviance, res.sigma)
    assert d["theta"] == res.theta.tolist()
    assert d["theta_names"] == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]
    assert list(d["fixef"]) == ["(Intercept)", "Days"]
    days = d["fixef"]["Days"]
    assert days == {"estimate": res.fixef["Days"], "se": res.se["Days"], "t": res.tvalues["Days"],
                    "p": res.pvalues["Days"]}
    assert d["vcov"]["names"] == ["(Intercept)", "Days"]
    assert d["vcov"]["values"] == res.vcov.to_numpy().tolist()
    vc = d["varcorr"]
    assert [(r["grp"], r["var1"], r["var2"]) for r in vc] == [
        ("Subject", "(Intercept)", None), ("Subject", "Days", None), ("Subject", "(Intercept)", "Days"),
        ("Residual", None, None)]
    assert [r["vcov"] for r in vc] == res.varcorr["vcov"].tolist()
    assert vc[2]["sdcor"] == pytest.approx(0.066, abs=1e-3)    # correlation on the covariance row
    assert d["ngrps"] == {"Subject": 18}
    assert d["converged"] is True and d["singular"] is False and d["messages"] == []
    o = d["optsummary"]
    assert set(o) == {"optimizer", "feval", "geval", "fmin", "theta_initial", "theta_final", "return_code",
                      "stop_reason"}
    assert o["optimizer"] == res.optsummary.optimizer and o["feval"] == res.optsummary.feval
    assert o["geval"] == res.optsummary.geval and o["stop_reason"] == res.optsummary.stop_reason
    assert o["theta_initial"] == [1.0, 0.0, 1.0]
    assert o["fmin"] == pytest.approx(res.criterion) and o["theta_final"] == res.theta.tolist()


def test_to_dict_ml_criterion_name(res_ml):
    d = res_ml.to_dict()
    assert d["REML"] is False
    assert d["criterion"]["name"] == "deviance"
    assert d["criterion"]["value"] == pytest.approx(1751.9393, abs=1e-3)


def test_to_json_file_and_nan_as_null(res, tmp_path):
    path = tmp_path / "fit.json"
    text = res.to_json(path)
    assert path.read_text(encoding="utf-8") == text + "\n"
    assert json.loads(text) == res.to_dict()
    assert "\n  \"formula\"" in text                          # indent=2 by default
    assert "\n" not in res.to_json(indent=None)
    broken = copy.copy(res)
    broken.deviance = float("nan")
    broken.sigma = float("inf")
    text = broken.to_json()
    assert "NaN" not in text and "Infinity" not in text
    d = json.loads(text)
    assert d["deviance"] is None and d["sigma"] is None


def test_to_dict_singular_and_dropped_rows():
    df = datasets.load("sleepstudy")
    df["Reaction"] = df["Reaction"].astype(float)
    df.loc[[0, 5], "Reaction"] = np.nan
    df["junk"] = np.tile(np.arange(10), 18)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fl.lmer("Reaction ~ Days + (1|Subject) + (1|junk)", df)
    d = r.to_dict()
    assert d["n_dropped"] == 2 and d["nobs"] == 178
    assert d["ngrps"] == {"Subject": 18, "junk": 10}
    # junk repeats Days within every subject: its variance is estimated as 0 (a singular fit)
    assert d["singular"] is True and d["theta"][1] == 0.0
    assert d["messages"] == ["boundary (singular) fit: see help(fastlmm_ext.SingularFitWarning)"]
    assert d["varcorr"][1] == {"grp": "junk", "var1": "(Intercept)", "var2": None, "vcov": 0.0, "sdcor": 0.0}
    assert json.loads(r.to_json()) == d


# ----------------------------------------------------------------------------- HTML

def test_repr_html_is_the_summary_text(res):
    """Notebooks show the summary text (lme4's layout) in a <pre> block, escaped."""
    h = res._repr_html_()
    assert h.startswith("<pre") and h.endswith("</pre>") and "<table>" not in h
    assert html.unescape(h[h.index(">") + 1:-len("</pre>")]) == res.summary()
    for piece in ["Random effects:", "Fixed effects:", "Correlation of Fixed Effects:", "Number of obs: 180",
                  f"{res.fixef['Days']:.3f}"]:
        assert piece in h
    assert "P>|z|" not in h     # no p-value of another kind beside the t values
    other = copy.copy(res)
    other.formula = "y ~ x <script>alert(1)</script> & z"
    h = other._repr_html_()
    assert "<script>" not in h and "&lt;script&gt;" in h and "&amp; z" in h


def test_repr_pretty_is_the_summary_text(res):
    """IPython's pretty printer gets the summary text; a recursive display gets the one-line repr."""
    class Printer:   # the part of IPython.lib.pretty.RepresentationPrinter that _repr_pretty_ uses
        def __init__(self):
            self.out = []

        def text(self, s):
            self.out.append(s)
    p = Printer()
    res._repr_pretty_(p, cycle=False)
    assert p.out == [res.summary().rstrip("\n")]
    p = Printer()
    res._repr_pretty_(p, cycle=True)
    assert p.out == [repr(res)]
