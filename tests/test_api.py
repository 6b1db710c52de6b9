"""Public API: the seed example, model object, refit, summary, examples, data types."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets


def test_ingot_seed_example():
    """The notebook's numbers (REML: 11.448 / 10.372, intercept 70.186 (1.766); ML: 9.812 / 8.890)."""
    df = datasets.load("ingot")
    res = fl.lmer("pres ~ metal + (1|ingot)", df, REML=True)
    vc = res.varcorr.set_index("grp")["vcov"]
    assert vc["ingot"] == pytest.approx(11.448, abs=5e-4)
    assert vc["Residual"] == pytest.approx(10.3716, abs=5e-4)
    assert res.fixef["(Intercept)"] == pytest.approx(70.186, abs=5e-4)
    assert res.se["(Intercept)"] == pytest.approx(1.766, abs=5e-4)
    assert res.fixef["metali"] == pytest.approx(5.714, abs=5e-4)
    assert res.se["metali"] == pytest.approx(1.721, abs=5e-4)
    assert res.fixef["metaln"] == pytest.approx(0.914, abs=5e-4)
    assert res.loglik == pytest.approx(-53.895, abs=5e-4)
    ml = fl.lmer("pres ~ metal + (1|ingot)", df, REML=False)
    vc = ml.varcorr.set_index("grp")["vcov"]
    assert vc["ingot"] == pytest.approx(9.812, abs=5e-4)
    assert vc["Residual"] == pytest.approx(8.890, abs=5e-4)


def test_model_object_objective_fit_refit():
    df = datasets.load("sleepstudy")
    m = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", df)
    assert m.objective(m.theta0) == pytest.approx(1773.680330616, rel=1e-10)
    np.testing.assert_array_equal(m.lower, [0.0, -np.inf, 0.0])
    np.testing.assert_array_equal(m.theta0, [1.0, 0.0, 1.0])
    res = m.fit()
    assert res.optsummary.feval > 0 and res.optsummary.fmin == pytest.approx(res.criterion)
    assert res.optsummary.theta_initial.tolist() == [1.0, 0.0, 1.0]
    assert res.theta_names == ["Subject.(Intercept)", "Subject.Days.(Intercept)", "Subject.Days"]
    # refit with a new response on the same design equals a fresh fit
    y2 = df.Reaction.to_numpy() * 0.5 + 3.0
    r2 = m.refit(y2)
    fresh = fl.lmer("Reaction ~ Days + (Days|Subject)", df.assign(Reaction=y2))
    assert r2.criterion == pytest.approx(fresh.criterion, abs=1e-7)
    np.testing.assert_allclose(r2.fixef, fresh.fixef, rtol=1e-6)
    with pytest.raises(fl.DataError, match="length"):
        m.refit(y2[:10])


def test_summary_layout():
    df = datasets.load("sleepstudy")
    text = fl.lmer("Reaction ~ Days + (Days|Subject)", df).summary()
    for piece in ["Linear mixed model fit by REML", "REML criterion at convergence: 1743.6",
                  "Random effects:", "Groups", "Subject", "(Intercept)", "Residual",
                  "Number of obs: 180, groups:  Subject, 18", "Fixed effects:", "Std. Error", "t value",
                  "251.405", "10.467", "Correlation of Fixed Effects:", "(Intr)"]:
        assert piece in text, piece
    ml = fl.lmer("Reaction ~ Days + (Days|Subject)", df, REML=False).summary()
    assert "maximum likelihood" in ml and "AIC" in ml and "1763.9" in ml and "logLik" in ml


def test_singular_fit_flagged():
    df = pd.read_csv(__import__("conftest").reference_dir() / "Dyestuff2.csv")
    with pytest.warns(fl.SingularFitWarning):
        res = fl.lmer("Yield ~ 1 + (1|Batch)", df)
    assert res.singular and res.theta[0] == 0.0
    assert "boundary (singular) fit" in res.summary()


def test_no_false_convergence_warning():
    df = datasets.load("sleepstudy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = fl.lmer("Reaction ~ Days + (Days|Subject)", df)
    assert res.converged and res.conv_info["checked"] and res.conv_info["max_scaled_gradient"] < 2e-3


def test_crossed_and_nested_examples():
    pen = fl.lmer("diameter ~ 1 + (1|plate) + (1|sample)", datasets.load("Penicillin"))
    assert pen.criterion == pytest.approx(330.860589, abs=1e-5)
    assert pen.ngrps == {"plate": 24, "sample": 6}
    pas = fl.lmer("strength ~ 1 + (1|batch/cask)", datasets.load("Pastes"))
    assert pas.criterion == pytest.approx(246.9907459, abs=1e-5)
    assert pas.ngrps == {"cask:batch": 30, "batch": 10}
    assert list(pas.ranef["cask:batch"].index[:2]) == ["a:A", "a:B"]


def test_backends_give_same_fit():
    df = datasets.load("sleepstudy")
    a = fl.lmer("Reaction ~ Days + (Days|Subject)", df, backend="compiled")
    b = fl.lmer("Reaction ~ Days + (Days|Subject)", df, backend="reference")
    assert a.backend == "compiled" and b.backend == "reference"
    assert a.criterion == pytest.approx(b.criterion, abs=1e-7)


@pytest.mark.parametrize("kind", ["object", "str", "category", "category_str", "bool"])
def test_factor_column_types(kind):
    """pandas 3 str dtype, object, categoricals (with str categories) and bools are factors."""
    rng = np.random.default_rng(1)
    n = 120
    g = rng.integers(0, 6, n)
    grp = pd.Series([f"g{i}" for i in g])
    f = rng.integers(0, 2, n).astype(bool)
    y = rng.normal(size=n) + g * 0.3 + f * 1.5
    conv = {"object": lambda s: s.astype(object), "str": lambda s: s.astype("str"),
            "category": lambda s: s.astype("category"),
            "category_str": lambda s: pd.Series(pd.Categorical(s, categories=pd.Index(sorted(set(s)), dtype="str"))),
            "bool": lambda s: s}
    df = pd.DataFrame({"y": y, "g": conv[kind](grp) if kind != "bool" else grp,
                       "f": conv[kind](pd.Series(np.where(f, "b", "a"))) if kind != "bool" else f})
    res = fl.lmer("y ~ f + (1|g)", df)
    assert list(res.fixef.index) == ["(Intercept)", "fTRUE" if kind == "bool" else "fb"]
    assert res.ngrps == {"g": 6}
    base = fl.lmer("y ~ f + (1|g)", pd.DataFrame({"y": y, "g": grp.astype(object), "f": f.astype(int)}))
    assert res.criterion == pytest.approx(base.criterion, rel=1e-10)


def test_categorical_order_sets_reference_level():
    df = datasets.load("ingot")
    df["metal"] = pd.Categorical(df["metal"].astype(str), categories=["n", "i", "c"])
    res = fl.lmer("pres ~ metal + (1|ingot)", df)
    assert list(res.fixef.index) == ["(Intercept)", "metali", "metalc"]
    assert res.fixef["(Intercept)"] == pytest.approx(70.186 + 0.914, abs=1e-3)


def test_python_dash_m_example_runs(tmp_path):
    # the same fastlmm_ext this test imported (installed, or the source tree with its built kernel)
    import os
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fl.__file__)))
    out = subprocess.run([sys.executable, "-m", "fastlmm_ext", "ingot"], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env=env)
    assert "REML criterion at convergence: 107.8" in out.stdout
    assert "metali" in out.stdout


def test_ranef_and_condvar_shapes():
    df = datasets.load("sleepstudy")
    res = fl.lmer("Reaction ~ Days + (Days|Subject)", df)
    re = res.ranef["Subject"]
    assert list(re.columns) == ["(Intercept)", "Days"] and re.shape == (18, 2)
    cv = res.condvar["Subject"]
    assert cv.shape == (18, 2, 2)
    assert np.all(np.linalg.eigvalsh(cv) > 0)
    np.testing.assert_allclose(cv, np.transpose(cv, (0, 2, 1)))


def test_stateful_transforms_in_fixed_part():
    """center(x), scale(x), poly(x, 2) read their columns (formulaic omits them from required_variables)."""
    df = datasets.load("sleepstudy")
    a = fl.lmer("Reaction ~ center(Days) + (1|Subject)", df)
    b = fl.lmer("Reaction ~ Days + (1|Subject)", df)
    assert a.criterion == pytest.approx(b.criterion, rel=1e-10)
    assert a.fixef.iloc[1] == pytest.approx(b.fixef.iloc[1], rel=1e-10)
    c = fl.lmer("Reaction ~ poly(Days, 2) + (1|Subject)", df)
    assert c.fixef.size == 3
    d = df.copy()
    d.loc[0, "Days"] = np.nan
    with pytest.warns(fl.MissingValuesWarning, match="dropped 1"):
        e = fl.lmer("Reaction ~ scale(Days) + (1|Subject)", d)
    assert e.nobs == 179


def test_verbose_progress_only_when_asked(capsys):
    df = datasets.load("sleepstudy")
    fl.lmer("Reaction ~ Days + (Days|Subject)", df)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    fl.lmer("Reaction ~ Days + (Days|Subject)", df, verbose=True)
    err = capsys.readouterr().err
    assert "fit done:" in err and "evaluations" in err and "REML criterion 1743.628" in err
