"""Bad input gets a clear, specific error (never a crash or a silently wrong answer)."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets


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
