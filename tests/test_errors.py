"""Bad input gets a clear, specific error (never a crash or a silently wrong answer)."""
from __future__ import annotations

import types
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from fastlmm_ext import datasets

from conftest import raises_named


@pytest.fixture
def sleep():
    return datasets.load("sleepstudy")


def test_missing_column_is_named(sleep):
    with pytest.raises(fl.MissingColumnError, match="'Dayz'") as e:
        fl.lmer("Reaction ~ Dayz + (1|Subject)", sleep)
    assert isinstance(e.value, KeyError)
    with pytest.raises(fl.MissingColumnError, match="'Subj'"):
        fl.lmer("Reaction ~ Days + (1|Subj)", sleep)
    with pytest.raises(fl.MissingColumnError, match="'resp'"):
        fl.lmer("resp ~ Days + (1|Subject)", sleep)


def test_formula_without_random_terms(sleep):
    with pytest.raises(fl.FormulaError, match="random"):
        fl.lmer("Reaction ~ Days", sleep)


@pytest.mark.parametrize("formula", ["Reaction ~ Days + (1|)", "Reaction ~ Days + ( |Subject)",
                                     "Reaction ~ Days + (1|Subject", "Reaction Days (1|Subject)",
                                     "~ Days + (1|Subject)"])
def test_malformed_formula(sleep, formula):
    with pytest.raises(fl.FormulaError):
        fl.lmer(formula, sleep)


def test_formula_not_a_string(sleep):
    with pytest.raises(fl.FormulaError, match="string"):
        fl.lmer(42, sleep)


def test_non_numeric_response(sleep):
    df = sleep.assign(label=np.where(sleep.Reaction > 300, "slow", "fast"))
    with pytest.raises(fl.DataError, match="numeric"):
        fl.lmer("label ~ Days + (1|Subject)", df)


@pytest.mark.parametrize("col", ["Reaction", "Days"])
def test_infinite_values(sleep, col):
    df = sleep.astype({"Days": float})
    df.loc[3, col] = np.inf
    with pytest.raises(fl.DataError, match=f"{col}.*infinite|infinite.*{col}"):
        fl.lmer("Reaction ~ Days + (1|Subject)", df)


def test_single_level_grouping_factor(sleep):
    df = sleep.assign(one="a")
    with pytest.raises(fl.GroupingFactorError, match="'one'.*> 1 sampled level"):
        fl.lmer("Reaction ~ Days + (1|one)", df)


def test_levels_equal_observations(sleep):
    df = sleep.assign(row=np.arange(len(sleep)).astype(str))
    with pytest.raises(fl.IdentifiabilityError, match="row"):
        fl.lmer("Reaction ~ Days + (1|row)", df)


def test_more_random_effects_than_observations():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"y": rng.normal(size=20), "x": rng.normal(size=20), "z": rng.normal(size=20),
                       "g": np.repeat(np.arange(8), [3, 3, 3, 3, 2, 2, 2, 2])})
    with pytest.raises(fl.IdentifiabilityError, match="number of observations"):
        fl.lmer("y ~ x + (1 + x + z|g)", df)


def test_empty_data(sleep):
    with pytest.raises(fl.DataError, match="no rows"):
        fl.lmer("Reaction ~ Days + (1|Subject)", sleep.iloc[:0])
    with pytest.raises(fl.DataError):
        fl.lmer("Reaction ~ Days + (1|Subject)", None)


def test_all_rows_missing(sleep):
    df = sleep.assign(Reaction=np.nan)
    with pytest.raises(fl.DataError, match="no complete rows"):
        fl.lmer("Reaction ~ Days + (1|Subject)", df)


def test_missing_rows_dropped_and_counted(sleep):
    df = sleep.copy()
    df.loc[[0, 5, 17], "Reaction"] = np.nan
    df.loc[20, "Days"] = np.nan
    with pytest.warns(fl.MissingValuesWarning, match="dropped 4 of 180"):
        res = fl.lmer("Reaction ~ Days + (Days|Subject)", df)
    assert res.nobs == 176 and res.n_dropped == 4
    ref = fl.lmer("Reaction ~ Days + (Days|Subject)", df.dropna())
    assert res.criterion == pytest.approx(ref.criterion, rel=1e-12)
    assert "4 observation(s) deleted" in res.summary()


def test_missing_in_unused_column_is_ignored(sleep):
    df = sleep.assign(other=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fl.MissingValuesWarning)
        res = fl.lmer("Reaction ~ Days + (1|Subject)", df)
    assert res.nobs == 180


def test_rank_deficient_X_drops_columns(sleep):
    df = sleep.assign(Days2=2 * sleep.Days, c=1.0)
    with pytest.warns(fl.RankDeficiencyWarning, match="dropping 2 column"):
        res = fl.lmer("Reaction ~ Days + Days2 + c + (1|Subject)", df)
    assert list(res.fixef.index) == ["(Intercept)", "Days"]
    base = fl.lmer("Reaction ~ Days + (1|Subject)", sleep)
    assert res.criterion == pytest.approx(base.criterion, rel=1e-10)


def test_bad_backend_and_theta(sleep):
    with pytest.raises(ValueError, match="backend"):
        fl.LinearMixedModel("Reaction ~ Days + (1|Subject)", sleep, backend="gpu")
    m = fl.LinearMixedModel("Reaction ~ Days + (Days|Subject)", sleep)
    with pytest.raises(ValueError, match="length 3"):
        m.objective([1.0])
    with pytest.raises(ValueError, match="lower bound"):
        m.objective([-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        m.objective([np.nan, 0.0, 1.0])


def test_perfect_fit_is_an_error_not_a_crash():
    df = pd.DataFrame({"g": list("aabbcc") * 2, "x": np.arange(12.0)})
    df["y"] = 2.0 * df.x
    with pytest.raises(fl.DataError, match="exact linear function"):
        fl.LinearMixedModel("y ~ x + (1|g)", df)


def test_errors_are_value_errors(sleep):
    """Generic handlers keep working: the hierarchy derives from the built-in exceptions."""
    assert issubclass(fl.FormulaError, ValueError) and issubclass(fl.DataError, ValueError)
    assert issubclass(fl.MissingColumnError, KeyError)
    assert issubclass(fl.GroupingFactorError, fl.FastLMMError)


# ----------------------------------------------------------------------------- a large common level of y

def level_frame(seed: int = 1, n: int = 300, ngroups: int = 20) -> pd.DataFrame:
    """A response e about 0 (slope 1 in x, group SD 1, residual SD 0.5) and positive weights."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, ngroups, n)
    x = rng.normal(size=n)
    return pd.DataFrame({"g": g, "x": x, "e": x + rng.normal(0, 1, ngroups)[g] + rng.normal(0, 0.5, n),
                         "w": rng.uniform(0.5, 2.0, n)})


def thirds(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [df.iloc[:100], df.iloc[100:200], df.iloc[200:]]


def fit_path(path: str, response: str, rhs: str, df: pd.DataFrame, weights=None, **opts):
    """The fit of ``response ~ rhs`` on one of the paths, as (criterion, theta, sigma, fixef, se)."""
    formula = f"{response} ~ {rhs}"
    if path in ("compiled", "blocked", "reference"):
        res = fl.lmer(formula, df, backend=path, weights=weights, **opts)
    elif path == "chunked":
        res = fl.lmer_chunked(formula, thirds(df), weights=weights, **opts)
    elif path == "dask":
        dd = pytest.importorskip("dask.dataframe")
        res = fl.lmer(formula, dd.from_pandas(df, npartitions=3), weights=weights, **opts)
    elif path == "refit":       # the design built on another response, refitted to this one
        res = fl.LinearMixedModel(f"e ~ {rhs}", df, weights=weights).refit(df[response].to_numpy(), **opts)
    elif path == "fit_many":
        row = fl.fit_many(f"~ {rhs}", df, [response], weights=weights, **opts).iloc[0]
        names = [c[len("fixef:"):] for c in row.index if c.startswith("fixef:")]
        return types.SimpleNamespace(
            criterion=row["criterion"], sigma=row["sigma"],
            theta=np.array([row[c] for c in row.index if c.startswith("theta:")], dtype=float),
            fixef=np.array([row[f"fixef:{nm}"] for nm in names], dtype=float),
            se=np.array([row[f"se:{nm}"] for nm in names], dtype=float))
    else:
        raise AssertionError(path)
    return types.SimpleNamespace(criterion=res.criterion, theta=np.asarray(res.theta), sigma=res.sigma,
                                 fixef=res.fixef.to_numpy(), se=res.se.to_numpy())


def assert_shifted_fit(big, small, level: float) -> None:
    """The fit of y equals the fit of y − level; only the intercept (first) moves, by ``level``."""
    assert big.criterion == pytest.approx(small.criterion, abs=1e-6)
    np.testing.assert_allclose(big.theta, small.theta, rtol=1e-5)
    assert big.sigma == pytest.approx(small.sigma, rel=1e-6)
    np.testing.assert_allclose(big.se, small.se, rtol=1e-6)
    shift = np.zeros(big.fixef.size)
    shift[0] = level
    tol = 1e-6 * small.se + 8 * np.finfo(float).eps * abs(level)     # the intercept's rounding at the level
    assert np.all(np.abs((big.fixef - shift) - small.fixef) <= tol), (big.fixef - shift, small.fixef)


PATHS = ["compiled", "blocked", "reference", "chunked", "dask", "refit", "fit_many"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_large_level_is_fitted_like_the_shifted_response(path, weighted):
    """y = 1e12 + x + noise (sd 0.5) was refused as 'an exact linear function of the fixed effects';
    it is the fit of y − 1e12 with the intercept moved by 1e12, on every path."""
    df = level_frame()
    df["y"] = 1e12 + df["e"]
    df["y0"] = df["y"] - 1e12                     # exact (Sterbenz): the numbers the user has, shifted
    w = "w" if weighted else None
    assert_shifted_fit(fit_path(path, "y", "x + (1|g)", df, w), fit_path(path, "y0", "x + (1|g)", df, w), 1e12)


@pytest.mark.parametrize("path", ["compiled", "blocked", "chunked"])
def test_large_level_with_the_moment_start(path):
    """L-BFGS-B starts from moment estimates on the cross-products (_start.py): no digits lost there."""
    df = level_frame(seed=2)
    df["y"] = -3e12 + df["e"]
    df["y0"] = df["y"] + 3e12
    opts = {"optimizer": "lbfgsb"} if path == "blocked" else {}
    assert_shifted_fit(fit_path(path, "y", "x + (1|g)", df, **opts), fit_path(path, "y0", "x + (1|g)", df, **opts),
                       -3e12)


@pytest.mark.parametrize("path", ["compiled", "chunked", "refit"])
def test_large_level_intercept_only(path):
    """lmer_chunked refused 1e12 + noise (sd 1) with only an intercept."""
    df = level_frame(seed=3)
    df["y0"] = np.random.default_rng(5).normal(0, 1, len(df)) + np.repeat(np.arange(20.0), 15)[:len(df)] * 0.1
    df["y"] = 1e12 + df["y0"]
    df["y0"] = df["y"] - 1e12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fl.SingularFitWarning)
        assert_shifted_fit(fit_path(path, "y", "1 + (1|g)", df), fit_path(path, "y0", "1 + (1|g)", df), 1e12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(0, 13), mantissa=st.floats(1.0, 9.99), negative=st.booleans(),
       log_scale=st.floats(-2.0, 2.0), path=st.sampled_from(["compiled", "chunked", "refit"]))
def test_random_levels_and_scales(k, mantissa, negative, log_scale, path):
    """Any level L and scale s (as long as the noise is above float64's rounding of L: s/|L| ≥ 1e-12):
    the fit of L + s·e equals the fit of (L + s·e) − L."""
    level = (-1.0 if negative else 1.0) * mantissa * 10.0 ** k
    scale = 10.0 ** log_scale
    assume(scale / abs(level) >= 1e-12)
    df = level_frame(seed=4)
    df["y"] = level + scale * df["e"]
    df["y0"] = df["y"] - level
    assert_shifted_fit(fit_path(path, "y", "x + (1|g)", df), fit_path(path, "y0", "x + (1|g)", df), level)


EXACT = {
    "constant": ("x + (1|g)", lambda d: np.full(len(d), 5.0), None),
    "constant at 1e12": ("x + (1|g)", lambda d: np.full(len(d), 1e12), None),
    "1e12 + 2x": ("x + (1|g)", lambda d: 1e12 + 2.0 * d["x"].to_numpy(), None),
    "3x, no intercept": ("0 + x + (1|g)", lambda d: 3.0 * d["x"].to_numpy(), None),
    "zero, no fixed effects": ("0 + (1|g)", lambda d: np.zeros(len(d)), None),
    # linear on the rows of positive weight; the rows of weight 0 do not count
    "weighted": ("x + (1|g)", lambda d: 1.0 + 2.0 * d["x"].to_numpy() + np.where(d["w0"] > 0, 0.0, d["e"]), "w0"),
}


@pytest.mark.parametrize("path", ["compiled", "reference", "chunked", "dask", "refit"])
@pytest.mark.parametrize("case", list(EXACT))
def test_exact_responses_are_still_refused(path, case):
    """The scale-free check still refuses what X reproduces, on every path (the weighted and the
    no-fixed-effects cases were not refused before)."""
    rhs, make, weights = EXACT[case]
    df = level_frame(seed=6)
    df["w0"] = np.where(np.arange(len(df)) % 5 == 0, 0.0, df["w"])
    df["yx"] = make(df)
    with raises_named(fl.DataError, "response", "the residual variance is zero"):
        if path == "refit":
            fl.LinearMixedModel(f"e ~ {rhs}", df, weights=weights).refit(df["yx"].to_numpy())
        elif path == "chunked":
            fl.lmer_chunked(f"yx ~ {rhs}", thirds(df), weights=weights)
        elif path == "dask":      # partitions reduced pairwise: the accumulators' merge
            dd = pytest.importorskip("dask.dataframe")
            fl.LinearMixedModel(f"yx ~ {rhs}", dd.from_pandas(df, npartitions=4), weights=weights)
        else:
            fl.LinearMixedModel(f"yx ~ {rhs}", df, weights=weights, backend=path)


# ----------------------------------------------------------------------------- arguments

MODEL_CALLS = {
    "lmer": lambda df, REML: fl.lmer("Reaction ~ Days + (1|Subject)", df, REML=REML),
    "LinearMixedModel": lambda df, REML: fl.LinearMixedModel("Reaction ~ Days + (1|Subject)", df, REML=REML),
    "lmer_chunked": lambda df, REML: fl.lmer_chunked("Reaction ~ Days + (1|Subject)", [df], REML),
    "from_chunks": lambda df, REML: fl.LinearMixedModel.from_chunks("Reaction ~ Days + (1|Subject)", [df], REML=REML),
    "fit_many": lambda df, REML: fl.fit_many("~ Days + (1|Subject)", df, ["Reaction"], REML=REML),
}


@pytest.mark.parametrize("call", list(MODEL_CALLS))
@pytest.mark.parametrize("bad", ["no", "False", None, 2, 0.5, np.array([True])], ids=repr)
def test_REML_must_be_a_bool(sleep, call, bad):
    """REML="no" silently fitted REML; like R's if (REML), only logical values and 0/1 are accepted."""
    with raises_named(fl.ArgumentError, "REML", repr(bad)) as e:
        MODEL_CALLS[call](sleep, bad)
    assert isinstance(e.value, TypeError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("call", ["lmer", "fit_many"])
@pytest.mark.parametrize("flag", [True, False])
def test_REML_accepts_numpy_bools_and_0_1(sleep, call, flag):
    crit = [MODEL_CALLS[call](sleep, v).criterion for v in (flag, np.bool_(flag), int(flag), np.int64(flag))]
    crit = [float(np.asarray(c).ravel()[0]) for c in crit]
    assert crit == [crit[0]] * 4
    other = MODEL_CALLS[call](sleep, not flag).criterion
    assert float(np.asarray(other).ravel()[0]) != crit[0]


def test_deeply_nested_brackets_are_a_formula_error(sleep):
    """5,000 nested parentheses overflowed Python's recursion; the parser refuses them up front."""
    with raises_named(fl.FormulaError, "nests brackets more than 100 deep"):
        fl.lmer("Reaction ~ " + "(" * 5000 + "Days" + ")" * 5000 + " + (1|Subject)", sleep)
    with raises_named(fl.FormulaError, "nests brackets"):
        fl.lmer("Reaction ~ Days + (" + "(" * 200 + "1" + ")" * 200 + "|Subject)", sleep)
    with raises_named(fl.FormulaError, "nests brackets"):
        fl.fit_many("~ " + "[" * 300 + "]" * 300 + " + (1|Subject)", sleep, ["Reaction"])
    nested = fl.lmer("Reaction ~ " + "(" * 50 + "Days" + ")" * 50 + " + (1|Subject)", sleep)   # R's own limit
    assert nested.criterion == pytest.approx(fl.lmer("Reaction ~ Days + (1|Subject)", sleep).criterion, abs=1e-9)
