"""The data module (_data): what `data` may be, and the checks on its columns, weights and levels.

Every refusal is a FastLMMError subclass whose message names the column, argument or object at
fault; every accepted form fits exactly as the equivalent pandas DataFrame does."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest

import fastlmm_ext as fl
from fastlmm_ext import datasets

from conftest import raises_named as raises

F = "Reaction ~ Days + (1|Subject)"


@pytest.fixture(scope="module")
def sleep() -> pd.DataFrame:
    return datasets.load("sleepstudy")


@pytest.fixture(scope="module")
def base(sleep):
    return fl.lmer(F, sleep)


def same_fit(res, ref, rtol=1e-9):
    """Equal fits; ``rtol`` 1e-5 for a chunked fit, whose optimiser sees other rounding."""
    assert res.criterion == pytest.approx(ref.criterion, abs=1e-8)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=rtol)
    np.testing.assert_allclose(res.fixef.to_numpy(), ref.fixef.to_numpy(), rtol=rtol)
    assert list(res.fixef.index) == list(ref.fixef.index)
    for g, tab in ref.ranef.items():
        assert list(res.ranef[g].index) == list(tab.index)


# ----------------------------------------------------------------------------- what data may be

def test_numpy_array_needs_named_columns(sleep):
    with raises(fl.DataError, "NumPy array", "named columns", "(180, 3)"):
        fl.lmer(F, sleep.to_numpy())


def test_dict_of_arrays_is_a_data_frame(sleep, base):
    same_fit(fl.lmer(F, {c: sleep[c].to_numpy() for c in sleep.columns}), base)


def test_dict_of_unequal_arrays(sleep):
    data = {"Reaction": sleep.Reaction.to_numpy(), "Days": sleep.Days.to_numpy()[:10],
            "Subject": sleep.Subject.to_numpy()}
    with raises(fl.DataError, "different lengths", "'Days': 10", "'Reaction': 180"):
        fl.lmer(F, data)


def test_multiindex_columns(sleep):
    df = sleep.copy()
    df.columns = pd.MultiIndex.from_tuples([("a", c) for c in sleep.columns])
    with raises(fl.DataError, "MultiIndex", "('a', 'Reaction')"):
        fl.lmer(F, df)


@pytest.mark.parametrize("col", ["Days", "Subject", "Reaction"])
def test_duplicate_used_column_is_named(sleep, col):
    df = pd.concat([sleep, sleep[[col]]], axis=1)
    with raises(fl.DataError, f"'{col}'", "more than once"):
        fl.lmer(F, df)


def test_duplicate_unused_column_is_ignored(sleep, base):
    df = sleep.assign(a=1.0, b=2.0).rename(columns={"b": "a"})
    same_fit(fl.lmer(F, df), base)


def test_pyarrow_table_and_interchange_object(sleep, base):
    pa = pytest.importorskip("pyarrow")
    same_fit(fl.lmer(F, pa.Table.from_pandas(sleep, preserve_index=False)), base)

    class OnlyInterchange:               # an object offering nothing but the interchange protocol
        def __init__(self, df):
            self._df = df

        def __dataframe__(self, nan_as_null=False, allow_copy=True):
            return self._df.__dataframe__(nan_as_null, allow_copy)
    same_fit(fl.lmer(F, OnlyInterchange(sleep.assign(Subject=sleep.Subject.astype(str)))), base)


def test_failing_conversion_is_named():
    class Broken:
        def to_pandas(self):
            raise RuntimeError("backend gone")
    with raises(fl.DataError, "Broken", "backend gone"):
        fl.lmer(F, Broken())


# ----------------------------------------------------------------------------- polars

@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("polars")


def test_polars_frame_fits_as_pandas(pl, sleep, base):
    p = pl.DataFrame({"Reaction": sleep.Reaction.to_numpy(), "Days": sleep.Days.to_numpy(),
                      "Subject": sleep.Subject.astype(str).to_numpy()})
    same_fit(fl.lmer(F, p), base)
    same_fit(fl.lmer(F, p.with_columns(pl.col("Subject").cast(pl.Categorical))), base)   # text: sorted levels
    same_fit(fl.lmer_chunked(F, p), base, rtol=1e-5)
    same_fit(fl.lmer_chunked(F, [p[:90], p[90:]]), base, rtol=1e-5)
    tab = fl.fit_many("~ Days + (1|Subject)", p, ["Reaction"])
    assert tab["criterion"][0] == pytest.approx(base.criterion, abs=1e-9)
    np.testing.assert_allclose(base.predict(p.head(5)).to_numpy(), base.predict(sleep.head(5)).to_numpy())


def test_polars_factors_nulls_and_enum_order(pl):
    rng = np.random.default_rng(3)
    n = 200
    g = rng.integers(0, 10, n)
    trt = np.array(["lo", "mid", "hi"])[rng.integers(0, 3, n)]
    y = rng.normal(size=n) + rng.normal(size=10)[g] + (trt == "hi")
    ok = rng.random(n) > 0.05
    p = pl.DataFrame({"y": [float(v) if k else None for v, k in zip(y, ok)], "trt": trt,
                      "flag": rng.random(n) < 0.5, "g": [f"g{v}" for v in g]})
    df = pd.DataFrame({"y": np.where(ok, y, np.nan), "trt": trt, "flag": p["flag"].to_numpy(),
                       "g": [f"g{v}" for v in g]})
    with pytest.warns(fl.MissingValuesWarning):
        res = fl.lmer("y ~ trt + flag + (1|g)", p)
    with pytest.warns(fl.MissingValuesWarning):
        ref = fl.lmer("y ~ trt + flag + (1|g)", df)
    same_fit(res, ref)
    assert res.nobs == int(ok.sum())
    assert list(res.fixef.index) == ["(Intercept)", "trtlo", "trtmid", "flagTRUE"]   # text: sorted, "hi" first
    # an Enum keeps its declared order: its first category is the reference level
    pe = p.with_columns(pl.col("trt").cast(pl.Enum(["lo", "mid", "hi"])))
    with pytest.warns(fl.MissingValuesWarning):
        res_e = fl.lmer("y ~ trt + flag + (1|g)", pe)
    assert list(res_e.fixef.index) == ["(Intercept)", "trtmid", "trthi", "flagTRUE"]
    assert res_e.criterion == pytest.approx(res.criterion, abs=1e-8)


def test_polars_conversion_needs_no_pyarrow(pl, tmp_path):
    """polars' own to_pandas() needs pyarrow, an optional dependency; the conversion here does not."""
    code = textwrap.dedent("""
        import sys
        sys.modules["pyarrow"] = None          # any import of pyarrow now fails
        import polars as pl
        import fastlmm_ext as fl
        sleep = fl.datasets.load("sleepstudy")
        p = pl.DataFrame({"Reaction": sleep.Reaction.to_numpy(), "Days": sleep.Days.to_numpy(),
                          "Subject": sleep.Subject.astype(str).to_numpy()})
        print(repr(fl.lmer("Reaction ~ Days + (1|Subject)", p).criterion))
    """)
    root = str(pathlib.Path(fl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and a clean checkout's
    # source tree has no compiled kernel
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(fl.lmer(F, datasets.load("sleepstudy")).criterion, abs=1e-9)


# ----------------------------------------------------------------------------- complex numbers

@pytest.mark.parametrize("what", ["response", "predictor", "grouping-term slope"])
def test_complex_columns_are_refused(sleep, what):
    col = {"response": "Reaction", "predictor": "Days", "grouping-term slope": "Days"}[what]
    formula = "Reaction ~ Days + (Days|Subject)" if what == "grouping-term slope" else F
    df = sleep.assign(**{col: sleep[col].astype(complex)})
    with raises(fl.DataError, f"'{col}'", "complex"):
        fl.lmer(formula, df)


@pytest.mark.parametrize("arg", ["weights", "offset"])
def test_complex_weights_and_offsets_are_refused(sleep, arg):
    z = np.ones(len(sleep), dtype=complex)
    with raises(fl.DataError, f"'{arg}'", "complex"):
        fl.lmer(F, sleep, **{arg: z})
    with raises(fl.DataError, "'zc'", "complex"):
        fl.lmer(F, sleep.assign(zc=z), **{arg: "zc"})


def test_complex_responses_of_fit_many_and_refit(sleep):
    Y = np.column_stack([sleep.Reaction.to_numpy(), sleep.Reaction.to_numpy() + 1j])
    with raises(fl.DataError, "responses", "complex"):
        fl.fit_many("~ Days + (1|Subject)", sleep, Y)
    with raises(fl.DataError, "'y2'", "complex"):
        fl.fit_many("~ Days + (1|Subject)", sleep, pd.DataFrame({"y1": Y[:, 0].real, "y2": Y[:, 1]}, index=sleep.index))
    with raises(fl.DataError, "'yc'", "complex"):
        fl.fit_many("~ Days + (1|Subject)", sleep.assign(yc=Y[:, 1]), ["yc"])
    m = fl.LinearMixedModel(F, sleep)
    with raises(fl.DataError, "new response", "complex"):
        m.refit(Y[:, 1])


# ----------------------------------------------------------------------------- levels that print alike

def test_values_that_print_alike_are_refused(sleep):
    """1 and '1' are different values to pandas but one level to R's factor(): refused, named."""
    df = sleep.assign(G=[(1 if i % 3 == 0 else "1" if i % 3 == 1 else "a") for i in range(len(sleep))])
    with raises(fl.DataError, "'G'", "1 and '1'"):
        fl.lmer("Reaction ~ Days + (1|G)", df)
    with raises(fl.DataError, "'G'", "1 and '1'"):
        fl.lmer_chunked("Reaction ~ Days + (1|G)", [df.iloc[:90], df.iloc[90:]])
    with raises(fl.DataError, "'G'"):
        fl.lmer("Reaction ~ G + (1|Subject)", df)
    cat = sleep.assign(G=pd.Categorical([1 if i % 2 else "1" for i in range(len(sleep))]))
    with raises(fl.DataError, "'G'", "print alike"):
        fl.lmer("Reaction ~ Days + (1|G)", cat)


@pytest.mark.filterwarnings("ignore::fastlmm_ext.SingularFitWarning")
def test_mixed_types_that_print_differently_agree_in_memory_and_chunked(sleep):
    """Text and numbers whose labels differ stay distinct levels, numbered alike on both paths."""
    labels = np.where(sleep.index % 4 == 0, "a", np.where(sleep.index % 4 == 1, "b", ""))
    G = [lab if lab else int(i % 3) for i, lab in enumerate(labels)]
    df = sleep.assign(G=pd.Series(G, dtype=object))
    full = fl.lmer("Reaction ~ Days + (1|G) + (1|Subject)", df)
    chunked = fl.lmer_chunked("Reaction ~ Days + (1|G) + (1|Subject)", [df.iloc[:50], df.iloc[50:]])
    assert list(full.ranef["G"].index) == ["0", "1", "2", "a", "b"]
    assert list(chunked.ranef["G"].index) == list(full.ranef["G"].index)
    assert chunked.criterion == pytest.approx(full.criterion, abs=1e-8)


# ----------------------------------------------------------------------------- weights and offsets

def test_weights_checks_name_the_argument(sleep):
    n = len(sleep)
    w_inf = np.ones(n)
    w_inf[3] = np.inf
    w_nan = np.ones(n)
    w_nan[5] = np.nan
    w_neg = np.ones(n)
    w_neg[[1, 2]] = -1.0
    with raises(fl.DataError, "weights", "zero in every row"):
        fl.lmer(F, sleep, weights=np.zeros(n))
    with raises(fl.DataError, "'w'", "zero in every row"):
        fl.lmer(F, sleep.assign(w=0.0), weights="w")
    with raises(fl.DataError, "'weights'", "infinite"):
        fl.lmer(F, sleep, weights=w_inf)
    with raises(fl.DataError, "'w'", "infinite"):
        fl.lmer(F, sleep.assign(w=w_inf), weights="w")
    with raises(fl.DataError, "weights", "missing"):
        fl.lmer(F, sleep, weights=w_nan)
    with raises(fl.DataError, "weights", "2 value(s) are negative"):
        fl.lmer(F, sleep, weights=w_neg)
    with raises(fl.DataError, "'w'", "negative"):
        fl.lmer(F, sleep.assign(w=w_neg), weights="w")
    with raises(fl.DataError, "weights", "length 10"):
        fl.lmer(F, sleep, weights=np.ones(10))
    with raises(fl.DataError, "'weights'", "numeric"):
        fl.lmer(F, sleep, weights=np.array(["a"] * n, dtype=object))
    with raises(fl.DataError, "'w'", "numeric"):
        fl.lmer(F, sleep.assign(w="a"), weights="w")
    with raises(fl.DataError, "'o'", "numeric"):
        fl.lmer(F, sleep.assign(o="a"), offset="o")
    with raises(fl.DataError, "'offset'", "infinite"):
        fl.lmer(F, sleep, offset=w_inf)
    with raises(fl.DataError, "offset", "missing"):
        fl.lmer(F, sleep, offset=w_nan)


def test_missing_weight_in_a_column_drops_the_row(sleep):
    """As in R's model frame, a row whose weights column is missing is dropped (not refused)."""
    w = np.linspace(0.5, 2.0, len(sleep))
    w[7] = np.nan
    with pytest.warns(fl.MissingValuesWarning, match="dropped 1"):
        res = fl.lmer(F, sleep.assign(w=w), weights="w")
    keep = ~np.isnan(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = fl.lmer(F, sleep[keep], weights=w[keep])
    assert res.criterion == pytest.approx(ref.criterion, abs=1e-9)


@pytest.mark.parametrize("level", ["abc", None, 0.0, 1.0, 1.5, float("nan")])
def test_confidence_level_refused_by_name_everywhere(sleep, level):
    """One check of the confidence level serves confint, predict's intervals, ls_means, emmeans
    and the bootstrap's intervals: a clear ArgumentError naming ``level``, never a raw float()."""
    res = fl.lmer("Reaction ~ Days + (Days|Subject)", sleep)
    calls = [lambda: res.confint(level=level),
             lambda: res.predict(sleep.head(3), interval="confidence", level=level),
             lambda: res.emmeans("Days", at={"Days": [0.0]}, level=level)]
    for call in calls:
        with pytest.raises(fl.ArgumentError, match="level must be"):
            call()
