"""The NumPy model matrices of simple right-hand sides (_simple_design) against formulaic's
(the general path, ``_rformula.model_matrix``), and R's column conventions."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlmm_ext as fl
from fastlmm_ext import _design
from fastlmm_ext._data import prepare_factors
from fastlmm_ext._rformula import translate
from fastlmm_ext._simple_design import DeferredSpec, _terms, simple_model_matrix


def _frame(seed: int, n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "x": rng.normal(size=n),
        "z": rng.integers(0, 5, size=n),                                  # int column: numeric
        "f": rng.choice(["lo", "mid", "hi"], size=n),                      # str: sorted levels
        "g": pd.Categorical(rng.choice([3, 1, 2], size=n), categories=[3, 1, 2]),   # int categories, own order
        "b": rng.random(n) > 0.5,                                          # bool: FALSE/TRUE
        "h": pd.Categorical(rng.choice(["u", "v"], size=n), categories=["v", "u", "w"]),   # an unused category
    })


def _both(text: str, df: pd.DataFrame):
    frame = prepare_factors(df, list(df.columns))
    tr = translate(text, frame.columns)
    fast = _design._rhs_matrix(tr, frame, "w", {}, False, True)
    slow = _design._rhs_matrix(tr, frame, "w", {}, False, False)
    return frame, fast, slow


@pytest.mark.parametrize("text", ["1", "x", "1 + x", "0 + x", "x - 1", "- 1 + x", "x + f", "f + x",
                                  "0 + f", "0 + f + g", "0 + x + g + f", "f + g + b + h", "x + x + z",
                                  "0 + b", "z + 1", "g"])
def test_simple_matrix_equals_formulaics(text):
    df = _frame(1)
    frame, (X, names, spec), (X0, names0, spec0) = _both(text, df)
    assert isinstance(spec, DeferredSpec), "the simple path was not taken"
    assert names == names0
    np.testing.assert_array_equal(X, X0)          # copies of data and 0/1: exact by construction
    # the deferred spec rebuilds the same matrix on other rows, and pickles as the spec itself
    new = prepare_factors(_frame(2, 25), list(df.columns))
    np.testing.assert_array_equal(spec.get_model_matrix(new).to_numpy(), spec0.get_model_matrix(new).to_numpy())
    assert pickle.loads(pickle.dumps(spec)) == spec0


@pytest.mark.parametrize("text", ["x:z", "x * f", "log(x)", "poly(x, 2)", "0", "x - z", "1 + x - 1", "I(x^2)"])
def test_other_forms_go_to_formulaic(text):
    frame = prepare_factors(_frame(1), ["x", "z", "f"])
    tr = translate(text, frame.columns)
    assert tr.exprs or simple_model_matrix(tr.text, frame) is None


def test_ordered_factor_and_user_contrasts_go_to_formulaic():
    df = _frame(1)
    df["o"] = pd.Categorical(df["f"], categories=["lo", "mid", "hi"], ordered=True)
    frame = prepare_factors(df, ["x", "o", "f"])
    assert simple_model_matrix("x + o", frame) is None                 # contr.poly
    assert simple_model_matrix("x + f", frame, {"f": object()}) is None  # a user contrast
    assert simple_model_matrix("x + f", frame) is not None


def test_terms_grammar():
    assert _terms("1 + x") == (True, ["x"])
    assert _terms("0 + x + x") == (False, ["x"])
    assert _terms("x - 1") == (False, ["x"])
    for bad in ["x - 0", "1 + x - 1", "x - z", "x : z", "", "+"]:
        assert _terms(bad) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), intercept=st.sampled_from(["", "1 + ", "0 + ", "-1 + "]),
       terms=st.lists(st.sampled_from(["x", "z", "f", "g", "b", "h"]), min_size=1, max_size=5))
def test_random_simple_formulas(seed, intercept, terms):
    df = _frame(seed)
    _, (X, names, _), (X0, names0, _) = _both(intercept + " + ".join(terms), df)
    assert names == names0
    np.testing.assert_array_equal(X, X0)


def test_fit_takes_the_simple_path_and_matches_the_formulaic_one(monkeypatch):
    """A whole fit with the simple path against the same fit with formulaic only: the same
    structure (X, Z's model matrices, names), so the same criterion and estimates."""
    df = _frame(3, 300)
    rng = np.random.default_rng(99)
    s = np.repeat(np.arange(30), 10)
    df["y"] = rng.normal(size=300) + df["x"] * (1 + 0.5 * rng.normal(size=30)[s]) + rng.normal(size=30)[s]
    df["s"] = s.astype(str)
    formula = "y ~ x + f + g + b + (1 + x | s)"
    fast = fl.lmer(formula, df)
    assert isinstance(fast.structure.fixed_spec, DeferredSpec)
    monkeypatch.setattr(_design, "simple_model_matrix", lambda *a, **k: None)
    slow = fl.lmer(formula, df)
    assert not isinstance(slow.structure.fixed_spec, DeferredSpec)
    assert list(fast.fixef.index) == list(slow.fixef.index)
    assert [t.cnms for t in fast.structure.terms] == [t.cnms for t in slow.structure.terms]
    np.testing.assert_array_equal(fast.structure.X, slow.structure.X)
    assert fast.criterion == pytest.approx(slow.criterion, rel=1e-12, abs=1e-9)
    np.testing.assert_allclose(fast.fixef, slow.fixef, rtol=1e-9, atol=1e-12)
    # what the spec serves: new-data prediction and the ANOVA hypotheses
    new = df.iloc[:7]
    np.testing.assert_allclose(fast.predict(new), slow.predict(new), rtol=1e-9)
    a, b = fast.anova_table(), slow.anova_table()
    np.testing.assert_allclose(a["F value"], b["F value"], rtol=1e-7)
